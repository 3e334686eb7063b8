"""What a command prints is the project's own (issue 33, item 1): library lines a user can do nothing about are
silenced where they start, so a one-line error stays one line and a printed result stays the only line, on CPUs
with and without AVX-512 alike (bitsandbytes warns only where AVX512_BF16 is present, DeepSpeed on every CPU)."""
import subprocess
import sys

from conftest import REPO


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_importing_the_training_stack_prints_nothing():
    result = run("import tuning, peft, bitsandbytes, deepspeed, transformers; "
                 "from bitsandbytes.nn import Linear4bit")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (result.stdout, result.stderr) == ("", "")


def test_a_printed_result_is_the_only_line():
    result = run("from bench.common import PACKAGES; import deepspeed; print(len(PACKAGES))")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "8\n" and result.stderr == ""


def test_other_library_messages_still_show():
    """Only the two known lines are dropped: another warning of the same loggers still reaches the user."""
    result = run("import tuning, logging; logging.basicConfig(); "
                 "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another bitsandbytes warning')")
    assert "another bitsandbytes warning" in result.stderr
