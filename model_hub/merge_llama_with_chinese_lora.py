"""The entry script under the name users know: merges one or more Chinese-LLaMA/Alpaca LoRAs into a LLaMA base, in
order (vocabulary resize, huggingface or pth output), with the original script's CLI.

    python model_hub/merge_llama_with_chinese_lora.py --help        (or: python -m model_hub.merge_llama_with_chinese_lora --help)

The code lives in model_hub/llama/merge.py."""
from model_hub.llama.merge import main, merge, read_adapter  # noqa: F401  (this script's API)
from tuning.errors import run_main

if __name__ == "__main__":
    run_main(main)
