"""Training never writes over the user's files (issue 29, item 2).

`--output_dir` at a folder of the user's own files (README.md, loss.png, an unrelated adapter_config.json) used to
be accepted: PEFT's model card replaced their README, the loss plot theirs. Now all four training entry points take
an output folder only when it is new, empty or an earlier training output (the run lock / a checkpoint marker of
this code), else one line naming the override flag; the home folder, the current folder and the data's folder
never, not even with the flag. Each refusal comes before anything is written (the folders are compared byte for
byte), in-process, before a model is loaded.
"""
import json
import os

import pytest
import yaml

from chatglm_lora import finetune as chatglm_finetune
from conftest import REPO, run_in_process
from folder_state import snapshot
from glm4_finetune.finetune import app as glm4_app
from llama_ner import train_deepspeed, train_trainer

ROWS = os.path.join(REPO, "tests", "malformed", "rows_clean.jsonl")
USER_FILES = {"README.md": "my notes", "loss.png": "my plot", "adapter_config.json": '{"r": 64}'}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Each recipe's data, each in a folder of its own (the "data's folder" case)."""
    from chatglm_lora import tokenize_dataset_rows
    from llama_ner.process import process_msra

    root = tmp_path_factory.mktemp("output_folder_data")
    (root / "chatglm").mkdir()
    code, _, err = run_in_process(tokenize_dataset_rows.main, ["--jsonl_path", ROWS, "--save_path",
                                                               root / "chatglm" / "alpaca", "--max_seq_length", "48",
                                                               "--chatglm_path", "tiny:chatglm-6b"])
    assert code == 0, err
    (root / "llama").mkdir()
    process_msra(os.path.join(REPO, "data", "llama_ner_msra", "ori_data", "msra_1000.txt"), str(root / "all.txt"))
    lines = (root / "all.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")
    (root / "llama" / "train.txt").write_text("\n".join(lines[:4]), encoding="utf-8")
    (root / "glm4").mkdir()
    with open(os.path.join(REPO, "data", "glm4_finetune_demo", "AdvertiseGen", "xl.jsonl"), encoding="utf-8") as f:
        (root / "glm4" / "train.jsonl").write_text("".join(f.readlines()[:2]), encoding="utf-8")
    return root


def glm4_config(out, path) -> str:
    config = {"data_config": {"train_file": "train.jsonl", "num_proc": 1}, "combine": True, "max_input_length": 32,
              "max_output_length": 32, "weights_dtype": "fp32",
              "training_args": {"output_dir": str(out), "max_steps": 1, "per_device_train_batch_size": 2,
                                "use_cpu": True, "report_to": "none", "remove_unused_columns": False,
                                "predict_with_generate": True, "generation_config": {"max_new_tokens": 8}},
              "peft_config": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "target_modules": ["q_proj"]}}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


# entry point → (main, argv for an output folder, the override flag as typed, the data's folder)
def chatglm(data, out, tmp):
    return ["--dataset_path", data / "chatglm" / "alpaca", "--chatglm_path", "tiny:chatglm-6b", "--output_dir", out,
            "--max_steps", "1", "--use_cpu", "--report_to", "none"]


def llama(data, out, tmp):
    return ["--model_dir=tiny:chinese-alpaca-7b", f"--train_path={data / 'llama' / 'train.txt'}", f"--save_dir={out}",
            "--max_steps=1", "--train_batch_size=2"]


def glm4(data, out, tmp):
    return [data / "glm4", "tiny:glm-4-9b-chat", glm4_config(out, tmp / "glm4.yaml")]


ENTRY_POINTS = {
    "chatglm_lora/finetune.py": (chatglm_finetune.main, chatglm, ["--overwrite_output_dir", "true"], "chatglm"),
    "llama_ner/train_trainer.py": (train_trainer.main, llama, ["--overwrite_output_dir=true"], "llama"),
    "llama_ner/train_deepspeed.py": (train_deepspeed.main, llama, ["--overwrite_output_dir=true"], "llama"),
    "glm4_finetune/finetune.py": (glm4_app, glm4, ["--overwrite_output_dir"], "glm4"),
}


