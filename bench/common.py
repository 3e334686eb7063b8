"""Shared helpers of the side-by-side benchmarks (bench/bench_*.py): timing, matmul peak, peak RSS, results.

Every benchmark runs both sides in the same run, repeats each, and keeps the median; `write_result` stores
bench/results/<name>.json, which bench/report.py turns into bench/REPORT.md. Numbers are never edited by hand.
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tuning.files import atomic_file

RESULTS_DIR = os.path.join(REPO, "bench", "results")
# run_all.py --results_dir (and the smoke test) redirect the results of every child benchmark through this.
RESULTS_ENV = "BENCH_RESULTS_DIR"
PACKAGES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "datasets", "sentencepiece", "tokenizers")
BENCH_THREADS = 2  # the machine the peers were measured on has 2 cores


def results_dir() -> str:
    return os.environ.get(RESULTS_ENV) or RESULTS_DIR


def bench_name(script_path: str) -> str:
    """A benchmark's result name is its script's stem (bench/bench_1_tokenize.py → bench_1_tokenize)."""
    return os.path.splitext(os.path.basename(script_path))[0]


def parse_args(description: str, argv=None, *, default_repeats: int = 3, extra=None) -> argparse.Namespace:
    """The common --quick / --repeats flags (`extra(parser)` may add a benchmark's own options).

    --quick: 1 repeat and a smaller input, for development and the smoke test; never for reported numbers.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat and fewer rows/steps (development and smoke test; not for reported numbers)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed repeats per side; the median is reported (default {default_repeats}, 1 with --quick)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else default_repeats
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    """CPU, cores, RAM, library versions, torch threads and the date of this run (UTC)."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            info["ram_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    info["versions"] = {name: package_version(name) for name in PACKAGES}
    if "torch" in sys.modules:  # only report threads when the benchmark uses torch (importing it costs ~1 s)
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def matmul_peak_gflops(dtype="float32", size: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of a size×size matmul on BENCH_THREADS threads (2·size³ FLOPs), measured now.

    `dtype` is a torch dtype or its name ("float32", "bfloat16"). The best of `repeats` is the peak.
    """
    import torch

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    threads = torch.get_num_threads()
    torch.set_num_threads(min(BENCH_THREADS, os.cpu_count() or 1))
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=gen).to(dtype)
        b = torch.randn(size, size, generator=gen).to(dtype)
        times = repeat(lambda: torch.mm(a, b), repeats, warmup=1)
    finally:
        torch.set_num_threads(threads)
    return 2 * size**3 / min(times) / 1e9


def repeat(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of each of `repeats` calls of fn(), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


# Runs argv[2:] and writes "<peak RSS KiB> <exit code>" of that child to argv[1]. The child is forked from this
# small interpreter, because Linux carries the parent's high-water RSS at fork time into the child's ru_maxrss:
# forked straight from a benchmark holding a model, every child would look at least as big as the benchmark.
_RSS_WRAPPER = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {code}")
"""


def peak_rss_mib_of_child(argv, *, cwd=None, env=None, stdout=None, stderr=None) -> tuple[float, int]:
    """Run `argv` as a child process to completion; (its peak RSS in MiB, its return code).

    The peak is wait4's ru_maxrss of that one process (KiB on Linux), so other processes do not count.
    """
    fd, report = tempfile.mkstemp(prefix="bench-rss-")
    os.close(fd)
    try:
        wrapper = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, report, *argv], cwd=cwd, env=env,
                                 stdout=stdout, stderr=stderr)
        with open(report, encoding="utf-8") as f:
            text = f.read().split()
        if len(text) != 2:  # the wrapper itself failed (e.g. argv[0] not found)
            return float("nan"), wrapper.returncode or 1
        return int(text[0]) / 1024, int(text[1])
    finally:
        os.remove(report)


def write_result(name: str, *, settings: dict, table: list, goals: list, notes: str = "") -> str:
    """Write bench/results/<name>.json atomically and return its path.

    table: one dict per case, {"case": "...", <metric>: value, ...}, both sides side by side.
    goals: [{"goal": "text", "target": x, "measured": y, "met": bool}, ...].
    """
    for row in table:
        if "case" not in row:
            raise ValueError(f"table row without a 'case': {row}")
    for goal in goals:
        missing = {"goal", "target", "measured", "met"} - set(goal)
        if missing:
            raise ValueError(f"goal {goal} lacks {sorted(missing)}")
    result = {"name": name, "machine": machine_info(), "settings": settings, "table": table,
              "goals": [{**goal, "met": bool(goal["met"])} for goal in goals], "notes": notes}
    os.makedirs(results_dir(), exist_ok=True)
    path = os.path.join(results_dir(), f"{name}.json")
    with atomic_file(path) as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path


# The 76M tiny LLaMA of PEER_BASELINES.md: the real Chinese-Alpaca-7B config shrunk to these sizes, real vocabulary
# and tokenizer, random weights from torch.manual_seed(0), fp32.
PEER_LLAMA_SIZES = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=8)


def peer_llama_76m() -> str:
    """The folder of the peer benchmarks' 76M tiny LLaMA (build/bench/llama-76m), built on first use."""
    path = os.path.join(REPO, "build", "bench", "llama-76m")
    if not os.path.exists(os.path.join(path, "tiny_model.json")):
        from model_hub.make_tiny import build_tiny

        build_tiny("chinese-alpaca-7b", path, seed=0, sizes=PEER_LLAMA_SIZES)
    return path
