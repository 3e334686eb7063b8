"""Hostile or careless inputs (issue 25, items 8 and 9) beyond the malformed-input corpus: a YAML alias bomb
is refused in one line before it expands, and an interrupted command prints "interrupted" on its own line."""
import os
import resource
import subprocess
import sys
from conftest import REPO

LEVELS = "abcdefghi"


def alias_bomb() -> str:
    """Nine lines of nested aliases: 9**9 strings once expanded (the error message's repr of it needs GBs)."""
    lines = ["data_config: {train_file: train.jsonl}", "freezeV:"]
    lines.append('  - &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]')
    for prev, name in zip(LEVELS, LEVELS[1:]):
        lines.append(f"  - &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    lines.append(f"max_input_length: *{LEVELS[-1]}")
    return "\n".join(lines) + "\n"


def _limit_memory():
    limit = 4 * 2**30  # a regression fails here instead of eating the machine's memory
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_a_yaml_alias_bomb_is_one_line_before_it_expands(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(alias_bomb())
    result = subprocess.run([sys.executable, os.path.join(REPO, "glm4_finetune", "finetune.py"),
                             os.path.join(REPO, "tests", "malformed", "glm4", "clean"), "tiny:glm-4-9b-chat",
                             str(config)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            preexec_fn=_limit_memory, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {config}:4: invalid YAML: aliases (*name) are not allowed in a config; write the value out")


INTERRUPTED = '''
from tqdm import tqdm
from tuning.errors import run_main

def main():
    bar = tqdm(total=10, desc="tokenizing")
    bar.update(3)
    raise KeyboardInterrupt

run_main(main)
'''


def test_interrupted_is_printed_on_its_own_line(tmp_path):
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 130
    assert result.stderr.endswith("\ninterrupted\n"), repr(result.stderr[-200:])
    assert "tokenizing" in result.stderr
