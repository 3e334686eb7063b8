"""Every command of the READMEs' bash blocks runs as written, in the README's order, after the make targets (issue 33).

Where: a copy of the tracked files in a temporary folder (the developer's build/, output/ and data/ stay untouched),
with .venv, build/tiny, build/tokenizers and build/vllm-venv linked in and PYTHONPATH on the copy (what the copy's own
`make setup` would install). The commands run through bash with the venv's bin/ first on PATH, as in an activated venv.

How each command is checked (every command runs as written and must exit 0 unless listed below):
- make targets: once each (module fixture), before the commands of the first README that names them; the tiny
  demos' sizes are cut in the copy (BUDGET_CUTS: 2 training steps, a few generated answers) so every step of each
  target still runs within the time budget; BUDGET_PARSED_TARGETS are only `make -n`, each with its reason;
- servers: started as written, probed on 127.0.0.1 (the README's curl lines against the first API server) and stopped
  with SIGTERM, which must end them with exit code 0;
- PARSE_ONLY (each with its reason: real weights, GPUs, other nodes, placeholders, the user's own files, or the time
  budget): `make -n`, or the program's --help must exit 0 and list every --flag the command uses;
- SKIPPED: tools that are not part of this repository, with the reason.
"""
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from conftest import REPO
from readme_commands import READMES, readme_commands

# slow: the make targets train; the timeout bounds the whole README (each command has its own, TIMEOUT)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# (pattern, reason): the command is only parsed (make -n / --help lists its flags). First match wins.
PARSE_ONLY = [
    (r"^make test$", "the whole suite, this test included"),
    (r"MODEL_DIR=|/data/|/path/to/|\./7B-hf|--input_dir \./llama", "real weights (a placeholder path the user fills in)"),
    (r"\s\.\.\.(\s|$)", "`...` stands for the recipe's other flags"),
    (r"--nproc_per_node 8|--num_gpus 8|--nnodes 2|--hostfile", "8 GPUs or several nodes"),
    (r"\bOUT\b(?!=build/)|ADAPTER1|\sMODEL_DIR\s|tools\.json", "a placeholder the user fills in"),
    (r"glm4_finetune/inference\.py output\b", "`output` is what the real configs/*.yaml train (real weights)"),
    (r"AdvertiseGen/train\.json", "the full AdvertiseGen download (the internet); data/ vendors its sample"),
    (r"my_ner|my\.jsonl|my_data/", "the user's own data file"),
    (r"^python -m serving\.vllm", "vLLM's server needs minutes to start on a CPU; tests/test_vllm.py serves through it"),
    # the time budget: what other tests run, or what a make target here runs already
    (r"^torchrun --nproc_per_node 1 llama_ner/train_deepspeed\.py", "DeepSpeed compiles its CPU ops on a first run "
     "(1-2 min); tests/test_llama_ner_e2e.py runs this loop"),
    (r"^python llama_ner/train_trainer\.py .*--max_steps=40", "40 training steps (minutes on 2 busy cores); make "
     "llama-ner runs this script, tests/test_llama_ner_e2e.py trains, resumes and reloads with it"),
    (r"^python llama_ner/(test|predict|chat_ner)\.py .*by_hand", "reads build/llama-ner/by_hand/, which only the "
     "40-step run above writes; make llama-ner runs test.py and predict.py, tests/test_llama_ner_e2e.py chat_ner.py"),
]
SKIPPED = [
    (r"^(python )?llama\.cpp/", "llama.cpp is a separate checkout (tests/test_export_gguf.py runs its converter)"),
]
SERVERS = {r"python -m serving\.api": "/health", r"make web-demo|python -m serving\.web_demo": "/"}
DEFAULT_PORT = {"serving.api": 8000, "web_demo": 7860, "web-demo": 7860}
# The tiny demos' sizes, cut in the copy only (each pattern must match once): every step of every target still runs,
# for 2 training steps and a few generated answers.
BUDGET_CUTS = {
    "chatglm_lora/recipe.mk": [(r"--max_steps 40 --save_steps 20", "--max_steps 2 --save_steps 2"),
                               (r"1e-2 --logging_steps 5", "1e-2 --logging_steps 1"),
                               (r"alpaca_data\.json --num 3", "alpaca_data.json --num 1"),
                               (r"sed -n 2001,2006p", "sed -n 2001,2002p")],
    "llama_ner/recipe.mk": [(r"--max_steps=40 --save_steps=20 --log_steps=5", "--max_steps=2 --save_steps=2 --log_steps=1"),
                            (r"--eval_rows=24 ", "--eval_rows=2 ")],
    "glm4_finetune/recipe.mk": [(r"GLM4_DEV_ROWS := 8", "GLM4_DEV_ROWS := 2")],
    "preference/recipe.mk": [(r"--max_steps=20 --save_steps=10 --log_steps=2", "--max_steps=2 --save_steps=2 --log_steps=1")],
    **{f"glm4_finetune/configs/tiny/{name}.yaml": [(r"max_steps: 40", "max_steps: 2"), (r"save_steps: 20", "save_steps: 2"),
                                                   (r"eval_steps: 40", "eval_steps: 2"), (r"logging_steps: 5", "logging_steps: 1")]
       for name in ("lora", "ptuning_v2", "sft")},
}
# Make targets only parsed (make -n), to keep this test within its time budget.
BUDGET_PARSED_TARGETS = {
    "glm4-ptuning": "the glm4 recipe of make glm4-lora (which runs) with P-tuning v2; tests/test_glm4_e2e.py trains it",
    "glm4-sft": "the glm4 recipe of make glm4-lora (which runs) with full SFT; tests/test_glm4_e2e.py trains it",
    "glm4-dpo": "DPO on GLM-4's 151k vocabulary takes ~1 min a step on 2 cores; tests/test_preference.py trains it",
}
LINKED = [".venv", "build/tiny", "build/tokenizers", "build/vllm-venv"]
TIMEOUT = 600


