"""Issue 30.4: one training pipeline behind the three original command lines. The rules of what trains together
(method × quantization × ZeRO stage × precision) live in tuning.run_plan.check_combination only, each refusal one
message; the four training entry points run the same named phases and read top to bottom in a screen; the raw
DeepSpeed loop publishes checkpoints the way the Trainer recipes do."""
import ast
import json
import os

import pytest

from conftest import REPO
from tuning.errors import NothingToDo, UserError
from tuning.run_plan import RunPlan, Spelling, check_combination, plan_run

ENTRY_POINTS = {"chatglm_lora/finetune.py": "main", "llama_ner/train_trainer.py": "main",
                "llama_ner/train_deepspeed.py": "main", "glm4_finetune/finetune.py": "finetune"}
RECIPES = ("chatglm_lora", "llama_ner", "glm4_finetune")
HELPERS = {"llama_ner": "llama_ner/common.py", "glm4_finetune": "glm4_finetune/config.py"}  # a recipe's own parts


@pytest.mark.parametrize("settings, field, message", [
    (dict(method="lora", fp16=True, use_cpu=True), "fp16",
     "fp16 is not supported on CPU (no fast fp16 kernels; losses overflow); use --bf16 or fp32"),
    (dict(method="full", bits=4), "quantization_bit",
     "full fine-tuning cannot train 4-bit base weights; use LoRA or P-tuning v2 on the quantized base, or drop "
     "quantization_bit"),
    (dict(method="lora", bits=8, zero_stage=3), "quantization_bit",
     "8-bit base weights (bitsandbytes) cannot be partitioned by ZeRO-3; use a ZeRO-1/2 DeepSpeed config or drop "
     "quantization_bit"),
    (dict(method="lora", bits=8, zero_stage=3, quantized_by="load_in_8bit",
          zero3_advice="use a ZeRO-1/2 config (e.g. glm4_finetune/configs/ds_zero_2.json) or --load_in_8bit false"),
     "load_in_8bit",
     "8-bit base weights (bitsandbytes) cannot be partitioned by ZeRO-3; use a ZeRO-1/2 config (e.g. "
     "glm4_finetune/configs/ds_zero_2.json) or --load_in_8bit false"),
    (dict(method="ptuning", zero_stage=3), "deepspeed",
     "ZeRO-3 with P-tuning v2 (prefix tuning) hangs at the first save; use configs/ds_zero_2.json"),
    (dict(method="lora", fp16=True, use_cpu=True, spelling=Spelling(option=lambda key: f"training_args.{key}: true")),
     "fp16", "fp16 is not supported on CPU (no fast fp16 kernels; losses overflow); use training_args.bf16: true or "
             "fp32"),
])
def test_each_broken_rule_is_one_message_naming_its_setting(settings, field, message):
    with pytest.raises(UserError) as error:
        check_combination(**settings)
    assert (error.value.field, error.value.message) == (field, message)


@pytest.mark.parametrize("settings", [
    dict(method="lora", bits=4, zero_stage=2), dict(method="ptuning", bits=8, zero_stage=1),
    dict(method="full", zero_stage=3, bf16=True), dict(method="lora", bits=4), dict(method="full"),
])
def test_combinations_that_train_pass(settings):
    check_combination(**settings)


def test_the_plan_resolves_resume_and_a_finished_run_stops(tmp_path):
    out = tmp_path / "run"
    checkpoint = out / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (checkpoint / "optimizer.pt").write_bytes(b"")
    plan = plan_run(output_dir=str(out), method="lora", bits=None, zero_stage=None, resume="last", max_steps=6,
                    num_train_epochs=1, seed=3, inputs=["data"])
    assert plan == RunPlan(str(out), "lora", None, None, str(checkpoint), 3, ("data",))
    with pytest.raises(NothingToDo, match="raise --max_steps=N to train further"):
        plan_run(output_dir=str(out), method="lora", bits=None, zero_stage=None, resume="last", max_steps=4,
                 num_train_epochs=1, seed=3, spelling=Spelling(max_steps="--max_steps=N"))
    with pytest.raises(UserError, match="written without DeepSpeed .* relaunch plainly"):  # the other launcher
        plan_run(output_dir=str(out), method="lora", bits=None, zero_stage=2, resume="last", max_steps=6,
                 num_train_epochs=1, seed=3, spelling=Spelling(without_deepspeed="relaunch plainly"))


def parsed(path: str) -> ast.Module:
    return ast.parse(open(os.path.join(REPO, path), encoding="utf-8").read(), path)


def called_names(tree) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            names.add(node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", ""))
    return names


def test_no_recipe_checks_the_combination_its_own_way():
    """quantization_conflict / check_precision (the rules' parts) are called through check_combination only."""
    for recipe in RECIPES:
        for root, _, files in os.walk(os.path.join(REPO, recipe)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.relpath(os.path.join(root, name), REPO)
                    assert not {"quantization_conflict", "check_precision"} & called_names(parsed(path)), path


@pytest.mark.parametrize("path", sorted(ENTRY_POINTS))
def test_each_entry_point_runs_the_shared_phases_in_a_screen(path):
    tree = parsed(path)
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == ENTRY_POINTS[path])
    assert function.end_lineno - function.lineno + 1 <= 60, f"{path}: {function.name} is longer than a screen"
    # The phases, directly or through the recipe's own small helpers (its config reader, llama_ner/common.py).
    helper = HELPERS.get(path.split("/")[0])
    reachable = called_names(tree) | (called_names(parsed(helper)) if helper else set())
    assert {"check_combination", "prepare_base", "add_method"} <= reachable, path
    assert {"plan_run", "claim_output"} <= reachable or path.endswith("train_deepspeed.py"), path


def test_the_deepspeed_loop_publishes_checkpoints_as_the_trainer_does():
    loop, trainer = parsed("llama_ner/train_deepspeed.py"), parsed("tuning/checkpoints.py")
    assert "save_checkpoint_staged" in called_names(loop)
    assert not {"publish", "save_collectively", "remove_leftovers"} & called_names(loop)
    atomic = next(node for node in ast.walk(trainer) if isinstance(node, ast.ClassDef)
                  and node.name == "AtomicCheckpoints")
    assert "save_checkpoint_staged" in called_names(atomic)
