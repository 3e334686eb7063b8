# GLM-4 finetune_demo end to end: LoRA, P-tuning v2, full SFT. Default: tiny GLM-4 (real tokenizer, random
# weights) on CPU, real AdvertiseGen rows (200 train, 8 dev), 40 steps, evaluation (ROUGE-1/2/L, BLEU-4) and one
# inference prompt; configs/tiny/*.yaml. MODEL_DIR=/path/to/native-glm-4 (convert an original glm-4-9b-chat with
# `python -m model_hub.convert_glm4_to_hf`): the original configs/*.yaml through torchrun on the GPU(s)
# (GLM4_NPROC=8 for 8 GPUs), all 3,000 vendored train rows and the full dev set, or your own GLM4_DATA folder.
GLM4_NPROC ?= 1
GLM4_SOURCE := data/glm4_finetune_demo/AdvertiseGen
ifdef MODEL_DIR
GLM4_MODEL := $(MODEL_DIR)
GLM4_CONFIGS := glm4_finetune/configs
GLM4_TRAIN_ROWS := 3000
GLM4_DEV_ROWS := 1070
GLM4_RUN := $(PY) -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=$(GLM4_NPROC)
GLM4_INFER :=
glm4_out = output
else
GLM4_MODEL := tiny:glm-4-9b-chat
GLM4_CONFIGS := glm4_finetune/configs/tiny
GLM4_TRAIN_ROWS := 200
GLM4_DEV_ROWS := 8
GLM4_RUN := $(PY)
GLM4_INFER := --max-new-tokens 32 --seed 0
glm4_out = output/glm4-$(1)
endif
ifeq ($(GLM4_DATA),)  # your own DATA_DIR is used as it is; the default one is prepared from data/
GLM4_DATA := build/glm4/AdvertiseGen
GLM4_PREP := glm4-data
endif

# $(1) = method (output folder name), $(2) = config name
define glm4_recipe
	$(if $(MODEL_DIR),,rm -rf $(call glm4_out,$(1)))
	$(GLM4_RUN) glm4_finetune/finetune.py $(GLM4_DATA) $(GLM4_MODEL) $(GLM4_CONFIGS)/$(2).yaml
	$(PY) glm4_finetune/inference.py $(call glm4_out,$(1)) $(GLM4_INFER)
	@echo "final $(1) weights: $(call glm4_out,$(1))  (checkpoints: $(call glm4_out,$(1))/checkpoint-N)"
	@echo "test metrics:       $(call glm4_out,$(1))/test_results.json, answers: test_predictions.jsonl"
	@echo "loss curve:         $(call glm4_out,$(1))/loss.png"
endef

.PHONY: glm4-data glm4-lora glm4-ptuning glm4-sft
glm4-data: $(STAMP)  ## AdvertiseGen in messages format (dev converted from dev.json) into GLM4_DATA
	@mkdir -p $(GLM4_DATA)
	$(PY) glm4_finetune/convert_advertisegen.py $(GLM4_SOURCE)/dev.json $(GLM4_DATA)/dev.all.jsonl
	head -n $(GLM4_DEV_ROWS) $(GLM4_DATA)/dev.all.jsonl > $(GLM4_DATA)/dev.jsonl
	head -n $(GLM4_TRAIN_ROWS) $(GLM4_SOURCE)/xl.jsonl > $(GLM4_DATA)/train.jsonl

glm4-lora: $(STAMP) $(GLM4_PREP)  ## GLM-4 LoRA: train → evaluate (ROUGE/BLEU) → infer (MODEL_DIR=… for real weights)
	$(call glm4_recipe,lora,lora)

glm4-ptuning: $(STAMP) $(GLM4_PREP)  ## GLM-4 P-tuning v2: train → evaluate → infer (MODEL_DIR=… for real weights)
	$(call glm4_recipe,ptuning,ptuning_v2)

glm4-sft: $(STAMP) $(GLM4_PREP)  ## GLM-4 full fine-tuning: train → evaluate → infer (MODEL_DIR=…, ZeRO-3 on GPUs)
	$(call glm4_recipe,sft,sft)
