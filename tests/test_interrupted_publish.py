"""Interrupt windows (issue 25, item 5): a Ctrl-C at any rename of a publish leaves a whole old or a whole new
output, never none and never a mix; what an interruption leaves aside is put back or finished by the next reader.
The interrupt is injected by wrapping the renames (os.replace and the one-step exchange)."""
import json
import os

import pytest

from tuning import publish
from tuning.checkpoints import save_pretrained_atomically
from tuning.errors import UserError
from tuning.files import atomic_dir


class InterruptAfter:
    """Wraps a rename function: the n-th rename (counted over all wrapped ones) happens, then Ctrl-C."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def wrap(self, real):
        def rename(*args, **kwargs):
            result = real(*args, **kwargs)
            self.calls += 1
            if self.calls == self.n:
                raise KeyboardInterrupt
            return result
        return rename


def interrupt_after(monkeypatch, n: int) -> InterruptAfter:
    injector = InterruptAfter(n)
    monkeypatch.setattr(os, "replace", injector.wrap(os.replace))
    monkeypatch.setattr(publish, "_exchange", injector.wrap(publish._exchange))
    return injector


def write_dataset(folder, value):
    for name in ("state.json", "dataset_info.json"):
        with open(os.path.join(folder, name), "w") as f:
            json.dump({"value": value}, f)


def dataset_value(folder):
    values = {json.load(open(os.path.join(folder, n)))["value"] for n in ("state.json", "dataset_info.json")}
    assert len(values) == 1, "a mix of two saves"
    return values.pop()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_atomic_dir_interrupted_at_any_rename_keeps_the_old_or_the_new_folder(tmp_path, monkeypatch, n):
    path = str(tmp_path / "rows")
    with atomic_dir(path, "datasets") as tmp:
        write_dataset(tmp, "old")
    injector = interrupt_after(monkeypatch, n)
    try:
        with atomic_dir(path, "datasets") as tmp:
            write_dataset(tmp, "new")
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert injector.calls >= 1
    assert os.path.isdir(path), "no folder at save_path after the interrupt"
    assert dataset_value(path) in ("old", "new")
    leftovers = [n for n in os.listdir(tmp_path) if n != "rows"]
    assert leftovers == [], f"hidden leftovers: {leftovers}"


def test_a_replacement_killed_between_two_renames_is_put_back(tmp_path, monkeypatch):
    """Where the one-step exchange is unavailable: a kill between the renames (simulated) leaves the old folder
    aside; the next writer or loader puts it back."""
    path = str(tmp_path / "rows")
    with atomic_dir(path, "datasets") as tmp:
        write_dataset(tmp, "old")
    monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    interrupt = InterruptAfter(1)
    monkeypatch.setattr(os, "replace", interrupt.wrap(os.replace))
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(path, "datasets") as tmp:
            write_dataset(tmp, "new")
    monkeypatch.undo()
    assert not os.path.exists(path)
    publish.recover_replaced(path)
    assert dataset_value(path) == "old"


def save_adapter(r: int):
    def save(folder):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump({"r": r, "lora_alpha": 32}, f)
        with open(os.path.join(folder, "adapter_model.safetensors"), "w") as f:
            f.write(f"weights of r={r}")
    return save


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_an_adapter_save_interrupted_midway_is_finished_by_the_loader(tmp_path, monkeypatch, n):
    folder = str(tmp_path / "output")
    save_pretrained_atomically(save_adapter(8), folder)
    (tmp_path / "output" / "checkpoint-1").mkdir()  # other files of the folder are left alone
    interrupt_after(monkeypatch, n)
    try:
        save_pretrained_atomically(save_adapter(16), folder)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    config = publish.read_adapter_folder(folder)  # what every adapter loader calls first
    weights = open(os.path.join(folder, "adapter_model.safetensors")).read()
    assert weights == f"weights of r={config['r']}", "weights and config of two different saves"
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors", "checkpoint-1"]


# Issue 29, item 1: the journal is read back from a folder anyone may have written; what it names is checked
# before anything is moved or deleted.
CRAFTED = {
    "absolute staged folder": lambda victim: {"staged": str(victim), "names": []},
    "staged folder up and out": lambda victim: {"staged": f"../{victim.name}", "names": []},
    "staged folder below and out": lambda victim: {"staged": f".saving-x/../../{victim.name}", "names": []},
    "staged folder not ours": lambda victim: {"staged": "mine", "names": []},
    "a name that leaves the folder": lambda victim: {"staged": ".saving-final", "names": [f"../{victim.name}"]},
    "not an object": lambda victim: [str(victim)],
}


def crafted_folder(tmp_path, journal: dict):
    victim = tmp_path / "victim"  # a folder of the user's beside the adapter folder
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "keep.txt").write_text("mine")
    folder = tmp_path / "adapter"
    save_adapter(8)(str(folder))
    (folder / ".saving-final").mkdir()
    (folder / ".saving-final" / "x").write_text("staged")
    (folder / publish.JOURNAL).write_text(json.dumps(journal))
    return folder, victim


def tree(folder) -> dict:
    return {os.path.relpath(os.path.join(root, n), folder): open(os.path.join(root, n), "rb").read()
            for root, _, files in os.walk(folder) for n in files}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_journal_is_refused_and_nothing_is_deleted(tmp_path, case):
    victim = tmp_path / "victim"
    folder, victim = crafted_folder(tmp_path, CRAFTED[case](victim))
    before_victim, before_folder = tree(victim), tree(folder)
    with pytest.raises(UserError) as refused:
        publish.read_adapter_folder(str(folder))  # what every adapter loader calls first
    message = str(refused.value)
    assert "\n" not in message and "refused" in message and publish.JOURNAL in message
    assert tree(victim) == before_victim, "the journal deleted a folder outside the output"
    assert tree(folder) == before_folder, "the refused journal moved or deleted files"


def test_a_journal_naming_a_linked_staging_folder_moves_nothing(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "adapter_config.json").write_text("the user's")
    folder = tmp_path / "adapter"
    save_adapter(8)(str(folder))
    os.symlink(victim, folder / ".saving-final")
    (folder / publish.JOURNAL).write_text(json.dumps({"staged": ".saving-final", "names": ["adapter_config.json"]}))
    with pytest.raises(UserError, match="symbolic link"):
        publish.finish_publish(str(folder))
    assert (victim / "adapter_config.json").read_text() == "the user's"


def test_export_refuses_a_crafted_journal_in_one_line(tmp_path):
    """Through a user's entry point: `python -m model_hub.export SRC OUT` with SRC holding a crafted journal."""
    from conftest import run_in_process
    from model_hub import export as export_module

    victim = tmp_path / "victim"
    folder, victim = crafted_folder(tmp_path, {"staged": str(victim), "names": []})
    before = tree(victim)
    code, _, err = run_in_process(export_module.main, [str(folder), str(tmp_path / "out")],
                                  script="python -m model_hub.export")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: {folder}: refused: {publish.JOURNAL}")
    assert tree(victim) == before
    assert not (tmp_path / "out").exists()


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run_and_others_are_named(tmp_path, capsys):
    """Issue 29, item 9: a killed export left `.OUT.xxxxxxxx` (18 GB for a 9B model), never cleaned or mentioned."""
    import socket
    import subprocess

    from tuning.files import STAGING_OWNER

    finished = subprocess.Popen(["true"])
    finished.wait()
    stale, unknown, foreign = (tmp_path / ".rows.abcd1234", tmp_path / ".rows.zzzz9999", tmp_path / ".rows.other")
    for folder in (stale, unknown, foreign):
        folder.mkdir()
        (folder / "state.json").write_text("{}")
    (stale / STAGING_OWNER).write_text(json.dumps({"pid": finished.pid, "host": socket.gethostname()}))
    (unknown / STAGING_OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # alive
    with atomic_dir(str(tmp_path / "rows"), "datasets") as tmp:
        write_dataset(tmp, "new")
        assert os.path.isfile(os.path.join(tmp, STAGING_OWNER))
    out = capsys.readouterr().out
    assert not stale.exists() and f"removed {stale}" in out
    assert unknown.exists() and f"{unknown} looks like the staging folder of another or an older run" in out
    assert foreign.exists() and str(foreign) not in out  # not a name this code gives its staging folders
    assert dataset_value(tmp_path / "rows") == "new" and not (tmp_path / "rows" / STAGING_OWNER).exists()
