"""Interrupt windows (issue 25, item 5): a Ctrl-C at any rename of a publish leaves a whole old or a whole new
output, never none and never a mix; what an interruption leaves aside is put back or finished by the next reader.
The interrupt is injected by wrapping the renames (os.replace and the one-step exchange)."""
import json
import os

import pytest

from tuning import publish
from tuning.checkpoints import save_pretrained_atomically
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
