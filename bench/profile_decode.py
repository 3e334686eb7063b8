"""Where the time of a decode step goes: the engine serving one greedy request of bench_7's model, step by step.

    python bench/profile_decode.py                      # in-process breakdown + torch.profiler's top ops
    python bench/profile_decode.py --http               # + the server: HTTP/SSE time per token (python -m serving.api)
    python bench/profile_decode.py --http --py_spy build/py-spy/bin/py-spy   # + py-spy's samples of that server

In-process: one request through serving.engine.Engine (batch 1, greedy), each part of the worker's decode step
timed by wrapping it for this run only: the model's forward (a forward hook pair), the rest of KVBatch.step and
KVBatch.keep (cache bookkeeping: positions, mask, cache views, row pruning), sampling (sample_next), detokenization
(TextStream.push) and the engine's own remainder (event delivery, the worker loop). Medians over the decode steps
of --repeats requests, after a warm-up request. torch.profiler then runs KVBatch.step alone: time inside aten ops
(matmul / attention / the rest) vs outside them (Python, transformers' module code, dispatch).
--http: the same request streamed through the `openai` client from `python -m serving.api`; per token =
(wall - time to first token) / (tokens - 1), measured the same way in-process, so the difference is HTTP/SSE
(server's asyncio loop, JSON chunks, the client's parsing, all on the same cores).
py-spy (optional, `pip install --target build/py-spy py-spy`): samples the server during the HTTP run (--idle off,
so only running threads count) and prints the functions with most samples on top of the stack.
"""
import argparse
import collections
import contextlib
import json
import os
import statistics
import subprocess
import time

from bench.bench_7_serving import bytes_per_decode_step, memory_bandwidth_gbs, start_server
from bench.common import REPO, peer_llama_76m

ALPACA = os.path.join(REPO, "data", "stanford_alpaca", "alpaca_data.json")
PARTS = ("model forward", "cache bookkeeping", "sampling", "detokenization", "engine rest")


def first_prompt() -> str:
    with open(ALPACA, encoding="utf-8") as f:
        row = json.load(f)[0]
    return row["instruction"] + ("\n" + row["input"] if row["input"] else "")


@contextlib.contextmanager
def wrapped(owner, name: str, on_time):
    """Replace owner.name by a wrapper that reports each call's wall seconds to on_time(s); restore after."""
    original, had = getattr(owner, name), name in vars(owner)
    saved = vars(owner).get(name)  # a class's own function, a module's global, or an instance's attribute

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            on_time(time.perf_counter() - start)

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, saved)
        else:
            delattr(owner, name)  # the instance falls back to its class's method


def engine_breakdown(loaded, prompt: str, tokens: int, repeats: int) -> dict:
    """Per decode step (ms, medians): each part, the whole step, and tokens/s in-process."""
    import serving.engine as engine_module
    from serving.engine import Engine, Finished
    from serving.sampling import SamplingParams
    from serving.textstream import TextStream

    engine = Engine(loaded, max_batch=1)
    steps, current = [], None
    starts = []

    def add(part):
        def on_time(seconds):
            if current is not None:
                current[part] = current.get(part, 0.0) + seconds
        return on_time

    def on_step(seconds):
        nonlocal current
        current["step"] = seconds
        steps.append(current)
        current = None

    forward_start = []
    core = loaded.core
    hooks = [core.register_forward_pre_hook(lambda *a: forward_start.append(time.perf_counter())),
             core.register_forward_hook(lambda *a: add("forward")(time.perf_counter() - forward_start.pop()))]
    original_step = engine._step

    def step():
        nonlocal current
        starts.append(time.perf_counter())
        current = {}
        start = time.perf_counter()
        original_step()
        on_step(time.perf_counter() - start)

    params = SamplingParams(temperature=0, max_tokens=tokens)
    ids = engine.prompt_ids([{"role": "user", "content": prompt}])
    per_token = []
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(wrapped(engine._batch, "step", add("batch.step")))
            stack.enter_context(wrapped(engine._batch, "keep", add("keep")))
            stack.enter_context(wrapped(engine_module, "sample_next", add("sampling")))
            stack.enter_context(wrapped(TextStream, "push", add("detokenization")))
            engine._step = step
            for run in range(repeats + 1):  # the first is the warm-up
                first = done = None
                for event in engine.generate(prompt_ids=ids, params=params):
                    first = first or time.perf_counter()
                    if isinstance(event, Finished):
                        done = time.perf_counter()
                        n = event.completion_tokens
                if run == 0:
                    steps.clear()
                    starts.clear()
                elif n > 1:
                    per_token.append((done - first) / (n - 1))
    finally:
        for hook in hooks:
            hook.remove()
        engine.__dict__.pop("_step", None)
        engine.close()
    med = lambda key: statistics.median(s.get(key, 0.0) for s in steps) * 1000  # noqa: E731
    # Step starts of one request follow each other; a gap between requests is not a step.
    gaps = [b - a for a, b in zip(starts, starts[1:]) if b - a < 1.0]
    out = {"model forward": med("forward"),
           "cache bookkeeping": med("batch.step") - med("forward") + med("keep"),
           "sampling": med("sampling"), "detokenization": med("detokenization"),
           "step": med("step"), "step_to_step": statistics.median(gaps) * 1000, "steps": len(steps),
           "per_token_event_ms": statistics.median(per_token) * 1000}
    out["engine rest"] = out["step_to_step"] - sum(out[p] for p in PARTS[:4])
    return out


