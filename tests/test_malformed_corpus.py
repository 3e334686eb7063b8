"""The malformed-input corpus (tests/malformed/, manifest cases.json): every entry point of the three recipes
fed bad files, configs and flags. Each error case must end in exactly its one-line `error: ...`, exit code 2, no
traceback, and nothing written (its output folder stays empty, build/malformed/ never appears). Accepted
variants (UTF-8 BOM, CRLF line ends, extra alpaca fields) must give byte-identical output to the clean file.

Cases run in-process (the script's main through run_main with a patched argv) for speed; those marked
"subprocess" run as real processes to prove the exit code end to end. Files marked "generate" (10 MB single
lines, a bad `datasets` folder) are made at test time instead of being committed.
"""
import contextlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from tuning.errors import run_main
from conftest import REPO

CORPUS = os.path.join(REPO, "tests", "malformed")
CASES = json.load(open(os.path.join(CORPUS, "cases.json"), encoding="utf-8"))
BY_ID = {case["id"]: case for case in CASES}
SIDE_EFFECTS = os.path.join(REPO, "build", "malformed")  # glm4 output_dir of the corpus configs; "pwned" marker
TEN_MB = 10 * 2**20


def _rows_10mb(folder):
    """One 10 MB line whose string never closes."""
    with open(os.path.join(folder, "rows_10mb.jsonl"), "w", encoding="utf-8") as f:
        f.write('{"context": "' + "长" * (TEN_MB // 3))


def _alpaca_10mb(folder):
    """A 10 MB instruction on one line, and an output that is a number."""
    with open(os.path.join(folder, "alpaca_10mb.json"), "w", encoding="utf-8") as f:
        json.dump([{"instruction": "x" * TEN_MB, "input": "", "output": 5}], f)


def _msra_10mb(folder):
    """A valid 10 MB sentence (no entities): accepted and written whole."""
    with open(os.path.join(folder, "msra_10mb.txt"), "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "藏" * (TEN_MB // 3), "entity_list": []}, ensure_ascii=False) + "\n")


def _bad_seq_len(folder):
    """A saved `datasets` folder whose second row's seq_len points past its input_ids."""
    from datasets import Dataset

    Dataset.from_dict({"input_ids": [[5, 6, 7, 8], [5, 6]], "seq_len": [2, 2]}).save_to_disk(
        os.path.join(folder, "bad_seq_len"))


def _deep_json(folder):
    """JSON nested 100,000 levels deep in each kind of JSON input (json.loads raises RecursionError), and YAML
    nested 5,000 deep (so does PyYAML's composer)."""
    deep = "[" * 100_000 + "]" * 100_000
    files = {"rows_deep.jsonl": '{"context": ' + deep + ', "target": "x"}\n',
             "alpaca_deep.json": '[{"instruction": "x", "input": "", "output": ' + deep + "}]",
             "tools_deep.json": deep, "ds_deep.json": '{"zero_optimization": ' + deep + "}",
             "deep.yaml": "data_config: " + "[" * 5000 + "]" * 5000 + "\n"}
    for name, text in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)


def _symlink(folder):
    """--save_path given as a symbolic link to a folder."""
    os.makedirs(os.path.join(folder, "link_target"), exist_ok=True)
    os.symlink("link_target", os.path.join(folder, "link_to_rows"))


GENERATORS = {"rows_10mb": _rows_10mb, "alpaca_10mb": _alpaca_10mb, "msra_10mb": _msra_10mb,
              "bad_seq_len": _bad_seq_len, "deep_json": _deep_json, "symlink": _symlink}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generated")
    for make in GENERATORS.values():
        make(str(folder))
    return str(folder)


def _fill(text: str, out: str, gen: str) -> str:
    return text.replace("{out}", out).replace("{gen}", gen)


def run_case(case: dict, out: str, gen: str, monkeypatch=None) -> tuple[int, str]:
    """(exit code, stderr) of one case, run from the repository root like a user would."""
    argv = [_fill(a, out, gen) for a in case["args"]]
    env = case.get("env", {})
    if case.get("subprocess"):
        result = subprocess.run([sys.executable, os.path.join(REPO, case["script"]), *argv], cwd=REPO,
                                capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
        return result.returncode, result.stderr
    module = importlib.import_module(case["script"][:-3].replace("/", "."))
    main = getattr(module, "app", None) or module.main  # typer apps (glm4) or plain main()
    mp = monkeypatch or pytest.MonkeyPatch()
    try:
        mp.chdir(REPO)
        mp.setattr(sys, "argv", [case["script"], *argv])
        for key, value in env.items():
            mp.setenv(key, value)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                run_main(main)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        return code, err.getvalue()
    finally:
        if monkeypatch is None:
            mp.undo()


def written_files(folder: str) -> dict[str, bytes]:
    """Relative path → bytes of every file under `folder`; a saved `datasets` folder as its rows instead (its
    state.json carries a random fingerprint)."""
    found = {}
    for root, _, files in os.walk(folder):
        if "dataset_info.json" in files:
            from datasets import load_from_disk

            found[os.path.relpath(root, folder)] = json.dumps(load_from_disk(root).to_dict()).encode()
            continue
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                found[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return found


@pytest.fixture(autouse=True)
def no_side_effects():
    shutil.rmtree(SIDE_EFFECTS, ignore_errors=True)
    yield
    assert not os.path.exists(SIDE_EFFECTS), "a malformed case wrote build/malformed (output_dir or code ran)"


ERROR_CASES = [c for c in CASES if "error" in c]
ACCEPTED_CASES = [c for c in CASES if "error" not in c]


def test_corpus_size_and_manifest():
    files = [os.path.join(r, f) for r, _, fs in os.walk(CORPUS) for f in fs if f != "cases.json"]
    assert len(files) >= 30
    used = {a.split("=", 1)[-1] for c in CASES for a in c["args"]}
    for path in files:  # every committed file is exercised by some case (or is the config/adapter they use)
        rel = os.path.relpath(path, REPO)
        assert any(rel == u or os.path.dirname(rel) == u.rstrip("/") for u in used), f"{rel} is used by no case"
    assert len(BY_ID) == len(CASES)
    for case in CASES:
        assert ("error" in case) != ("accept" in case or "same_as" in case), case["id"]
        assert case.get("exit", 2) == 2 or "error" not in case


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c["id"] for c in ERROR_CASES])
def test_error_case(case, generated, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    os.makedirs(out)
    code, stderr = run_case(case, out, generated, None if case.get("subprocess") else monkeypatch)
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1] == _fill(case["error"], out, generated), stderr
    assert code == case.get("exit", 2)
    assert os.listdir(out) == [], "nothing may be written"


@pytest.mark.parametrize("case", ACCEPTED_CASES, ids=[c["id"] for c in ACCEPTED_CASES])
def test_accepted_case(case, generated, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    os.makedirs(out)
    code, stderr = run_case(case, out, generated, monkeypatch)
    assert code == 0, stderr
    got = written_files(out)
    assert got, "an accepted input must produce its output"
    if "same_as" in case:
        clean_out = str(tmp_path / "clean")
        os.makedirs(clean_out)
        monkeypatch.undo()
        assert run_case(BY_ID[case["same_as"]], clean_out, generated, monkeypatch)[0] == 0
        assert got == written_files(clean_out)


def test_debug_flag_shows_the_traceback(generated, tmp_path, monkeypatch):
    case = dict(BY_ID["alpaca_truncated"], args=BY_ID["alpaca_truncated"]["args"] + ["--debug"])
    code, stderr = run_case(case, str(tmp_path), generated, monkeypatch)
    assert code == 2 and "Traceback" in stderr and stderr.strip().splitlines()[-1] == case["error"]


def test_glm4_bom_and_crlf_read_like_the_clean_file():
    from glm4_finetune.validate import read_conversations

    clean = read_conversations(os.path.join(CORPUS, "glm4", "clean", "train.jsonl"))
    assert read_conversations(os.path.join(CORPUS, "glm4", "bom_crlf", "train.jsonl")) == clean
