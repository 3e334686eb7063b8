"""GLM-4 recipe inputs: the shipped YAML configs, config errors, data validation, resume arguments, AdvertiseGen
conversion and the scripts' one-line errors (all before any model is loaded)."""
import json
import os
import sys

import pytest

from glm4_finetune.config import load_config
from glm4_finetune.finetune import resolve_auto_resume
from glm4_finetune.validate import check_conversation, read_conversations
from tuning.errors import UserError, run_main
from conftest import REPO, run_in_process

CONFIGS = os.path.join(REPO, "glm4_finetune", "configs")


def test_shipped_configs_keep_the_original_values(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")  # sft.yaml names DeepSpeed: keep its rank-0-of-1 defaults out of os.environ
    lora = load_config(os.path.join(CONFIGS, "lora.yaml"))
    assert (lora.max_input_length, lora.max_output_length, lora.combine) == (512, 512, True)
    assert lora.data_config.data_files == {"train": "train.jsonl", "validation": "dev.jsonl", "test": "dev.jsonl"}
    args = lora.training_args
    assert (args.learning_rate, args.max_steps, args.save_steps, args.eval_steps, args.logging_steps) == (
        5e-4, 3000, 500, 500, 10)
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size) == (1, 4)
    assert args.predict_with_generate and args.generation_config.max_new_tokens == 512 and args.do_eval
    peft = lora.peft_config
    assert (peft.peft_type, peft.r, peft.lora_alpha, peft.lora_dropout) == ("LORA", 8, 32, 0.1)
    assert set(peft.target_modules) == {"q_proj", "k_proj", "v_proj"}
    ptuning = load_config(os.path.join(CONFIGS, "ptuning_v2.yaml"))
    assert (ptuning.peft_config.num_virtual_tokens, ptuning.peft_config.num_attention_heads,
            ptuning.peft_config.token_dim) == (512, 2, 256)
    assert (ptuning.training_args.per_device_train_batch_size, ptuning.training_args.per_device_eval_batch_size) == (
        4, 16)
    sft = load_config(os.path.join(CONFIGS, "sft.yaml"))
    assert sft.peft_config is None and sft.training_args.learning_rate == 5e-5
    assert sft.training_args.deepspeed == os.path.join(REPO, "glm4_finetune", "configs", "ds_zero_3.json")
    del sft  # its ZeRO-3 config is registered globally while it lives: later from_pretrained calls must not see it
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    assert not is_deepspeed_zero3_enabled()
    for name in ("ds_zero_2.json", "ds_zero_3.json"):
        with open(os.path.join(CONFIGS, name), encoding="utf-8") as f:
            ds = json.load(f)
        assert ds["bf16"] == {"enabled": "auto"}
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("name", ["lora", "ptuning_v2", "sft"])
def test_tiny_configs_load(name):
    cfg = load_config(os.path.join(CONFIGS, "tiny", f"{name}.yaml"))
    assert cfg.training_args.use_cpu and cfg.training_args.bf16


BASE = """data_config:
  train_file: train.jsonl
  val_file: dev.jsonl
combine: true
max_input_length: 8
max_output_length: 8
training_args:
  output_dir: {out}
  learning_rate: 1e-4
  predict_with_generate: true
  eval_strategy: steps
  generation_config:
    max_new_tokens: 4
"""


