"""The project's vLLM plugin (entry point `vllm.general_plugins` → `serving.vllm_plugin:register`, active where the
project is installed into vLLM's venv: `make vllm-setup`). vLLM runs it in every process it starts, before it
loads a tokenizer:

- the LLaMA tokenizer with the original's ids (model_hub.llama.tokenizer: sentencepiece, as transformers 4.28 did)
  is registered with transformers' AutoTokenizer, so the folders `python -m serving.vllm` prepares tokenize exactly
  as training did (vLLM's own reading of tokenizer.model differs on digit and whitespace runs; measured);
- GLM-4-9b-chat's tool-call parser `glm4_9b_chat` (serving/vllm_glm4_tools.py) is registered with vLLM.
"""


def register() -> None:
    import model_hub.llama.tokenizer  # noqa: F401  (registers LlamaSentencePieceTokenizer with AutoTokenizer)

    try:
        import serving.vllm_glm4_tools  # noqa: F401  (registers the glm4_9b_chat tool parser)
    except ImportError:  # a vLLM without the tool-parser API: serving.vllm says so when tools are asked for
        pass
