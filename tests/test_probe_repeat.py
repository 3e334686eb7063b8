"""The probe of issue 29, repeated and bounded: its load loop against a live `python -m serving.api` and its kill loop
against `python -m model_hub.export`, mixed as a user's neighbours would mix them.

Each item of the issue has its own test elsewhere (tests/test_serving_api.py, tests/test_interrupted_publish.py, …);
this file checks that together, round after round, they still hold: the server stays up and answers every normal
client with its greedy answer, every hostile request gets its 4xx in OpenAI's shape, no slot leaks, the log stays
small; and an export killed at any moment leaves the user's source, their other files and their earlier export as
they were. Loops are bounded in count and in time."""
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO
from serving_support import Server

pytestmark = pytest.mark.slow
MODEL = "tiny:chinese-alpaca-7b"
PROMPT = "介绍一下北京"
ROUNDS = 3
ROUND_SECONDS = 60  # each round's clients must all be done by then
NORMAL = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 12}
HOSTILE = [  # (body, extra headers, expected status)
    (b"[" * 5000, {}, 400),                                                      # nested too deeply
    (b'{"model": "x", "seed": ' + b"9" * 5000 + b"}", {}, 400),                  # a 5,000-digit integer
    (b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\\ud800"}]}', {}, 400),
    ({**NORMAL, "seed": 2**70}, {}, 400),
    ({**NORMAL, "stop": ["x" * 300]}, {}, 400),
    ({**NORMAL, "messages": [{"role": "user", "content": "天" * 60_000}]}, {}, 413),  # over --max_body_mb
    (NORMAL, {"Host": "attacker.example"}, 400),                                   # DNS rebinding
    (NORMAL, {"Origin": "http://attacker.example"}, 403),                          # a web page
    (NORMAL, {"Content-Type": "text/plain"}, 415),                                 # a "simple" cross-site POST
]


def post(server: Server, body, headers=None):
    """(status, parsed body) of one POST /v1/chat/completions."""
    status, _, answer = server.request("POST", "/v1/chat/completions", body, headers, timeout=ROUND_SECONDS)
    return status, answer


def stream_text(port: int, body: dict) -> str:
    """The streamed answer's text, read to [DONE]."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=ROUND_SECONDS)
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}).encode(),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        text = []
        for line in response:
            line = line.decode().strip()
            if line == "data: [DONE]":
                return "".join(text)
            if line.startswith("data: "):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                text.append(delta.get("content") or "")
        raise AssertionError("the stream ended without [DONE]")
    finally:
        connection.close()


def hang_up(port: int, body: dict, after_first_chunk: bool) -> None:
    """A client that goes away: after the first streamed chunk, or right after sending a non-streamed request."""
    with socket.create_connection(("127.0.0.1", port), timeout=ROUND_SECONDS) as connection:
        data = json.dumps({**body, "max_tokens": 200, "stream": after_first_chunk}).encode()
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        if after_first_chunk:
            assert connection.recv(4096).startswith(b"HTTP/1.1 200")


def half_open(port: int) -> socket.socket:
    """A slowloris connection: a request head that never ends."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return connection


def one_round(server: Server, expected: str) -> list[str]:
    """Every kind of client at once; returns what went wrong (empty: nothing)."""
    problems, lock, port = [], threading.Lock(), server.port

    def client(name, work):
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - every failure is a finding of the round
            with lock:
                problems.append(f"{name}: {type(exc).__name__}: {exc}")

    def normal_stream():
        got = stream_text(port, NORMAL)
        assert got == expected, f"answer {got!r} != {expected!r}"

    def tiny_temperature():
        status, body = post(server, {**NORMAL, "temperature": 1e-30})
        assert status == 200 and body["choices"][0]["message"]["content"] == expected, body

    def hostile(body, headers, status):
        def work():
            got, answer = post(server, body, headers)
            assert got == status and set(answer["error"]) == {"message", "type", "param", "code"}, (got, answer)
        return work

    loris = [half_open(port) for _ in range(8)]
    try:
        jobs = [(f"normal {i}", normal_stream) for i in range(4)]
        jobs += [(f"temperature 1e-30 {i}", tiny_temperature) for i in range(2)]
        jobs += [("hangs up mid-stream", lambda: hang_up(port, NORMAL, True)),
                 ("hangs up before the answer", lambda: hang_up(port, NORMAL, False))]
        jobs += [(f"hostile {i}", hostile(*case)) for i, case in enumerate(HOSTILE)]
        threads = [threading.Thread(target=client, args=job, daemon=True) for job in jobs]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + ROUND_SECONDS
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        problems += [f"{name}: still running after {ROUND_SECONDS} s"
                     for (name, _), thread in zip(jobs, threads) if thread.is_alive()]
    finally:
        for connection in loris:
            connection.close()
    return problems


def test_the_server_stays_up_and_answers_everyone_alone_under_rounds_of_hostile_neighbours():
    server = Server("--model", MODEL, "--max_batch", "8", "--max_queue", "16", "--max_body_mb", "0.1",
                    "--header_timeout", "1", "--max_connections", "64", "--max_tokens", "200")
    try:
        status, body = post(server, NORMAL)
        assert status == 200, body
        expected = body["choices"][0]["message"]["content"]
        assert expected
        for round_number in range(ROUNDS):
            problems = one_round(server, expected)
            assert not problems, f"round {round_number + 1}: " + "\n".join(problems)
            idle = server.wait_idle(10)  # the clients that hung up were freed, nothing runs on
            assert idle["status"] == "ok"
            started = time.monotonic()
            assert server.health()["status"] == "ok" and time.monotonic() - started < 2
        log = server.output()
        assert "Traceback" not in log and len(log) < 200_000
        assert log.count("sent no complete request head") <= 1  # each condition logged once, not per connection
    finally:
        code = server.stop()
    assert code == 0


# --- the kill loop: exports killed at every stage, nothing of the user's lost ------------------------------------

def tree_digest(folder) -> dict:
    """relative path → sha256 of every file under `folder` (links as their target's text)."""
    digest = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            key = os.path.relpath(path, folder)
            if os.path.islink(path):
                digest[key] = "link:" + os.readlink(path)
            else:
                with open(path, "rb") as f:
                    digest[key] = hashlib.sha256(f.read()).hexdigest()
    return digest


def export_dtype(out) -> str:
    """The dtype of a complete export (every shard of its index present and readable), else an AssertionError."""
    from safetensors import safe_open

    with open(os.path.join(out, "model.safetensors.index.json"), encoding="utf-8") as f:
        shards = set(json.load(f)["weight_map"].values())
    dtypes = set()
    for shard in shards:
        with safe_open(os.path.join(out, shard), "pt") as f:
            dtypes |= {str(f.get_slice(key).get_dtype()) for key in f.keys()}
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        config_dtype = json.load(f)["dtype"]
    assert len(dtypes) == 1, dtypes
    return f"{dtypes.pop()}/{config_dtype}"


def start_export(src, out, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "model_hub.export", str(src), str(out), "--max_shard_size",
                             "100KB", *args], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_exports_killed_at_any_moment_leave_the_users_files_and_earlier_export_as_they_were(tmp_path):
    import shutil

    from model_hub.make_tiny import tiny_dir
    from tuning.files import STAGING_OWNER

    src = tmp_path / "my-model"
    shutil.copytree(tiny_dir("chinese-alpaca-7b"), src)
    (src / "NOTES.md").write_text("my notes\n", encoding="utf-8")
    (tmp_path / "keep.txt").write_text("the user's file beside OUT\n", encoding="utf-8")
    out = tmp_path / "exported"
    first = start_export(src, out, "--dtype", "fp32")
    assert first.wait(timeout=300) == 0, first.stdout.read()[-3000:]
    before_src, before_out = tree_digest(src), tree_digest(out)
    old = export_dtype(out)
    outcomes = []
    # killed at different moments of a re-export (bf16) over the earlier one: at once, while it writes the staging
    # folder, later in it
    for delay in (0.0, 0.05, 0.3, 1.0):
        proc = start_export(src, out, "--dtype", "bf16", "--overwrite")
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if any(name.startswith(".exported.") and os.path.exists(tmp_path / name / STAGING_OWNER)
                   for name in os.listdir(tmp_path)):
                break  # writing has begun (the owner file is what lets the next run know the folder is stale)
            time.sleep(0.005)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert tree_digest(src) == before_src, "the source changed"
        assert (tmp_path / "keep.txt").read_text(encoding="utf-8") == "the user's file beside OUT\n"
        now = export_dtype(out)  # complete: the old export or the new one, never a mix
        outcomes.append("old" if now == old else "new")
        if now == old:
            assert tree_digest(out) == before_out
        else:
            assert now == "BF16/bfloat16"
    assert outcomes[0] == "old", outcomes  # the kills landed inside the export, not after it
    # the next run clears what the killed ones staged and finishes
    last = start_export(src, out, "--dtype", "bf16", "--overwrite")
    output, _ = last.communicate(timeout=300)
    assert last.returncode == 0, output[-3000:]
    assert export_dtype(out) == "BF16/bfloat16" and tree_digest(src) == before_src
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".exported.")], os.listdir(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["exported", "keep.txt", "my-model"]