@pytest.mark.parametrize("change, message", [
    (("combine: true", "combine: yes please"), r"c.yaml:4: combine: expected true or false"),
    (("max_input_length: 8", "max_input_length: -1"), r"c.yaml:5: max_input_length: expected a positive integer"),
    (("combine: true", "combine: true\nextra: 1"), r"c.yaml:5: extra: unknown key"),
    (("  val_file: dev.jsonl", "  val_file: dev.json"), r"c.yaml:3: data_config.val_file: expected a .jsonl"),
    (("  learning_rate: 1e-4", "  evaluation_strategy: steps"),
     r"c.yaml:9: training_args.evaluation_strategy: removed in transformers 5; use eval_strategy"),
    (("  learning_rate: 1e-4", "  learnin_rate: 1e-4"), r"c.yaml:9: training_args.learnin_rate: unknown"),
    (("    max_new_tokens: 4", "    max_new_tokenz: 4"),
     r"c.yaml:13: training_args.generation_config.max_new_tokenz: unknown GenerationConfig keyword"),
    (("  predict_with_generate: true", "  predict_with_generate: false"),
     r"training_args.predict_with_generate: must be true"),
    (("combine: true", "combine: true\npeft_config:\n  peft_type: IA3"), r"peft_config.peft_type: expected one of"),
    (("combine: true", "combine: true\npeft_config:\n  peft_type: LORA\n  rank: 8"),
     r"peft_config: .*unexpected keyword argument 'rank'"),
    (("combine: true\n", ""), r"c.yaml: combine: missing"),
    (("combine: true", "combine: true\nweights_dtype: fp16"), r"c.yaml:5: weights_dtype: expected bf16 or fp32"),
    (("max_output_length: 8", "max_output_length: [8"), r"c.yaml:\d+: invalid YAML"),
])
def test_config_errors_name_file_line_and_field(tmp_path, change, message):
    path = tmp_path / "c.yaml"
    path.write_text(BASE.format(out=tmp_path / "out").replace(*change), encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_config(str(path))


def test_yaml_numbers_and_eval_switch(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE.format(out=tmp_path / "out").replace("  val_file: dev.jsonl\n", ""), encoding="utf-8")
    cfg = load_config(str(path))
    assert cfg.training_args.learning_rate == 1e-4  # a float, as ruamel read it (PyYAML alone: the string "1e-4")
    assert not cfg.training_args.do_eval and cfg.training_args.eval_strategy == "no"


@pytest.mark.parametrize("top, bf16, expected", [
    (None, False, "bf16"),    # the original: bf16 weights
    (None, True, "fp32"),     # fp32 master weights under bf16 autocast
    ("fp32", False, "fp32"),  # plain fp32 (CPUs without native bf16 matmuls)
    ("fp32", True, "fp32"),
    ("bf16", False, "bf16"),
])
def test_weights_dtype(tmp_path, top, bf16, expected):
    from glm4_finetune.finetune import weights_dtype

    text = BASE.format(out=tmp_path / "out").replace("  learning_rate: 1e-4", f"  learning_rate: 1e-4\n  bf16: {bf16}"
                                                                                f"\n  use_cpu: true")
    path = tmp_path / "c.yaml"
    path.write_text(text + (f"weights_dtype: {top}\n" if top else ""), encoding="utf-8")
    assert weights_dtype(load_config(str(path))) == expected


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "天气",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
GOOD_TOOL_CALL = [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "上海？"},
                  {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "上海"}}'},
                  {"role": "observation", "content": '{"temp": 20}'}, {"role": "assistant", "content": "20 度"}]


def messages_with(index, **changes):
    messages = json.loads(json.dumps(GOOD_TOOL_CALL))
    messages[index].update(changes)
    return messages


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "hi"}], r"f:7: messages: no assistant message"),
    ([{"role": "bot", "content": "hi"}], r"f:7: messages\[0\].role: expected one of system, user"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}],
     r"messages\[1\].role: a system message may only come first"),
    ([{"role": "user", "content": "a", "tools": TOOLS}, {"role": "assistant", "content": "c"}],
     r"messages\[0\].tools: tools are only allowed on the system message"),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": "c"}],
     r"messages\[0\].content: expected a string, got NoneType"),
    ([{"role": "user", "content": "a", "Content": "x"}, {"role": "assistant", "content": "c"}],
     r"messages\[0\].Content: unknown key"),
    ([{"role": "user", "content": " "}, {"role": "assistant", "content": "c"}], r"messages\[0\].content: empty"),
    (messages_with(0, tools=[{"type": "function", "function": {"name": "f"}}]),
     r"messages\[0\].tools\[0\].function.parameters: expected"),
    (messages_with(0, tools=[{"type": "browser"}]), r"messages\[0\].tools\[0\].type: expected one of function"),
    (messages_with(2, content="call the weather tool"), r"messages\[2\].content: expected a tool call"),
    (messages_with(2, content='{"name": "get_time", "arguments": {}}'), r"calls 'get_time'; declared tools"),
    (messages_with(2, role="user"), r"messages\[3\].role: an observation must answer an assistant tool call"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "observation", "content": "c"}],
     r"observation without tools"),
])
def test_data_errors_name_file_line_and_field(messages, message):
    with pytest.raises(UserError, match=message):
        check_conversation({"messages": messages}, "f", 7)


