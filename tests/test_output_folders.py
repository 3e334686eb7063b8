"""Output folders never delete what this code did not write (issue 25, item 2).

`tokenize_dataset_rows.py --save_path data` used to wipe the repository's data/ (exit 0), and `--save_path D
--jsonl_path D/rows.jsonl` deleted its own input. Now a command replaces only a new or empty folder or an earlier
output of its own kind; anything else is one line, exit 2, every file still there.
"""
import os
import shutil

import pytest

from conftest import REPO, run_in_process

ROWS = os.path.join(REPO, "tests", "malformed", "rows_clean.jsonl")


def run(module, argv, monkeypatch, cwd=REPO) -> tuple[int, str]:
    """(exit code, stderr) of a script's main run in-process (from the repository root by default)."""
    monkeypatch.chdir(cwd)
    code, _, err = run_in_process(module.main, argv, script="x.py")
    return code, err


def snapshot(folder) -> dict:
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def tokenize(argv, monkeypatch, cwd=REPO):
    from chatglm_lora import tokenize_dataset_rows

    return run(tokenize_dataset_rows, ["--chatglm_path", "tiny:chatglm-6b", "--max_seq_length", "64", *argv],
               monkeypatch, cwd)


def test_tokenize_refuses_a_folder_it_did_not_write(tmp_path, monkeypatch):
    data = tmp_path / "data"  # like the repository's data/: the user's files
    data.mkdir()
    (data / "alpaca_data.json").write_text("[]")
    (data / "notes.txt").write_text("mine")
    before = snapshot(data)
    code, stderr = tokenize(["--jsonl_path", ROWS, "--save_path", str(data)], monkeypatch)
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"error: {data}: is not empty and is not an earlier")
    assert "--overwrite" in stderr
    assert snapshot(data) == before


def test_tokenize_refuses_a_folder_that_holds_its_input(tmp_path, monkeypatch):
    folder = tmp_path / "D"
    folder.mkdir()
    shutil.copy(ROWS, folder / "rows.jsonl")
    before = snapshot(folder)
    for extra in ([], ["--overwrite"]):  # not even with --overwrite
        code, stderr = tokenize(["--jsonl_path", str(folder / "rows.jsonl"), "--save_path", str(folder), *extra],
                                monkeypatch)
        assert code == 2 and stderr.strip().splitlines()[-1] == (
            f"error: {folder}: this output folder holds an input of the run ({folder / 'rows.jsonl'}); write the "
            "output elsewhere")
        assert snapshot(folder) == before


def test_tokenize_refuses_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "mine.txt").write_text("mine")  # run from a scratch folder: a regression must not hit the repo
    code, stderr = tokenize(["--jsonl_path", ROWS, "--save_path", "."], monkeypatch, cwd=tmp_path)
    assert code == 2 and stderr.strip() == "error: .: is the current folder (or holds it); give a new folder for " \
                                           "the output"
    assert os.listdir(tmp_path) == ["mine.txt"]


def test_tokenize_replaces_its_own_earlier_output_and_overwrite_allows_a_foreign_folder(tmp_path, monkeypatch):
    out = tmp_path / "rows"
    assert tokenize(["--jsonl_path", ROWS, "--save_path", str(out)], monkeypatch)[0] == 0
    first = snapshot(out)
    assert tokenize(["--jsonl_path", ROWS, "--save_path", str(out)], monkeypatch)[0] == 0  # an earlier output
    assert snapshot(out).keys() == first.keys()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("x")
    assert tokenize(["--jsonl_path", ROWS, "--save_path", str(foreign)], monkeypatch)[0] == 2
    assert tokenize(["--jsonl_path", ROWS, "--save_path", str(foreign), "--overwrite"], monkeypatch)[0] == 0
    assert "x.txt" not in os.listdir(foreign) and "state.json" in os.listdir(foreign)


def test_process_refuses_to_write_over_its_input(tmp_path, monkeypatch):
    from llama_ner import process

    source = tmp_path / "msra.txt"
    shutil.copy(os.path.join(REPO, "tests", "malformed", "msra_clean.txt"), source)
    before = source.read_bytes()
    code, stderr = run(process, ["--in_file", str(source), "--out_file", str(source)], monkeypatch)
    assert code == 2 and "is also an input of this run" in stderr.strip().splitlines()[-1]
    assert source.read_bytes() == before


def test_merge_never_writes_into_its_base_model(tmp_path):
    from model_hub.make_tiny import tiny_dir
    from model_hub.merge_llama_with_chinese_lora import merge
    from tuning.errors import UserError

    base = tmp_path / "base"
    shutil.copytree(tiny_dir("chinese-alpaca-7b"), base)
    lora = tmp_path / "lora"
    lora.mkdir()
    before = snapshot(base)
    for out in (base, tmp_path):  # the base itself, or a folder holding it
        with pytest.raises(UserError, match="holds an input of the run"):
            merge(str(base), [str(lora)], "huggingface", str(out), overwrite=True)
    assert snapshot(base) == before


def test_merge_refuses_a_folder_with_someone_elses_weights(tmp_path):
    from model_hub.merge_llama_with_chinese_lora import merge
    from tuning.errors import UserError

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"someone else's weights")
    (out / "README.md").write_text("my project")
    with pytest.raises(UserError, match="--overwrite"):
        merge("tiny:chinese-alpaca-7b", [str(tmp_path / "lora")], "huggingface", str(out))
    assert (out / "model.safetensors").read_bytes() == b"someone else's weights"


def test_glm4_convert_refuses_an_out_dir_that_holds_the_original(tmp_path, monkeypatch):
    from model_hub import convert_glm4_to_hf

    original = tmp_path / "glm-4-9b-chat"
    original.mkdir()
    (original / "config.json").write_text("{}")
    code, stderr = run(convert_glm4_to_hf, [str(original), str(tmp_path), "--force"], monkeypatch)
    assert code == 2 and "holds an input of the run" in stderr
    assert (original / "config.json").exists()


def test_the_home_folder_is_never_replaced_not_even_with_overwrite(tmp_path, monkeypatch):
    """Issue 29, item 15: `--overwrite` on the home folder wiped .bashrc."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export PATH=...")
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(home)
    code, stderr = tokenize(["--jsonl_path", ROWS, "--save_path", str(home), "--overwrite"], monkeypatch, cwd=tmp_path)
    assert code == 2 and stderr.strip() == f"error: {home}: is your home folder (or holds it); give a new folder for " \
                                           "the output"
    assert snapshot(home) == before


def test_export_never_writes_inside_its_source_or_base(tmp_path):
    """Issue 29, item 15: OUT inside the base model folder (or the adapter's) was accepted."""
    from model_hub.export import export
    from model_hub.make_tiny import tiny_dir
    from tuning.errors import UserError

    src = tmp_path / "model"
    shutil.copytree(tiny_dir("chinese-alpaca-7b"), src)
    before = snapshot(src)
    with pytest.raises(UserError, match="is inside .*an input of this export"):
        export(str(src), str(src / "merged"))
    assert snapshot(src) == before
