"""The READMEs' commands name the folders the make targets and the earlier commands write (issue 33.6: the step-by-step
used runs/llama_ner/…, the export example checkpoint/msra/…, `make llama-ner` wrote build/llama-ner/…, so a user
following the README after `make` got "not found").

Every path under build/, output/, runs/ or checkpoint/ that a README command reads must be written by a recipe's make
target (`make -n`, read here) or by an earlier command of the same README; commands that only write are exempt."""
import re
import subprocess

import pytest
from conftest import REPO
from readme_commands import READMES, commands

TARGETS = ["chatglm-alpaca", "llama-ner", "glm4-lora", "glm4-ptuning", "glm4-sft", "llama-ner-dpo", "glm4-dpo"]
PATH = re.compile(r"(?<![\w/.-])((?:build|output|runs|checkpoint)/[\w./<>-]*)")
# Flags (and make variables) whose value a command writes; the rest of its paths are read.
WRITES = re.compile(r"(?:--(?:save_dir|out_dir|out_file|output_dir|save_path|output)[= ]|OUT=|>\s*)(\S+)$")


def split_paths(command: str) -> tuple[set, set]:
    """(paths the command writes, paths it reads)."""
    written, read = set(), set()
    words = command.split()
    for i, word in enumerate(words):
        for path in PATH.findall(word):
            before = " ".join(words[max(0, i - 1):i + 1])
            is_written = WRITES.search(before) or WRITES.search(word)
            # `python -m model_hub.export SRC OUT`: the second positional folder is written
            if "model_hub.export" in command and i >= 2 and PATH.search(words[i - 1]) and not words[i - 1].startswith("-"):
                is_written = True
            (written if is_written else read).add(path.rstrip("/"))
    return written, read


def under(path: str, folders) -> bool:
    generic = re.sub(r"checkpoint-(N|<N>|\d+)", "checkpoint-N", path)
    return any(generic == f or generic.startswith(f + "/") or f.startswith(generic + "/") for f in folders)


@pytest.fixture(scope="module")
def made_by_make() -> set:
    dry = subprocess.run(["make", "-n", "-s", *TARGETS], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr[-2000:]
    folders = {p.rstrip("/") for p in PATH.findall(dry.stdout)}
    assert "build/llama-ner/train_trainer/adapter_model" in folders and "output/glm4-lora" in folders
    # Trainer checkpoints inside each output folder
    return folders | {f + "/checkpoint-N" for f in folders}


@pytest.mark.parametrize("readme", READMES)
def test_every_path_a_readme_command_reads_is_written_before(readme, made_by_make):
    text = open(f"{REPO}/{readme}", encoding="utf-8").read()
    written = set(made_by_make)
    missing = []
    for command in commands(text):
        out, inp = split_paths(command)
        missing += [f"{path}  (in: {command[:100]})" for path in sorted(inp) if not under(path, written)]
        written |= out
    assert missing == [], "\n".join(missing)


def test_the_check_finds_a_path_nothing_writes():
    """The check can fail: the export example as it was (checkpoint/msra/…) is not written by anything."""
    out, inp = split_paths("python -m model_hub.export checkpoint/msra/train_trainer/adapter_model merged-model")
    assert inp == {"checkpoint/msra/train_trainer/adapter_model"} and out == set()
    assert not under("checkpoint/msra/train_trainer/adapter_model", {"build/llama-ner/train_trainer"})
    out, inp = split_paths("python llama_ner/process.py --in_file my.txt --out_file build/my/train.txt --mode train")
    assert out == {"build/my/train.txt"} and inp == set()
