"""Test helpers for serving/: a live `python -m serving.api` process on 127.0.0.1, raw HTTP requests, and the
tiny GLM-4 overfitted on one tool-call conversation by the glm4 recipe (built once, cached under build/)."""
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from conftest import REPO



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m serving.api ARGS` on a free 127.0.0.1 port; waits (bounded) until /health answers."""

    def __init__(self, *args: str, env: dict | None = None, startup_seconds: float = 120):
        self.start(lambda port: [sys.executable, "-m", "serving.api", "--port", str(port), *args], "serving-test",
                   env or {}, startup_seconds)

    def start(self, command, log_name: str, env: dict, startup_seconds: float, poll: float = 0.2):
        """Run `command(port)` with its output in build/LOG_NAME-PORT.log; return once /health answers."""
        self.port = free_port()
        os.makedirs(os.path.join(REPO, "build"), exist_ok=True)
        self.log = open(os.path.join(REPO, "build", f"{log_name}-{self.port}.log"), "w+", encoding="utf-8")
        self.process = subprocess.Popen(command(self.port), cwd=REPO,
                                        env={**os.environ, "PYTHONPATH": REPO, **env},
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()[-5000:]}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(poll)
        self.stop()
        raise RuntimeError(f"server did not start in {startup_seconds} s:\n{self.output()[-5000:]}")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60):
        """(status, lower-cased headers, parsed JSON or text). `body`: bytes as is, anything else as JSON."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            connection.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                                 **(headers or {})})
            response = connection.getresponse()
            raw = response.read().decode("utf-8", "replace")
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError:
                parsed = raw
            return response.status, {k.lower(): v for k, v in response.getheaders()}, parsed
        finally:
            connection.close()

    def health(self) -> dict:
        return self.request("GET", "/health")[2]

    def wait_idle(self, seconds: float = 30) -> dict:
        for _ in range(int(seconds / 0.05)):
            health = self.health()
            if health["active"] == 0 and health["waiting"] == 0:
                return health
            time.sleep(0.05)
        raise AssertionError(f"server still busy: {self.health()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


# One tool-call conversation (GLM-4's own format: the call is "NAME\n{arguments}" after <|assistant|>).
WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "查询城市天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}},
                   "required": ["city"]}}}]
WEATHER_QUESTION = "上海今天天气怎么样？"
WEATHER_CALL = {"name": "get_weather", "arguments": {"city": "上海"}}
TOOL_MODEL_VERSION = "5"


def glm4_tool_call_model(build_dir: str) -> str:
    """A tiny GLM-4 fully fine-tuned (glm4_finetune/finetune.py, SFT) on one tool-call conversation until it
    emits the call; cached in build_dir/serving/glm4-tool-call (rebuilt when TOOL_MODEL_VERSION changes).

    combine: False (every assistant turn trained). The original's combine: True never trained the first token after
    <|assistant|> — for a tool call, the first piece of the function's name; the recipe now does by default."""
    import fcntl

    out = os.path.join(build_dir, "serving", "glm4-tool-call")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers: one builds, the others wait and reuse it
        stamp = os.path.join(out, "tool_model_version")
        if not (os.path.isfile(stamp) and open(stamp).read() == TOOL_MODEL_VERSION):
            _train_tool_call_model(out)
    return out


def _train_tool_call_model(out: str) -> None:
    import yaml

    from glm4_finetune.finetune import finetune

    work = out + ".building"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "data"))
    conversation = {"messages": [
        {"role": "system", "content": "", "tools": WEATHER_TOOLS},
        {"role": "user", "content": WEATHER_QUESTION},
        {"role": "assistant", "metadata": WEATHER_CALL["name"],
         "content": json.dumps(WEATHER_CALL["arguments"], ensure_ascii=False)}]}
    with open(os.path.join(work, "data", "train.jsonl"), "w", encoding="utf-8") as f:
        f.write(json.dumps(conversation, ensure_ascii=False) + "\n")
    config = {
        "data_config": {"train_file": "train.jsonl", "num_proc": 1},
        "combine": False, "freezeV": True, "weights_dtype": "fp32", "max_input_length": 512, "max_output_length": 32,
        "training_args": {
            "output_dir": os.path.join(work, "model"), "max_steps": 8, "learning_rate": 5e-3, "bf16": False,
            "per_device_train_batch_size": 1, "dataloader_num_workers": 0, "remove_unused_columns": False,
            "save_strategy": "no", "logging_steps": 5, "use_cpu": True, "report_to": "none", "seed": 42,
            "log_level": "warning", "disable_tqdm": True, "generation_config": {"max_new_tokens": 32}},
    }
    config_file = os.path.join(work, "sft.yaml")
    with open(config_file, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, allow_unicode=True)
    finetune(os.path.join(work, "data"), "tiny:glm-4-9b-chat", config_file)
    with open(os.path.join(work, "model", "tool_model_version"), "w") as f:
        f.write(TOOL_MODEL_VERSION)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(os.path.join(work, "model"), out)
    shutil.rmtree(work, ignore_errors=True)