def torch_profile(loaded, prompt: str, steps: int, threads: int, weight_bytes: int) -> None:
    """KVBatch.step alone under torch.profiler: the top ops, and time inside ops vs outside."""
    from torch.profiler import ProfilerActivity, profile

    from serving.engine import Engine
    from serving.kv_batch import KVBatch

    engine = Engine(loaded)
    ids = engine.prompt_ids([{"role": "user", "content": prompt}])
    engine.close()
    batch = KVBatch(loaded)
    logits, layers, state = batch.prefill(ids)
    batch.add(layers, [state])
    token = int(logits.argmax())
    for _ in range(4):  # warm-up
        token = int(batch.step([token])[0].argmax())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            token = int(batch.step([token])[0].argmax())
        wall = (time.perf_counter() - start) / steps * 1000
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))
    groups = collections.Counter()
    matmul = "matmul (weights: memory-bound at batch 1)"
    for e in events:
        name = e.key
        if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
            groups[matmul] += e.self_cpu_time_total
        elif "attention" in name:
            groups["attention"] += e.self_cpu_time_total
        else:
            groups["other ops (norms, rope, silu, copies, cache writes, ...)"] += e.self_cpu_time_total
    inside = sum(groups.values()) / 1000 / steps
    print(f"KVBatch.step under the profiler: {wall:.2f} ms per step ({threads} threads)")
    for name, us in groups.most_common():
        print(f"  {name:<58} {us / 1000 / steps:6.2f} ms")
    print(f"  {'outside ops (Python: transformers modules, our step code)':<58} {wall - inside:6.2f} ms")
    print(f"the matmuls read the weights at {weight_bytes / (groups[matmul] / 1000 / steps) / 1e6:.1f} GB/s")