def launch(entry, data, out, tmp, monkeypatch, *extra):
    main, argv, _, _ = ENTRY_POINTS[entry]
    if entry.endswith("train_deepspeed.py"):  # as under `deepspeed --num_gpus 1`: refused before any launch
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            monkeypatch.setenv(key, value)
    code, _, err = run_in_process(main, [*argv(data, out, tmp), *extra], script=entry)
    return code, err


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_a_folder_of_the_users_files_is_refused_with_the_flag_named(entry, data, tmp_path, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    for name, text in USER_FILES.items():
        (out / name).write_text(text)
    before = snapshot(out)
    code, err = launch(entry, data, out, tmp_path, monkeypatch)
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {out}: is not empty and is not an earlier training output (it holds README.md, "
                           "adapter_config.json, loss.png)")
    assert ENTRY_POINTS[entry][2][0] in line
    assert snapshot(out) == before


@pytest.mark.parametrize("where", ["current folder", "home folder", "data's folder"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_home_current_and_data_folders_are_refused_even_with_the_flag(entry, where, data, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export PATH=...")
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    out = {"current folder": ".", "home folder": "~" if "glm4" not in entry else str(home),
           "data's folder": str(data / ENTRY_POINTS[entry][3])}[where]
    if out == "~":
        out = os.path.expanduser(out)  # what a shell passes for ~
    watched = {"current folder": work, "home folder": home, "data's folder": data / ENTRY_POINTS[entry][3]}[where]
    before = snapshot(watched)
    code, err = launch(entry, data, out, tmp_path, monkeypatch, *ENTRY_POINTS[entry][2])
    assert code == 2 and "Traceback" not in err, err
    expected = {"current folder": "is the current folder (or holds it)", "home folder": "is your home folder",
                "data's folder": "this output folder holds an input of the run"}[where]
    assert expected in err.strip().splitlines()[-1]
    assert snapshot(watched) == before


def test_the_flag_allows_a_foreign_folder_and_an_earlier_output_needs_no_flag(data, tmp_path, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = launch("llama_ner/train_trainer.py", data, out, tmp_path, monkeypatch, "--overwrite_output_dir=true")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"  # allowed, and a file the run does not write is left alone
    assert (out / "adapter_model" / "adapter_config.json").is_file()
    # issue 33.2: weights follow the umask like every other file (they were 0600: only their owner could serve them)
    umask = os.umask(0)
    os.umask(umask)
    for weights in (out / "adapter_model" / "adapter_model.safetensors", out / "checkpoint-1" / "adapter_model.safetensors"):
        assert oct(weights.stat().st_mode & 0o777) == oct(0o666 & ~umask), weights
    code, err = launch("llama_ner/train_trainer.py", data, out, tmp_path, monkeypatch,
                       "--resume_from_checkpoint=last", "--max_steps=2")
    assert code == 0, err  # now an earlier training output: no flag needed


def test_an_earlier_output_is_recognised_by_its_marker_only(tmp_path):
    from tuning.run_folder import LOCK_FILE, RUN_MARKER, is_earlier_run

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
    assert not is_earlier_run(str(folder))
    (folder / "checkpoint-3").mkdir()
    assert not is_earlier_run(str(folder))
    (folder / "checkpoint-3" / RUN_MARKER).write_text("{}")
    assert is_earlier_run(str(folder))
    (folder / "checkpoint-3" / RUN_MARKER).unlink()
    (folder / "checkpoints" / "global_step2").mkdir(parents=True)  # the raw DeepSpeed loop's layout
    (folder / "checkpoints" / "global_step2" / RUN_MARKER).write_text("{}")
    assert is_earlier_run(str(folder))
    (folder / "checkpoints" / "global_step2" / RUN_MARKER).unlink()
    assert not is_earlier_run(str(folder))
    (folder / LOCK_FILE).write_text("")
    assert is_earlier_run(str(folder))
