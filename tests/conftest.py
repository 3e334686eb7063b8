"""Shared test setup and helpers: offline, deterministic, few threads (2 cores, maybe shared with a parallel worker).

Helpers every test file uses (import them with `from conftest import REPO, run_script, run_in_process`):
- `REPO`: the repository root; `run_script(path, *args)`: a script of the repository in a new Python process, from
  the repository root as a user types it → CompletedProcess (returncode, stdout, stderr);
- `run_in_process(main, argv)`: a script's `main` (or typer app) through `tuning.errors.run_main` in this process
  → (exit code, stdout, stderr);
- the `tiny_model` fixture: the folder of a tiny model (built once, then cached in build/tiny/).
"""
import contextlib
import io
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The cores shared among the parallel workers (`make test`: pytest -n 2 on 2 cores → 1 thread each): more threads
# than cores makes OpenMP's threads wait on each other.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", 0)) or max(1, min(2, (os.cpu_count() or 1) // WORKERS)))

TEST_THREADS = torch.get_num_threads()
# Child processes (scripts as a user types them, make targets, servers) get the same count unless a test says
# otherwise: next to the other worker, a child with 2 threads made OpenMP's threads wait on each other (measured:
# a tiny chatglm_lora run 11.1 s / 8.3 s CPU with 1 thread, 12.7 s / 10.4 s with 2), and a child compared
# bit-exactly with an in-process run needs the same reduction order.
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))


@pytest.fixture(autouse=True)
def _same_torch_threads_for_every_test():
    """A test that changes torch's thread count (a bench or launcher called in-process) must not hand it on: bit-exact
    comparisons between an in-process run and a child process depend on the same reduction order."""
    yield
    if torch.get_num_threads() != TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden")


def run_script(script: str, *args, env: dict | None = None, cwd: str = REPO, timeout: float = 900,
               check: bool = False) -> subprocess.CompletedProcess:
    """`python REPO/script args…` from `cwd`; `check` asserts exit code 0 and shows the end of stderr if not."""
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], capture_output=True,
                            text=True, cwd=cwd, timeout=timeout, env=None if env is None else {**os.environ, **env})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_in_process(main, argv: list[str], script: str = "script.py") -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `run_main(main)` with sys.argv = [script, *argv], in this process."""
    from tuning.errors import run_main

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = [script, *map(str, argv)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run_main(main)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return code, out.getvalue(), err.getvalue()


# DeepSpeed JIT-compiles its CPU ops on first use (~2.5 min for the three on 2 cores). `make test` builds them before
# the suite (`make deepspeed-ops`); a bare `pytest` that collects DeepSpeed tests starts the same build in one
# background process (one compiler job) while the first test files run: a test that needs an op before it is ready
# waits on torch's build lock. With the ops cached this costs one import of DeepSpeed.
_deepspeed_build = None


def pytest_collection_finish(session):
    global _deepspeed_build
    if not any(item.get_closest_marker("distributed") for item in session.items):
        return
    _deepspeed_build = subprocess.Popen([sys.executable, "-m", "tuning.deepspeed_ops"], cwd=REPO,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pytest_sessionfinish(session):
    if _deepspeed_build is not None:  # never killed mid-build: torch's build lock would be left behind
        _deepspeed_build.wait(timeout=900)


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model(NAME) → the folder of the tiny twin of a registered model (built once, cached in build/tiny/)."""
    from model_hub.make_tiny import tiny_dir

    return tiny_dir


@pytest.fixture(scope="session")
def golden_dir():
    return GOLDEN


@pytest.fixture(scope="session")
def glm4_tokenizer():
    """The real GLM-4-9B-chat tokenizer (built once into build/tokenizers by model_hub.glm4.tokenizer)."""
    from model_hub.glm4.tokenizer import load_glm4_tokenizer

    return load_glm4_tokenizer()


@pytest.fixture(scope="session")
def glm4_tool_call_model():
    """Folder of a tiny GLM-4 the glm4 recipe overfitted on one tool-call conversation (tests/serving_support.py);
    trained once into build/serving/glm4-tool-call, reused by later runs (serving and web-demo tests)."""
    from serving_support import glm4_tool_call_model as build

    from model_hub import BUILD_DIR

    return build(BUILD_DIR)
