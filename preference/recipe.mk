# Preference training after SFT (preference/train_dpo.py, TRL 1.16): DPO on the demonstration pairs that
# preference/make_demo_pairs.py builds from MSRA and AdvertiseGen, continuing the LoRA the SFT target trained (its
# reference = that SFT adapter). Default: the tiny models on CPU, 20 steps. MODEL_DIR=… (the same as the SFT run):
# the real base from the adapter's record, TRL's defaults (lr 5e-6, one epoch, beta 0.1), on the GPU.
# PREF_ARGS="--loss_type=ipo …" adds flags (see python preference/train_dpo.py --help).
PREF_WORK ?= build/preference
PREF_ARGS ?=
ifdef MODEL_DIR
PREF_TRAIN := --bf16=true --max_length=2048
else
PREF_TRAIN := --max_steps=20 --save_steps=10 --log_steps=2 --learning_rate=1e-2 --train_batch_size=2 --max_length=1024
endif

.PHONY: preference-data llama-ner-dpo glm4-dpo
preference-data: $(STAMP)  ## the demonstration pairs: MSRA NER (gold vs wrong answer) and GLM-4 tool calls → build/preference
	$(PY) preference/make_demo_pairs.py --out_dir $(PREF_WORK)

llama-ner-dpo: $(STAMP) preference-data  ## DPO on MSRA NER pairs, continuing `make llama-ner`'s adapter (MODEL_DIR=… for real weights)
	@test -f $(LLAMA_NER_WORK)/train_trainer/adapter_model/adapter_config.json || { echo "no NER adapter in $(LLAMA_NER_WORK)/train_trainer/adapter_model: run make llama-ner first" >&2; exit 2; }
	$(if $(MODEL_DIR),,rm -rf $(PREF_WORK)/llama-ner-dpo)
	$(PY) preference/train_dpo.py --adapter=$(LLAMA_NER_WORK)/train_trainer/adapter_model \
	    --train_path=$(PREF_WORK)/msra_ner_pairs.jsonl --save_dir=$(PREF_WORK)/llama-ner-dpo \
	    $(PREF_TRAIN) $(PREF_ARGS)
	@echo "adapter:       $(PREF_WORK)/llama-ner-dpo  (serve: python -m serving.api --adapter $(PREF_WORK)/llama-ner-dpo)"
	@echo "loss, margins: $(PREF_WORK)/llama-ner-dpo/loss.png, margins.png"

glm4-dpo: $(STAMP) preference-data  ## DPO on GLM-4 tool-call pairs, continuing `make glm4-lora`'s adapter (MODEL_DIR=… for real weights)
	@test -f $(call glm4_out,lora)/adapter_config.json || { echo "no GLM-4 LoRA adapter in $(call glm4_out,lora): run make glm4-lora first" >&2; exit 2; }
	$(if $(MODEL_DIR),,rm -rf $(PREF_WORK)/glm4-dpo)
	$(PY) preference/train_dpo.py --adapter=$(call glm4_out,lora) \
	    --train_path=$(PREF_WORK)/glm4_tool_pairs.jsonl --save_dir=$(PREF_WORK)/glm4-dpo \
	    $(PREF_TRAIN) $(PREF_ARGS)
	@echo "adapter:       $(PREF_WORK)/glm4-dpo  (serve with tools: python -m serving.api --adapter $(PREF_WORK)/glm4-dpo)"
	@echo "loss, margins: $(PREF_WORK)/glm4-dpo/loss.png, margins.png"
