"""Benchmark 7: the OpenAI-compatible server (python -m serving.api) under 1, 8 and 16 concurrent streaming clients,
continuous batching (--max_batch 16) vs the same requests served one at a time (--max_batch 1), side by side;
vLLM-CPU on the same model through `python -m serving.vllm` (where `make vllm-setup` has built its venv); LLaMA-Factory's
`llamafactory-cli api` (HF engine; where `make llamafactory-setup` has built its venv); and batch-1 decode against the
memory-bandwidth limit measured in the same run.

Model: the 76M tiny LLaMA of PEER_BASELINES.md (bench.common.peer_llama_76m), fp32, on the machine's 2 cores.
Clients: the official `openai` client, streaming, greedy (temperature 0), each its own alpaca instruction (the
first N rows), 64 new tokens (16 with --quick); all clients of a wave start together.
Aggregate tokens/s = generated tokens of the wave (usage.completion_tokens) / wall seconds of the wave.
Time to first token = from sending the request to the first chunk with text; p50 / p95 over the wave's clients.
Each wave runs --repeats times per side; the median wave (by wall time) is reported. Both sides must produce
the same text for every request (asserted: batching changes no greedy token); vLLM's and LLaMA-Factory's answers
are compared too (reported: the same greedy tokens through another engine).
Batch-1 bandwidth limit: a decode step reads every weight once (the input embedding table, untied here, only one
row), plus the KV cache; limit tok/s = memory bandwidth (a read-only pass over a 256 MiB tensor with the server's
threads, median) / those bytes. The engine's batch-1 decode (in-process, and over HTTP: the 1-client wave) is
reported as a fraction of it.
"""
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from bench import llamafactory_peer
from bench.common import REPO, bench_name, parse_args, peer_llama_76m, repeat, write_result

ALPACA = os.path.join(REPO, "data", "stanford_alpaca", "alpaca_data.json")
CONCURRENCY = (1, 8, 16)
BATCHED = 16
GOAL_THROUGHPUT = 4.0    # x one-at-a-time aggregate tokens/s at 8 clients
GOAL_TTFT = 2.0          # TTFT p95 at 8 clients <= 2x one client's
GOAL_BANDWIDTH = 0.70    # batch-1 decode tok/s >= 70% of the memory-bandwidth limit (issue 36)
GOAL_VS_LLAMAFACTORY = 5.0   # 8 clients: ours >= 5x LLaMA-Factory's aggregate tok/s (issue 36)
VLLM, LLAMAFACTORY = 0, -1   # start_server's max_batch for the peers


def start_server(model: str, max_batch: int, threads: int) -> tuple[subprocess.Popen, int]:
    """`max_batch` VLLM: vLLM through serving.vllm (its own scheduler, up to 16 sequences); LLAMAFACTORY:
    `llamafactory-cli api` (its HF engine, one request at a time)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": "1"}
    ready = "/health"
    if max_batch > 0:
        command = [sys.executable, "-m", "serving.api", "--model", model, "--port", str(port), "--max_batch",
                   str(max_batch), "--max_queue", "64", "--served_model_name", "bench"]
    elif max_batch == VLLM:
        command = [sys.executable, "-m", "serving.vllm", model, "--port", str(port), "--served_model_name", "bench",
                   "--", "--max-model-len", "2048", "--max-num-seqs", str(BATCHED)]
    else:
        command, extra = llamafactory_peer.server(model, port, threads)
        env.update(extra)
        ready = "/v1/models"  # it has no /health
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(6000):  # bounded: 10 minutes (vLLM starts in ~1 min)
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{ready}", timeout=1).read()
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
        if chunk.usage:  # (LLaMA-Factory's stream carries none: counted in main)
            tokens = chunk.usage.completion_tokens
    return {"ttft": first if first is not None else time.perf_counter() - start, "text": "".join(text),
            "tokens": tokens}


def wave(client, prompts: list[str], new_tokens: int, counts: list[int] | None = None) -> dict:
    """`counts`: each prompt's generated tokens, for a server whose stream reports no usage (LLaMA-Factory)."""
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
    if counts:
        for r, n in zip(results, counts):
            r["tokens"] = r["tokens"] or n
    tokens = sum(r["tokens"] for r in results)
    return {"wall": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
            "texts": [r["text"] for r in results], "counts": [r["tokens"] for r in results]}


