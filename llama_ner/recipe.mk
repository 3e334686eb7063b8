# Chinese-LLaMA-Alpaca-LoRA-Tuning end to end: MSRA → instruction rows → LoRA (HF Trainer) → F1 report → predict.
# Default: tiny Chinese-Alpaca (real tokenizer, random weights) on CPU, 40 steps, F1 on a 24-row subset of dev
# and of the MSRA test split. MODEL_DIR=/path/to/chinese-alpaca-7b (and a GPU): the original settings, launched
# with `deepspeed` as its README does (deepspeed.json: fp16, ZeRO-1, batch 12, lr 1e-5), full dev and test.
LLAMA_NER_WORK ?= build/llama-ner
ifdef MODEL_DIR
LLAMA_NER_MODEL := $(MODEL_DIR)
LLAMA_NER_LAUNCH := $(VENV)/bin/deepspeed
LLAMA_NER_TRAIN :=
LLAMA_NER_EVAL :=
LLAMA_NER_PREDICT :=
else
LLAMA_NER_MODEL := tiny:chinese-alpaca-7b
LLAMA_NER_LAUNCH := $(PY)
LLAMA_NER_TRAIN := --train_batch_size=4 --max_steps=40 --save_steps=20 --log_steps=5 --learning_rate=1e-2 \
    --bf16=true --save_total_limit=2
LLAMA_NER_EVAL := --eval_rows=24 --max_new_tokens=32 --train_batch_size=4
LLAMA_NER_PREDICT := --max_new_tokens=32
endif
LLAMA_NER_ARGS := $(LLAMA_NER_WORK)/train_trainer/adapter_model/train_args.json

.PHONY: llama-ner
llama-ner: $(STAMP)  ## Chinese-LLaMA-Alpaca NER: MSRA → LoRA (Trainer) → entity F1 → predict (MODEL_DIR=… for real weights)
	$(PY) llama_ner/process.py --out_dir $(LLAMA_NER_WORK)/instruct_data
	$(LLAMA_NER_LAUNCH) llama_ner/train_trainer.py --model_dir=$(LLAMA_NER_MODEL) \
	    --train_path=$(LLAMA_NER_WORK)/instruct_data/train.txt --dev_path=data/llama_ner_msra/instruct_data/dev.txt \
	    --save_dir=$(LLAMA_NER_WORK)/train_trainer/ $(LLAMA_NER_TRAIN)
	$(PY) llama_ner/test.py --train_args=$(LLAMA_NER_ARGS) --test_path=$(LLAMA_NER_WORK)/instruct_data/test.txt \
	    $(LLAMA_NER_EVAL)
	$(PY) llama_ner/predict.py --train_args=$(LLAMA_NER_ARGS) $(LLAMA_NER_PREDICT)
	@echo "adapter:    $(LLAMA_NER_WORK)/train_trainer/adapter_model"
	@echo "F1 report:  $(LLAMA_NER_WORK)/train_trainer/ner_report.json"
	@echo "loss curve: $(LLAMA_NER_WORK)/train_trainer/loss.png"
