"""What `make serve` serves: the newest model a `make <recipe>` run trained (its adapter, or the SFT folder),
else the tiny GLM-4 — on CPU, nothing downloaded."""
import os

# Where the recipes' make targets write (chatglm_lora/, llama_ner/, glm4_finetune/ recipe.mk).
RECIPE_OUTPUTS = ("build/chatglm-alpaca/output", "build/llama-ner/train_trainer/adapter_model", "output/glm4-lora",
                  "output/glm4-ptuning", "output/glm4-sft", "output")
FALLBACK = "tiny:glm-4-9b-chat"


def _trained_at(folder: str) -> float | None:
    for name in ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return os.path.getmtime(path)
    return None


def last_trained(repo: str) -> tuple[str | None, str | None]:
    """(model, adapter) for load_for_serving: the newest recipe output under `repo`, else the tiny GLM-4."""
    found = []
    for relative in RECIPE_OUTPUTS:
        folder = os.path.join(repo, relative)
        when = _trained_at(folder)
        if when is not None:
            found.append((when, folder))
    if not found:
        return FALLBACK, None
    folder = max(found)[1]
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return None, folder
    return folder, None