@contextlib.contextmanager
def onednn_linears(model):
    """Every plain nn.Linear of `model` through oneDNN's inner product (weights converted once) instead of
    F.linear's MKL gemm. A what-if, not the engine's path: the logits move by ~1e-6, so greedy tokens are no longer
    guaranteed to be transformers' generate's (tests/test_serving_engine.py holds the engine to those)."""
    import torch
    from torch.utils.mkldnn import MkldnnLinear  # torch's public oneDNN Linear (weights converted once)

    swapped = []
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.bias is None and module.weight.dtype == torch.float32:
            onednn = MkldnnLinear(module, torch.float)

            def forward(x, onednn=onednn, module=module):
                out = onednn(x.reshape(-1, module.in_features))
                return out.reshape(*x.shape[:-1], module.out_features)

            module.forward = forward
            swapped.append(module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward


def onednn_what_if(loaded, prompt: str, steps: int) -> None:
    """Batch-1 step time with MKL (as served) vs oneDNN linears, alternating, and how far the logits move."""
    from serving.engine import Engine
    from serving.kv_batch import KVBatch

    engine = Engine(loaded)
    ids = engine.prompt_ids([{"role": "user", "content": prompt}])
    engine.close()

    def run(context):
        batch = KVBatch(loaded)
        logits, layers, state = batch.prefill(ids)
        batch.add(layers, [state])
        token, times, rows = int(logits.argmax()), [], []
        with context:
            for _ in range(steps + 4):
                start = time.perf_counter()
                logits = batch.step([token])[0]
                times.append(time.perf_counter() - start)
                rows.append(logits.clone())
                token = int(logits.argmax())
        return statistics.median(times[4:]) * 1000, rows

    (mkl, a), (dnn, b) = run(contextlib.nullcontext()), run(onednn_linears(loaded.core))
    (mkl2, _), (dnn2, _) = run(contextlib.nullcontext()), run(onednn_linears(loaded.core))
    same = [int(x.argmax()) for x in a] == [int(x.argmax()) for x in b]
    print(f"what-if, every linear through oneDNN (not the engine's path): {min(dnn, dnn2):.2f} ms per step vs "
          f"{min(mkl, mkl2):.2f} ms with MKL as served; first step's logits differ by up to "
          f"{float((a[0] - b[0]).abs().max()):.1e}; greedy tokens of {len(a)} steps {'same' if same else 'DIFFER'}")


def http_per_token(model: str, prompt: str, tokens: int, repeats: int, threads: int, py_spy: str | None) -> dict:
    import openai

    process, port = start_server(model, 16, threads)
    spy = raw = None
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=600)
        per_token = []

        def one():
            first, n = None, 0
            for chunk in client.chat.completions.create(
                    model="bench", messages=[{"role": "user", "content": prompt}], temperature=0,
                    max_tokens=tokens, stream=True, stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                if chunk.usage:
                    n = chunk.usage.completion_tokens
            return (time.perf_counter() - first) / (n - 1)

        one()  # warm-up
        if py_spy:
            raw = os.path.join(REPO, "build", "profile_decode.pyspy.txt")
            spy = subprocess.Popen([py_spy, "record", "--pid", str(process.pid), "--format", "raw", "--rate", "250",
                                    "--output", raw, "--nonblocking"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # py-spy attaches
        for _ in range(repeats):
            per_token.append(one())
        return {"per_token_ms": statistics.median(per_token) * 1000, "py_spy": raw}
    finally:
        if spy is not None:
            spy.send_signal(2)  # py-spy writes its file on SIGINT
            spy.wait(timeout=60)
        process.terminate()
        process.wait(timeout=60)


def print_py_spy(raw: str, top: int = 15) -> None:
    """Collapsed stacks ("frame;frame;... count") → the functions most often on top of a running stack."""
    leaves, total = collections.Counter(), 0
    with open(raw, encoding="utf-8") as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            leaves[stack.split(";")[-1]] += int(count)
            total += int(count)
    print(f"py-spy: {total} samples of running server threads; most often on top of the stack:")
    for frame, count in leaves.most_common(top):
        print(f"  {100 * count / total:5.1f}%  {frame[:110]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the machine's cores)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed requests per measurement (default 3)")
    parser.add_argument("--profile_steps", type=int, default=16, help="steps under torch.profiler (default 16)")
    parser.add_argument("--http", action="store_true", help="also time the server over HTTP/SSE per token")
    parser.add_argument("--py_spy", metavar="PATH", help="a py-spy binary: sample the server during --http")
    args = parser.parse_args(argv)
    if args.py_spy and not args.http:
        parser.error("--py_spy samples the server of --http")
    import torch

    from serving.loading import load_for_serving

    torch.set_num_threads(args.threads)
    model, prompt = peer_llama_76m(), first_prompt()
    loaded = load_for_serving(model)
    bandwidth = memory_bandwidth_gbs(args.threads)
    torch.set_num_threads(args.threads)
    step_bytes = bytes_per_decode_step(loaded.core, len(loaded.tokenizer(prompt)["input_ids"]) + args.tokens / 2)
    limit = bandwidth * 1e9 / step_bytes["total"]
    parts = engine_breakdown(loaded, prompt, args.tokens, args.repeats)
    step = parts["step_to_step"]
    print(f"bandwidth limit: {bandwidth:.1f} GB/s (read, {args.threads} threads) / {step_bytes['total'] / 1e6:.1f} MB "
          f"per step = {limit:.1f} tok/s")
    print(f"decode step, batch 1, greedy ({parts['steps']} steps, {args.threads} threads): {step:.2f} ms = "
          f"{1000 / step:.1f} tok/s in-process, {100 * 1000 / step / limit:.0f}% of the limit")
    for part in PARTS:
        print(f"  {part:<20} {parts[part]:6.2f} ms  {100 * parts[part] / step:5.1f}%")
    torch_profile(loaded, prompt, args.profile_steps, args.threads, step_bytes["weights"])
    onednn_what_if(loaded, prompt, args.profile_steps * 2)
    if args.http:
        http = http_per_token(model, prompt, args.tokens, args.repeats, args.threads, args.py_spy)
        ours = parts["per_token_event_ms"]
        print(f"per token, first text to last: in-process {ours:.2f} ms, over HTTP/SSE {http['per_token_ms']:.2f} ms "
              f"(HTTP/SSE {http['per_token_ms'] - ours:+.2f} ms per token)")
        if http["py_spy"] and os.path.isfile(http["py_spy"]):
            print_py_spy(http["py_spy"])


if __name__ == "__main__":
    main()
