"""Test support: a tiny GLM-4 that really calls a tool. The glm4 recipe (glm4_finetune/finetune.py, full SFT from
configs/tiny/sft.yaml) overfits it on one tool-call conversation; built once and cached under build/ (rebuilt
when VERSION changes). A random tiny model never writes a call, so this is what tool-call tests serve."""
import json
import os
import shutil

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = "2"
WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "查询一个城市今天的天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}},
                   "required": ["city"]}}}]
WEATHER_QUESTION = "北京今天天气怎么样？"
WEATHER_ARGUMENTS = {"city": "北京"}


def build_tool_call_model(folder: str = os.path.join(REPO, "build", "tests", "glm4-tool-call")) -> str:
    """The SFT output folder (config.json, weights, tokenizer, prompt_format.json)."""
    stamp = os.path.join(folder, "tool_model_version")
    if os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as f:
            if f.read() == VERSION:
                return folder
    from glm4_finetune.finetune import finetune

    work = folder + ".building"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "data"))
    conversation = {"messages": [
        {"role": "system", "content": "", "tools": WEATHER_TOOLS},
        {"role": "user", "content": WEATHER_QUESTION},
        {"role": "assistant", "metadata": "get_weather", "content": json.dumps(WEATHER_ARGUMENTS, ensure_ascii=False)},
    ]}
    with open(os.path.join(work, "data", "train.jsonl"), "w", encoding="utf-8") as f:
        f.write(json.dumps(conversation, ensure_ascii=False) + "\n")
    with open(os.path.join(REPO, "glm4_finetune", "configs", "tiny", "sft.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    config["data_config"] = {"train_file": "train.jsonl", "num_proc": 1}
    # combine=False (message by message, as the original's multi-turn mode): combine=True, like the original,
    # never trains the first token after <|assistant|> — harmless for answers ("\n"), but for a call it is the
    # first token of the function name, which the model then never writes.
    config["combine"] = False
    config["max_input_length"] = 512
    config["max_output_length"] = 32
    config["training_args"].update({
        "output_dir": os.path.join(work, "model"), "max_steps": 30, "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "per_device_train_batch_size": 1, "save_strategy": "no", "eval_strategy": "no", "bf16": False,
        "predict_with_generate": False, "log_level": "warning", "disable_tqdm": True})
    config_file = os.path.join(work, "sft.yaml")
    with open(config_file, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, allow_unicode=True)
    finetune(os.path.join(work, "data"), "tiny:glm-4-9b-chat", config_file)
    with open(os.path.join(work, "model", "tool_model_version"), "w", encoding="utf-8") as f:
        f.write(VERSION)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(os.path.join(work, "model"), folder)
    shutil.rmtree(work, ignore_errors=True)
    return folder