def test_valid_conversations_pass(golden_dir):
    assert check_conversation({"messages": GOOD_TOOL_CALL}, "f", 1) == GOOD_TOOL_CALL
    name_newline_args = messages_with(2, content='get_weather\n{"city": "上海"}')
    assert check_conversation({"messages": name_newline_args}, "f", 1)
    with open(os.path.join(golden_dir, "glm4", "glm4_finetune.json"), encoding="utf-8") as f:
        for conversation in json.load(f)["conversations"]:
            check_conversation({"messages": conversation}, "f", 1)
    rows = read_conversations(os.path.join(REPO, "data", "glm4_finetune_demo", "AdvertiseGen", "dev.jsonl"))
    assert len(rows) == 1070
    with pytest.raises(UserError, match=r"dev.json: expected a .jsonl file"):
        read_conversations(os.path.join(REPO, "data", "glm4_finetune_demo", "AdvertiseGen", "dev.json"))


def test_resume_argument(tmp_path):
    out = str(tmp_path)
    assert resolve_auto_resume("", out) is None and resolve_auto_resume("no", out) is None
    assert resolve_auto_resume("yes", out) is None  # nothing saved yet: fresh, as the original
    for step in (3, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-9").mkdir()  # killed mid-save: no trainer_state.json
    assert resolve_auto_resume("YES", out) == os.path.join(out, "checkpoint-6")
    assert resolve_auto_resume("3", out) == os.path.join(out, "checkpoint-3")
    with pytest.raises(UserError, match=r"checkpoint-9: AUTO_RESUME_FROM_CHECKPOINT: not a complete .*\(saved steps: 3, 6\)"):
        resolve_auto_resume("9", out)
    for bad in ("0", "maybe", "-1"):
        with pytest.raises(UserError, match="AUTO_RESUME_FROM_CHECKPOINT: expected yes, no, or a checkpoint step"):
            resolve_auto_resume(bad, out)


def run_script(module, argv, monkeypatch, capsys):
    code, _, err = run_in_process(module, argv[1:], script=argv[0])
    return code, err.strip().splitlines()


def test_finetune_bad_data_is_one_line_before_any_model_load(tmp_path, monkeypatch, capsys):
    from glm4_finetune import finetune

    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}]}\n', encoding="utf-8")
    config = tmp_path / "c.yaml"
    config.write_text(BASE.format(out=tmp_path / "out").replace("  val_file: dev.jsonl\n", ""), encoding="utf-8")
    code, err = run_script(finetune.app, ["finetune.py", str(tmp_path), "no-such-model", str(config)], monkeypatch,
                           capsys)
    assert code == 2 and err == [f"error: {tmp_path / 'train.jsonl'}:1: messages: no assistant message; every "
                                 "conversation needs at least one assistant turn"]
    assert not (tmp_path / "out").exists()


def test_a_missing_shipped_train_file_names_the_command_that_makes_it(tmp_path, monkeypatch, capsys):
    """Issue 33.9: a fresh clone has no AdvertiseGen/train.jsonl until `python data/prepare.py`; the error says so
    (here the shipped folder's place is a copy without train.jsonl: the real one is shared with other tests)."""
    from glm4_finetune import finetune

    shipped = tmp_path / "AdvertiseGen"
    shipped.mkdir()
    monkeypatch.setattr(finetune, "SHIPPED_TRAIN_FILE", str(shipped / "train.jsonl"))
    config = tmp_path / "c.yaml"
    config.write_text(BASE.format(out=tmp_path / "out").replace("  val_file: dev.jsonl\n", ""), encoding="utf-8")
    code, err = run_script(finetune.app, ["finetune.py", str(shipped), "no-such-model", str(config)], monkeypatch,
                           capsys)
    assert code == 2 and err == [f"error: {shipped / 'train.jsonl'}: file not found; the shipped AdvertiseGen "
                                 "train.jsonl is made by `python data/prepare.py` (or `make data`)"]


def test_advertisegen_conversion_is_byte_equal(tmp_path, monkeypatch, capsys):
    from glm4_finetune import convert_advertisegen

    source = os.path.join(REPO, "data", "glm4_finetune_demo", "AdvertiseGen")
    out = tmp_path / "dev.jsonl"
    monkeypatch.setattr(sys, "argv", ["convert_advertisegen.py", os.path.join(source, "dev.json"), str(out)])
    run_main(convert_advertisegen.main)
    with open(os.path.join(source, "dev.jsonl"), "rb") as f:
        assert out.read_bytes() == f.read()
    bad = tmp_path / "bad.json"
    bad.write_text('{"content": "a", "summary": "b"}\n{"content": "a"}\n', encoding="utf-8")
    code, err = run_script(convert_advertisegen.main, ["x", str(bad), str(tmp_path / "bad.jsonl")], monkeypatch,
                           capsys)
    assert code == 2 and err[-1] == f"error: {bad}:2: summary: missing field; expected a string"
    assert not (tmp_path / "bad.jsonl").exists()
