"""The shared library's readers, atomic writers and Trainer glue."""
import os

import pytest
import torch

from tuning.errors import UserError
from tuning.files import atomic_dir, atomic_file, read_json, read_jsonl, require_str
from tuning.training import check_precision, list_checkpoints, resolve_resume, save_loss_plot


def write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_read_jsonl_accepts_bom_and_crlf_and_blank_lines(tmp_path):
    path = write(tmp_path, "a.jsonl", b'\xef\xbb\xbf{"a": 1}\r\n\r\n{"a": 2}\r\n')
    assert read_jsonl(path) == [(1, {"a": 1}), (3, {"a": 2})]


@pytest.mark.parametrize("data, message", [
    (b'{"a": 1}\n{"a": \n', r"a.jsonl:2: invalid JSON"),
    (b'{"a": 1}\n[1, 2]\n', r"a.jsonl:2: expected a JSON object per line, got list"),
    (b'{"a": 1}\n{"b": "\xff"}\n', r"a.jsonl:2: not UTF-8 text \(byte 0xff\)"),
    (b"  \n", r"a.jsonl: file is empty"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, data, message):
    with pytest.raises(UserError, match=message):
        read_jsonl(write(tmp_path, "a.jsonl", data))


def test_read_json_missing_and_directory(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        read_json(str(tmp_path / "nope.json"))
    with pytest.raises(UserError, match="is a directory"):
        read_json(str(tmp_path))
    with pytest.raises(UserError, match=r"b.json:3: invalid JSON"):
        read_json(write(tmp_path, "b.json", b'[\n {"a": 1},\n {"a" 2}\n]'))


def test_require_str():
    assert require_str({"x": "hi"}, "x", "f", 1) == "hi"
    with pytest.raises(UserError, match="f:4: x: missing field"):
        require_str({}, "x", "f", 4)
    with pytest.raises(UserError, match="f:4: x: expected a string, got NoneType"):
        require_str({"x": None}, "x", "f", 4)
    with pytest.raises(UserError, match="f:4: x: empty string"):
        require_str({"x": " "}, "x", "f", 4)
    assert require_str({"x": ""}, "x", "f", 4, allow_empty=True) == ""


def test_atomic_writers_leave_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_file(str(target)) as f:
            f.write("half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    with atomic_file(str(target)) as f:
        f.write("whole")
    assert target.read_text() == "whole"
    with pytest.raises(RuntimeError):
        with atomic_dir(str(tmp_path / "ds"), "datasets") as d:
            open(os.path.join(d, "part"), "w").close()
            raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]
    with pytest.raises(UserError, match="output folder does not exist"):
        with atomic_file(str(tmp_path / "no" / "x.txt")):
            pass


def test_resume_resolution_skips_incomplete_checkpoints(tmp_path):
    for step, complete in [(5, True), (10, True), (15, False)]:
        os.makedirs(tmp_path / f"checkpoint-{step}")
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [5, 10]
    assert resolve_resume("last", str(tmp_path)).endswith("checkpoint-10")
    assert resolve_resume("5", str(tmp_path)).endswith("checkpoint-5")
    assert resolve_resume(None, str(tmp_path)) is None
    with pytest.raises(UserError, match="checkpoint-15: resume_from_checkpoint: not a complete"):
        resolve_resume("15", str(tmp_path))
    with pytest.raises(UserError, match="no complete checkpoint"):
        resolve_resume("last", str(tmp_path / "empty"))


def test_a_step_that_was_never_saved_is_said_to_not_exist(tmp_path):
    """Issue 23.6: --resume_from_checkpoint 99 named a missing folder "not a complete Trainer checkpoint"."""
    for step in (2, 4):
        os.makedirs(tmp_path / f"checkpoint-{step}")
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    missing = os.path.join(str(tmp_path), "checkpoint-99")
    with pytest.raises(UserError) as error:
        resolve_resume("99", str(tmp_path))
    assert str(error.value) == f"{missing}: resume_from_checkpoint: does not exist (saved steps: 2, 4)"
    with pytest.raises(UserError, match=r"nowhere: resume_from_checkpoint: does not exist \(saved steps: 2, 4\)"):
        resolve_resume("nowhere", str(tmp_path))


def test_the_deepspeed_loop_and_glm4_use_the_same_grammar(tmp_path):
    from tuning.training import DEEPSPEED_CHECKPOINTS

    os.makedirs(tmp_path / "global_step3")
    os.makedirs(tmp_path / ".saving-global_step6")  # a save that never finished is not a checkpoint
    assert resolve_resume("last", str(tmp_path), names=DEEPSPEED_CHECKPOINTS).endswith("global_step3")
    with pytest.raises(UserError, match=r"global_step6: resume_from_checkpoint: does not exist \(saved steps: 3\)"):
        resolve_resume("6", str(tmp_path), names=DEEPSPEED_CHECKPOINTS)
    # GLM-4's yes / no / N: nothing saved and `yes` starts fresh; a path is not part of its grammar
    assert resolve_resume("yes", str(tmp_path / "new"), paths=False, fresh_when_none_saved=True) is None
    with pytest.raises(UserError, match="expected yes, no, or a checkpoint step N > 0, got 'somewhere'"):
        resolve_resume("somewhere", str(tmp_path), paths=False)


def test_precision_rules():
    with pytest.raises(UserError, match="fp16 is not supported on CPU"):
        check_precision(fp16=True, bf16=False, use_cpu=True)
    check_precision(fp16=False, bf16=True, use_cpu=True)


def test_loss_plot_is_a_png(tmp_path):
    path = save_loss_plot([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "train_loss": 1.7}],
                          str(tmp_path / "loss.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert save_loss_plot([], str(tmp_path / "none.png")) is None


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), MemoryError()])
def test_out_of_memory_is_one_line_with_what_to_do(exc, capsys):
    from tuning.errors import OUT_OF_MEMORY, run_main

    def main():
        raise exc

    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: " + OUT_OF_MEMORY)


def test_data_notes_are_repeated_when_training_ends(capsys):
    from tuning.training import DATA_NOTES, DataNotesAtEnd, data_note

    DATA_NOTES.clear()
    data_note("train.txt: dropped 2 of 40 rows whose answer max_seq_length=16 cuts away entirely")
    assert capsys.readouterr().out.count("dropped 2 of 40") == 1
    DataNotesAtEnd().on_train_end(None, None, None)
    assert capsys.readouterr().out.splitlines() == [
        "data notes (rows dropped or cut before training):",
        "  train.txt: dropped 2 of 40 rows whose answer max_seq_length=16 cuts away entirely"]
    assert DATA_NOTES == []


def test_collective_save_publishes_only_a_complete_write(tmp_path):
    """save_collectively (the raw DeepSpeed loop's checkpoints and every recipe's final save): a write that fails
    leaves the folder as it was and no staging folder; one that succeeds replaces the files whole."""
    from tuning.checkpoints import replace_files, rotate_folders, save_collectively

    final = tmp_path / "adapter"
    final.mkdir()
    (final / "adapter_model.safetensors").write_text("old weights")
    (final / "train_args.json").write_text("{}")
    staging = tmp_path / ".saving-final"

    def failing_write():
        staging.mkdir()
        (staging / "adapter_model.safetensors").write_text("half")
        raise OSError(27, "File too large")

    finished = []
    error = save_collectively(failing_write, str(staging), lambda: finished.append(1), True)
    assert isinstance(error, OSError) and finished == [] and not staging.exists()
    assert (final / "adapter_model.safetensors").read_text() == "old weights"

    def write():
        staging.mkdir()
        (staging / "adapter_model.safetensors").write_text("new weights")

    assert save_collectively(write, str(staging), lambda: replace_files(str(staging), str(final)), True) is None
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    assert (final / "adapter_model.safetensors").read_text() == "new weights"
    assert (final / "train_args.json").read_text() == "{}"  # files the save did not write are kept

    folders = []
    for step in (2, 4, 6):
        (tmp_path / f"global_step{step}").mkdir()
        folders.append(str(tmp_path / f"global_step{step}"))
    rotate_folders(str(tmp_path), folders, 2)
    assert sorted(os.listdir(tmp_path)) == ["adapter", "global_step4", "global_step6"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_dir_output_follows_the_umask(tmp_path, umask):
    """Issue 23: tokenized dataset folders came out 0700 (mkdtemp's mode), unreadable to the group."""
    old = os.umask(umask)
    try:
        with atomic_dir(str(tmp_path / "ds"), "datasets") as d:
            open(os.path.join(d, "part"), "w").close()
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "ds").st_mode & 0o777 == 0o777 & ~umask


def test_dataloader_workers_beyond_the_cores_are_lowered(monkeypatch, capsys):
    """Issue 23 (Also): GLM-4's configs ask for 16 workers; torch warned about it at every epoch on 2 cores."""
    from tuning.distributed import cap_dataloader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cap_dataloader_workers({"dataloader_num_workers": 16, "seed": 1}) == {"dataloader_num_workers": 2, "seed": 1}
    assert capsys.readouterr().out == "note: dataloader_num_workers 16 lowered to 2, the CPU cores this process can use\n"
    for asked in ({"dataloader_num_workers": 2}, {"dataloader_num_workers": 0}, {}):
        assert cap_dataloader_workers(asked) == asked
    assert capsys.readouterr().out == ""