def first_match(table, command: str):
    return next((reason for pattern, reason in table if re.search(pattern, command)), None)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A fresh checkout-like copy: the tracked files (their modification times kept, so the venv's stamp stays
    current and make never re-installs into the shared .venv) plus links to what is built once per machine."""
    root = tmp_path_factory.mktemp("readme") / "repo"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in filter(None, tracked.stdout.split("\0")):
        if os.path.isfile(os.path.join(REPO, name)):
            os.makedirs(root / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), root / name, follow_symlinks=False)
    for name in LINKED:
        if os.path.exists(os.path.join(REPO, name)):
            os.makedirs(root / os.path.dirname(name), exist_ok=True) if os.path.dirname(name) else None
            os.symlink(os.path.join(REPO, name), root / name)
    if subprocess.run(["make", "-q", ".venv/.installed"], cwd=root).returncode != 0:
        pytest.skip("the venv is older than requirements/ (run `make setup`): make would re-install into it")
    for name, cuts in BUDGET_CUTS.items():
        text = (root / name).read_text(encoding="utf-8")
        for pattern, replacement in cuts:
            text, count = re.subn(pattern, replacement, text)
            assert count == 1, f"{name}: {pattern!r} not found once; update BUDGET_CUTS"
        (root / name).write_text(text, encoding="utf-8")
    return root


def bash(command: str, cwd, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """The command as a user types it into bash in `cwd` (stdin closed: an interactive prompt ends at once)."""
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=shell_env(cwd), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def shell_env(root) -> dict:
    venv_bin = os.path.join(root, ".venv", "bin")
    return {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "VIRTUAL_ENV": os.path.join(root, ".venv"),
            "PYTHONPATH": str(root)}


def tail(result) -> str:
    return f"exit {result.returncode}\n{(result.stdout + result.stderr)[-3000:]}"


class MakeTargets:
    """Each make target runs once in the checkout; a README naming it again gets the first result."""

    def __init__(self, root):
        self.root, self.results = root, {}

    def run(self, target: str) -> subprocess.CompletedProcess:
        if target not in self.results:
            dry = "-n " if target in BUDGET_PARSED_TARGETS else ""
            started = time.monotonic()
            self.results[target] = bash(f"make {dry}{target}", self.root)
            print(f"make {dry}{target}: {time.monotonic() - started:.0f} s")
        return self.results[target]


@pytest.fixture(scope="module")
def make_targets(checkout):
    return MakeTargets(checkout)


@pytest.fixture(scope="module")
def help_texts() -> dict:
    """program → its --help run, shared by the READMEs (most scripts appear in two)."""
    return {}


def help_lists_flags(command: str, root, cache: dict) -> str | None:
    """None when the command parses: `make -n` for make, else its program's --help lists every --flag it uses."""
    words = command.split(" -- ")[0].split()  # after a bare --: another program's flags (vLLM's)
    while words and re.match(r"^\w+=", words[0]):
        words.pop(0)
    if words[0] == "make":
        result = bash(re.sub(r"(^|\s)make\s", r"\1make -n ", command, count=1), root, timeout=60)
        return None if result.returncode == 0 else f"make -n: {tail(result)}"
    programs = []  # (program, its flags): a launcher's own and its script's
    if words[0] in ("torchrun", "deepspeed"):
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        programs += [(words[0], words[1:script]), (f"python {words[script]}", words[script + 1:])]
    elif words[:2] == ["python", "-m"]:
        programs.append((" ".join(words[:3]), words[3:]))
    else:
        programs.append((" ".join(words[:2]), words[2:]))
    for program, args in programs:
        if program not in cache:
            cache[program] = bash(f"{program} --help", root, timeout=120)
        result = cache[program]
        if result.returncode != 0:
            return f"{program} --help: {tail(result)}"
        missing = [flag for flag in (a.split("=")[0] for a in args if a.startswith("--"))
                   if not re.search(re.escape(flag) + r"(?![\w-])", result.stdout)]
        if missing:
            return f"{program} --help does not list {missing}"
    return None


