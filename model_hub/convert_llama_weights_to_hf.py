"""The entry script under the name users know: Meta's original LLaMA weights (consolidated.*.pth + params.json) →
a transformers LlamaForCausalLM folder, with the original script's CLI.

    python model_hub/convert_llama_weights_to_hf.py --help        (or: python -m model_hub.convert_llama_weights_to_hf --help)

The code lives in model_hub/llama/convert.py."""
from model_hub.llama.convert import main, write_model  # noqa: F401  (this script's API)
from tuning.errors import run_main

if __name__ == "__main__":
    run_main(main)