def measure(model: str, max_batch: int, prompts: list[str], new_tokens: int, repeats: int, threads: int,
            counts: list[int] | None = None) -> dict:
    import openai

    process, port = start_server(model, max_batch, threads)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=1800)
        wave(client, prompts[:2], 4)  # warm-up: kernels, allocator, HTTP
        out = {}
        for n in CONCURRENCY:
            runs = sorted((wave(client, prompts[:n], new_tokens, counts) for _ in range(repeats)),
                          key=lambda r: r["wall"])
            out[n] = runs[len(runs) // 2]
            label = {VLLM: "vLLM", LLAMAFACTORY: "LLaMA-Factory"}.get(max_batch, f"max_batch {max_batch}")
            print(f"{label}, {n} clients: "
                  f"{out[n]['tokens_per_s']:.1f} tok/s, TTFT p50 "
                  f"{out[n]['ttft_p50'] * 1000:.0f} ms p95 {out[n]['ttft_p95'] * 1000:.0f} ms", flush=True)
        return out
    finally:
        process.terminate()
        process.wait(timeout=120)


def memory_bandwidth_gbs(threads: int, repeats: int = 9) -> float:
    """GB/s of a read-only pass (sum) over a 256 MiB fp32 tensor, 8x the L3 of these CPUs, with `threads` torch
    threads: what a batch-1 decode step does with the weights (streams them in once). Median of `repeats`."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(64 << 20)
    return x.numel() * x.element_size() / statistics.median(repeat(x.sum, repeats, warmup=2)) / 1e9


def bytes_per_decode_step(core, context: float) -> dict:
    """Bytes one batch-1 decode step must read: every parameter once (tied embedding/lm_head counted once; an
    untied input embedding table only gathers one row), plus the KV cache of `context` tokens."""
    all_parameters = sum(p.numel() * p.element_size() for p in core.parameters())  # lists a tied one once
    weights = all_parameters
    embed, head = core.get_input_embeddings().weight, core.get_output_embeddings().weight
    tied = embed.data_ptr() == head.data_ptr()
    if not tied:
        weights -= (embed.shape[0] - 1) * embed.shape[1] * embed.element_size()
    c = core.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * embed.element_size() * context
    return {"weights": weights, "kv_cache": kv, "total": weights + kv, "tied": tied,
            "all_parameters": all_parameters}


def in_process(model: str, prompts: list[str], threads: int, new_tokens: int, repeats: int) -> dict:
    """No HTTP. Prefill: the first prompt alone and the 8 prompts in one forward (median ms); eight clients arriving
    together wait at least for the second: the floor under their TTFT. Batch-1 decode: one greedy request through
    the engine (max_batch 1) with new_tokens vs 1 new token, (tokens - 1) / (difference of their wall times),
    median of `repeats` pairs after a warm-up: forward, cache bookkeeping, sampling, detokenization, events."""
    import torch

    from serving.engine import Engine, Finished
    from serving.kv_batch import KVBatch
    from serving.loading import load_for_serving
    from serving.sampling import SamplingParams

    bandwidth = memory_bandwidth_gbs(threads)
    torch.set_num_threads(threads)
    loaded = load_for_serving(model)
    engine = Engine(loaded, max_batch=1)
    all_ids = [engine.prompt_ids([{"role": "user", "content": p}]) for p in prompts]
    ids = all_ids[:8]

    def request(n: int) -> tuple[float, int]:
        start = time.perf_counter()
        for event in engine.generate(prompt_ids=ids[0], params=SamplingParams(temperature=0, max_tokens=n)):
            if isinstance(event, Finished):
                return time.perf_counter() - start, event.completion_tokens
        raise SystemExit("no Finished event")

    request(new_tokens)  # warm-up
    rates = []
    for _ in range(max(3, repeats)):
        (long, tokens), (short, _) = request(new_tokens), request(1)
        rates.append((tokens - 1) / (long - short))
    engine.close()
    batch = KVBatch(loaded)

    def median_ms(run):  # 5 at least, as before the decode row
        return statistics.median(repeat(run, max(5, repeats))) * 1000

    return {"one_ms": median_ms(lambda: batch.prefill(ids[0])),
            "eight_ms": median_ms(lambda: batch.prefill_together(ids)), "prompt_tokens": [len(i) for i in ids],
            "decode_tok_s": statistics.median(rates), "bandwidth_gbs": bandwidth,
            "bytes": bytes_per_decode_step(loaded.core, len(ids[0]) + new_tokens / 2), "all_ids": all_ids}


def same_answer(ours: str, theirs: str) -> bool:
    # max_tokens can cut a character made of byte pieces in half: a peer streams it as U+FFFD, ours holds it back
    return ours.strip().rstrip("\ufffd") == theirs.strip().rstrip("\ufffd")


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

    vllm = measure(model, VLLM, prompts, new_tokens, args.repeats, args.threads) if os.path.isfile(VENV_PYTHON) else None
    # LLaMA-Factory's stream reports no usage: each answer counts the tokens ours generated for that prompt (the same
    # greedy tokens where the answers agree, reported below; both run to max_tokens unless </s> comes first).
    llamafactory = (measure(model, LLAMAFACTORY, prompts, new_tokens, args.repeats, args.threads,
                            counts=batched[max(CONCURRENCY)]["counts"]) if llamafactory_peer.available() else None)
    local = in_process(model, prompts, args.threads, new_tokens, args.repeats)
    same = all(batched[n]["texts"] == single[n]["texts"] for n in CONCURRENCY)
    if not same:
        raise SystemExit("batched answers differ from one-at-a-time answers")
    peers = [(name, side) for name, side in (("vLLM-CPU 0.32 (python -m serving.vllm)", vllm),
                                             ("LLaMA-Factory 0.9.5 (llamafactory-cli api, HF engine)", llamafactory))
             if side]
    table = []
    for n in CONCURRENCY:
        for label, side in ((f"continuous batching (--max_batch {BATCHED})", batched),
                            ("one at a time (--max_batch 1)", single), *peers):
            r = side[n]
            row = {"case": f"{n} clients, {label}", "tokens": r["tokens"], "seconds": r["wall"],
                   "tokens_per_s": r["tokens_per_s"], "ttft_p50_ms": r["ttft_p50"] * 1000,
                   "ttft_p95_ms": r["ttft_p95"] * 1000}
            if side is vllm or side is llamafactory:
                row["ours_batched_vs_peer_tokens_per_s"] = batched[n]["tokens_per_s"] / r["tokens_per_s"]
            table.append(row)
    speedup = batched[8]["tokens_per_s"] / single[8]["tokens_per_s"]
    ttft_ratio = batched[8]["ttft_p95"] / batched[1]["ttft_p95"]
    table.append({"case": "8 clients: batching / one at a time (tokens/s)", "tokens_per_s": speedup})
    table.append({"case": f"in-process prefill, first prompt alone ({local['prompt_tokens'][0]} tokens)",
                  "seconds": local["one_ms"] / 1000})
    table.append({"case": f"in-process prefill, the 8 prompts in one forward ({sum(local['prompt_tokens'])} tokens)",
                  "seconds": local["eight_ms"] / 1000,
                  "ttft_floor_vs_one_client": local["eight_ms"] / 1000 / batched[1]["ttft_p95"]})
    step = local["bytes"]
    limit = local["bandwidth_gbs"] * 1e9 / step["total"]
    over_http = batched[1]["tokens_per_s"]
    table.append({"case": f"batch-1 bandwidth limit: {local['bandwidth_gbs']:.1f} GB/s measured ({args.threads} "
                          f"threads) / {step['total'] / 1e6:.1f} MB per step", "tokens_per_s": limit,
                  "weights_mb": step["weights"] / 1e6, "kv_cache_mb": step["kv_cache"] / 1e6})
    table.append({"case": "batch-1 decode in-process (engine, greedy, 1 request)", "tokens_per_s": local["decode_tok_s"],
                  "fraction_of_limit": local["decode_tok_s"] / limit})
    table.append({"case": "batch-1 over HTTP (the 1-client wave, first token included)", "tokens_per_s": over_http,
                  "fraction_of_limit": over_http / limit})
    settings = {"model": "tiny LLaMA 76M (Chinese-Alpaca-7B config, hidden 512, 8 layers), fp32, prompt format alpaca",
                "vllm": "vllm-cpu 0.32.0 via python -m serving.vllm, --max-num-seqs 16" if vllm else
                        "not measured: build/vllm-venv is missing (make vllm-setup)",
                "llamafactory": "LLaMA-Factory 0.9.5, llamafactory-cli api, infer_backend huggingface, fp32; its HF "
                                "engine serves one request at a time (MAX_CONCURRENT 1), the others wait; prompt: our "
                                "alpaca prompt as a chat template (bench/llamafactory_peer.py), prompt ids equal to "
                                f"ours for {llamafactory_peer.prompt_ids_match(model, prompts, local['all_ids'])}/"
                                f"{len(prompts)} prompts" if llamafactory else
                                "not measured: build/llamafactory-venv is missing (make llamafactory-setup)",
                "clients": list(CONCURRENCY), "max_tokens": new_tokens, "decoding": "greedy, streamed",
                "server_threads": args.threads, "repeats": args.repeats, "quick": args.quick,
                "decode_bytes": f"{step['weights']:,} B of weights ({'tied' if step['tied'] else 'untied'} embedding "
                                f"and lm_head; all parameters {step['all_parameters']:,} B) + {step['kv_cache']:,.0f} B "
                                "of KV cache at the mean context of the measured request"}
    goals = [
        {"goal": f"8 clients: aggregate tokens/s >= {GOAL_THROUGHPUT:g}x one at a time", "target": GOAL_THROUGHPUT,
         "measured": round(speedup, 2), "met": speedup >= GOAL_THROUGHPUT},
        {"goal": f"8 clients: time to first token p95 <= {GOAL_TTFT:g}x one client's", "target": GOAL_TTFT,
         "measured": round(ttft_ratio, 2), "met": ttft_ratio <= GOAL_TTFT},
        {"goal": "same answers batched and one at a time", "target": True, "measured": same, "met": same},
        {"goal": f"batch-1 decode >= {GOAL_BANDWIDTH:.0%} of the bandwidth limit (in-process)", "target": GOAL_BANDWIDTH,
         "measured": round(local["decode_tok_s"] / limit, 3), "met": local["decode_tok_s"] / limit >= GOAL_BANDWIDTH},
    ]
    total = sum(len(batched[n]["texts"]) for n in CONCURRENCY)
    if vllm:
        alike = sum(same_answer(a, b) for n in CONCURRENCY for a, b in zip(batched[n]["texts"], vllm[n]["texts"]))
        goals.append({"goal": "vLLM gives our server's greedy answers (same prompt through serving.vllm)",
                      "target": total, "measured": alike, "met": alike == total})
    if llamafactory:
        ratio = batched[8]["tokens_per_s"] / llamafactory[8]["tokens_per_s"]
        goals.append({"goal": f"8 clients: aggregate tokens/s >= {GOAL_VS_LLAMAFACTORY:g}x LLaMA-Factory's",
                      "target": GOAL_VS_LLAMAFACTORY, "measured": round(ratio, 2), "met": ratio >= GOAL_VS_LLAMAFACTORY})
        alike = sum(same_answer(a, llamafactory_peer.readable(b))
                    for n in CONCURRENCY for a, b in zip(batched[n]["texts"], llamafactory[n]["texts"]))
        goals.append({"goal": "LLaMA-Factory gives our server's greedy answers (same prompt ids)", "target": total,
                      "measured": alike, "met": alike == total})
    notes = ("Both sides are the same server binary and engine (serving/engine.py); --max_batch 1 admits one request "
             "and queues the others, as a server without batching does. With batching, a request joins the running "
             "batch at the next decoding step (requests arriving together prefilled in one left-padded forward, their KV "
             "cache padded in) and leaves when done. "
             "Time to first token includes the HTTP round trip and, when several requests arrive together, their "
             "prefill: on a CPU that is compute-bound, so 8 prompts cost several times one prompt even in one forward; "
             "ttft_floor_vs_one_client is that in-process forward alone over one client's TTFT, the ratio no scheduling "
             "can go below when 8 arrive at once. The bandwidth limit assumes every byte a step needs comes from memory "
             "once at the measured read bandwidth; bench/profile_decode.py shows where the rest of a step goes. "
             "LLaMA-Factory's answers are compared after turning the <0x..> byte pieces its tokenizer class prints "
             "back into characters. Server and clients share the 2 cores; measure on a quiet machine.")
    print(write_result(bench_name(__file__), settings=settings, table=table, goals=goals, notes=notes))


if __name__ == "__main__":
    main()
