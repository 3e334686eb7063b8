"""The entry script under the name users know: converts an original glm-4-9b-chat checkpoint (remote-code layout) into
transformers' native GlmForCausalLM folder.

    python model_hub/convert_glm4_to_hf.py --help        (or: python -m model_hub.convert_glm4_to_hf --help)

The code lives in model_hub/glm4/convert.py."""
from model_hub.glm4.convert import convert, main  # noqa: F401  (this script's API)
from tuning.errors import run_main

if __name__ == "__main__":
    run_main(main)
