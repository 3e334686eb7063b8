# ChatGLM-Tuning end to end. Default: tiny ChatGLM-6B (real tokenizer, random weights) on CPU, real alpaca data,
# a 2,000-row subset cut at 128 tokens and 40 steps. MODEL_DIR=/path/to/chatglm-6b: the original README's settings on a GPU.
CHATGLM_WORK ?= build/chatglm-alpaca
ifdef MODEL_DIR
CHATGLM_MODEL := $(MODEL_DIR)
CHATGLM_ROWS := 0
CHATGLM_MAXLEN := 384
CHATGLM_TRAIN := --per_device_train_batch_size 6 --gradient_accumulation_steps 1 --max_steps 52000 \
    --save_steps 1000 --save_total_limit 2 --learning_rate 1e-4 --fp16 --logging_steps 50
# the original trains on every row: these 200 were trained on (a fit check, not a held-out score)
CHATGLM_DEV := tail -n 200
CHATGLM_EVAL := --batch_size 16 --max_length 512
else
CHATGLM_MODEL := tiny:chatglm-6b
CHATGLM_ROWS := 2000
CHATGLM_MAXLEN := 128
CHATGLM_TRAIN := --per_device_train_batch_size 4 --max_steps 40 --save_steps 20 --save_total_limit 2 \
    --learning_rate 1e-2 --logging_steps 5 --use_cpu --seed 0 --dataloader_num_workers 0
CHATGLM_DEV := sed -n 2001,2006p  # 6 rows after the training subset: held out
CHATGLM_EVAL := --batch_size 3 --max_length 96
endif

.PHONY: chatglm-alpaca
chatglm-alpaca: $(STAMP) data  ## ChatGLM-Tuning: alpaca → jsonl → tokenized rows → LoRA → infer → BLEU/ROUGE (MODEL_DIR=… for real weights)
	@mkdir -p $(CHATGLM_WORK)
	$(PY) chatglm_lora/cover_alpaca2jsonl.py --data_path data/stanford_alpaca/alpaca_data.json \
	    --save_path $(CHATGLM_WORK)/alpaca_data.jsonl
	@if [ "$(CHATGLM_ROWS)" != 0 ]; then head -n $(CHATGLM_ROWS) $(CHATGLM_WORK)/alpaca_data.jsonl \
	    > $(CHATGLM_WORK)/subset.jsonl; else cp $(CHATGLM_WORK)/alpaca_data.jsonl $(CHATGLM_WORK)/subset.jsonl; fi
	$(PY) chatglm_lora/tokenize_dataset_rows.py --jsonl_path $(CHATGLM_WORK)/subset.jsonl \
	    --save_path $(CHATGLM_WORK)/alpaca --max_seq_length $(CHATGLM_MAXLEN) --chatglm_path $(CHATGLM_MODEL)
	$(PY) chatglm_lora/finetune.py --dataset_path $(CHATGLM_WORK)/alpaca --lora_rank 8 \
	    --chatglm_path $(CHATGLM_MODEL) --output_dir $(CHATGLM_WORK)/output $(CHATGLM_TRAIN)
	$(PY) chatglm_lora/infer.py --chatglm_path $(CHATGLM_MODEL) --lora_path $(CHATGLM_WORK)/output \
	    --data_path data/stanford_alpaca/alpaca_data.json --num 3
	$(CHATGLM_DEV) $(CHATGLM_WORK)/alpaca_data.jsonl > $(CHATGLM_WORK)/dev.jsonl
	$(PY) chatglm_lora/evaluate.py --chatglm_path $(CHATGLM_MODEL) --lora_path $(CHATGLM_WORK)/output \
	    --eval_file $(CHATGLM_WORK)/dev.jsonl --output $(CHATGLM_WORK)/output/eval_results.json $(CHATGLM_EVAL)
	@echo "adapter:     $(CHATGLM_WORK)/output"
	@echo "tensorboard: $(CHATGLM_WORK)/output/runs"
	@echo "loss curve:  $(CHATGLM_WORK)/output/loss.png"
	@echo "BLEU/ROUGE:  $(CHATGLM_WORK)/output/eval_results.json"