class ServerFailed(Exception):
    pass


class RunningServer:
    """A README's server command in its own process group, until /health (or its page) answers."""

    def __init__(self, command: str, root, path: str):
        port = re.search(r"--port (\d+)", command)
        self.port = int(port.group(1)) if port else next(p for k, p in DEFAULT_PORT.items() if k in command)
        if is_listening(self.port):
            raise ServerFailed(f"127.0.0.1:{self.port} is taken by another program; the README's command needs it")
        self.command, self.log = command, open(os.path.join(root, f"server-{self.port}.log"), "w+")
        assignments = re.match(r"((?:\w+=\S+\s+)*)(.*)", command)  # `KEY=value python …`: exec takes no assignment
        env = {**shell_env(root), **dict(a.split("=", 1) for a in assignments.group(1).split())}
        self.process = subprocess.Popen(["bash", "-c", f"exec {assignments.group(2)}"], cwd=root, env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}{path}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.process.poll() is None:
            if self.status(self.url) is not None:
                return
            time.sleep(0.5)
        self.stop()
        raise ServerFailed(f"did not answer {self.url}:\n{self.output()}")

    @staticmethod
    def status(url: str, headers: dict | None = None) -> int | None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self) -> int:
        """SIGTERM to the server itself (under make: make's child, so make reports how it ended)."""
        if self.process.poll() is None:
            children = f"/proc/{self.process.pid}/task/{self.process.pid}/children"
            pids = open(children).read().split() if self.command.startswith("make") and os.path.exists(children) else []
            for pid in pids or [self.process.pid]:
                os.kill(int(pid), signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()


def is_listening(port: int) -> bool:
    return RunningServer.status(f"http://127.0.0.1:{port}/") is not None


def probe(server: RunningServer, command: str, curl_lines: list[str], root) -> str | None:
    """None when the server answers as the README says: the curl lines as written against the first API server on
    :8000, else its health / page (and, with an API key, 401 without and 200 with the key)."""
    if "serving.api" in command and server.port == 8000 and "SERVING_API_KEY" not in command:
        result = bash("set -e\n" + "\n".join(curl_lines) + '\necho "model: $MODEL"', root, timeout=120)
        if result.returncode != 0 or '"choices"' not in result.stdout:
            return f"curl lines: {tail(result)}"
        return None
    key = re.search(r"SERVING_API_KEY=(\S+)", command)
    if key:
        models = f"http://127.0.0.1:{server.port}/v1/models"
        codes = server.status(models), server.status(models, {"Authorization": f"Bearer {key.group(1)}"})
        return None if codes == (401, 200) else f"/v1/models without / with the key: {codes}, expected (401, 200)"
    code = server.status(server.url)
    return None if code == 200 else f"{server.url}: {code}"


def run_command(command: str, root, make_targets: MakeTargets, curl_lines: list[str]) -> str | None:
    """None when the README command did what it says; else why not."""
    path = next((p for pattern, p in SERVERS.items() if re.search(pattern, command)), None)
    if path:
        return run_server(command, root, path, curl_lines)
    if re.fullmatch(r"make [\w-]+( && make [\w-]+)*", command):
        for target in re.findall(r"make ([\w-]+)", command):
            if target == "vllm-setup" and bash("make -q vllm-setup", root, timeout=60).returncode != 0:
                return None if bash("make -n vllm-setup", root, 60).returncode == 0 else "make -n vllm-setup failed"
            result = make_targets.run(target)
            if result.returncode != 0:
                return f"make {target}: {tail(result)}"
        return None
    result = bash(command, root)
    return None if result.returncode == 0 else tail(result)


def run_server(command: str, root, path: str, curl_lines: list[str]) -> str | None:
    """Start, probe, SIGTERM: None when it answered as the README says and then exited with 0."""
    try:
        server = RunningServer(command, root, path)
    except ServerFailed as failure:
        return str(failure)
    try:
        failure = probe(server, command, curl_lines, root)
    finally:
        code = server.stop()
    if failure is None and code != 0:
        failure = f"exit {code} after SIGTERM:\n{server.output()}"
    return failure


def is_training_target(command: str) -> bool:
    return (re.fullmatch(r"make [\w-]+( && make [\w-]+)*", command) is not None and "vllm-setup" not in command
            and not first_match(PARSE_ONLY, command) and not any(re.search(p, command) for p in SERVERS))


def remove_what_other_readmes_wrote(root):
    """Each README starts from the checkout and the make targets' outputs: an earlier README's `merged-model`,
    hostfile… would make its commands meet files they never wrote."""
    kept = {os.path.basename(p) for p in LINKED} | {"build", "output"}
    tracked = {name.split("/")[0] for name in subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True,
                                                             text=True, check=True).stdout.split()}
    for name in os.listdir(root):
        if name not in kept | tracked:
            path = os.path.join(root, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


@pytest.mark.parametrize("readme", READMES)
def test_every_readme_command_runs_as_written(readme, checkout, make_targets, help_texts, record_property):
    started = time.monotonic()
    listed = readme_commands(os.path.join(REPO, readme))
    curl_lines = [c for c in listed if c.startswith(("curl", "MODEL=$(curl"))]
    remove_what_other_readmes_wrote(checkout)
    failures, ran, parsed = [], [], []
    # the make targets first: the README's commands follow them (`make llama-ner` before serving its adapter)
    for command in filter(is_training_target, listed):
        for target in re.findall(r"make ([\w-]+)", command):
            make_targets.run(target)
    for command in listed:
        command_started = time.monotonic()
        if command in curl_lines:
            continue  # run by probe() against the server before them
        if first_match(SKIPPED, command):
            continue
        if first_match(PARSE_ONLY, command):
            failure = help_lists_flags(command, checkout, help_texts)
            parsed.append(command)
        else:
            failure = run_command(command, checkout, make_targets, curl_lines)
            ran.append(command)
        if failure:
            failures.append(f"$ {command}\n{failure}")
        print(f"{time.monotonic() - command_started:6.1f} s  {command[:100]}")
    record_property("seconds", round(time.monotonic() - started))
    print(f"{readme}: ran {len(ran)}, parsed {len(parsed)} in {time.monotonic() - started:.0f} s")
    assert not failures, "\n\n".join(failures)


def test_every_listed_exception_still_names_a_readme_command():
    """A PARSE_ONLY / SKIPPED entry that matches no README command any more is stale: the command it excused
    changed, and the new one may run as written."""
    listed = [c for readme in READMES for c in readme_commands(os.path.join(REPO, readme))]
    stale = [pattern for pattern, _ in PARSE_ONLY + SKIPPED if not any(re.search(pattern, c) for c in listed)]
    assert stale == []
    assert all(target in " ".join(listed) for target in BUDGET_PARSED_TARGETS)


def test_the_checks_catch_a_command_that_does_not_parse_or_fails(tmp_path):
    """The checks can fail: an unknown flag, an unknown make target, a command that exits non-zero."""
    shutil.copy(os.path.join(REPO, "Makefile"), tmp_path / "Makefile")
    assert "no_such_flag" in help_lists_flags("python -m model_hub.export A B --no_such_flag 1", REPO, {})
    assert help_lists_flags("python -m model_hub.export A B --dtype bf16", REPO, {}) is None
    assert "make -n" in help_lists_flags("make no-such-target", tmp_path, {})
    assert run_command("ls no-such-file", tmp_path, MakeTargets(tmp_path), []).startswith("exit 2")
