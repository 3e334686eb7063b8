"""Run every bench/bench_*.py in name order, each in its own process, then write bench/REPORT.md.

    python bench/run_all.py                 # all benchmarks, reported settings (what `make bench` runs)
    python bench/run_all.py --quick         # 1 repeat, fewer rows: development / smoke test only
    python bench/run_all.py --only 1 --only bench_6_memory_estimate

A benchmark that exits non-zero (or writes no result) is recorded as failed in its result file and in the
report; the others still run, and the exit code is 1. Each child runs with a clean interpreter, so memory and
thread settings of one benchmark never leak into the next.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time


from bench import report
from bench.common import REPO, RESULTS_DIR, RESULTS_ENV, bench_name, machine_info
from tuning.files import atomic_file

BENCH_DIR = os.path.join(REPO, "bench")
STDERR_TAIL = 2000  # characters of a failed benchmark's stderr kept in its result


def discover(only: list[str] | None, bench_dir: str = BENCH_DIR) -> list[str]:
    """bench_*.py in name order; `only` keeps those whose name or number matches one entry."""
    scripts = sorted(glob.glob(os.path.join(bench_dir, "bench_*.py")))
    if not only:
        return scripts
    chosen = []
    for script in scripts:
        name = bench_name(script)
        number = name.split("_")[1]
        if any(key in (name, number, name.removeprefix("bench_"), os.path.basename(script)) for key in only):
            chosen.append(script)
    return chosen


def record_failure(results: str, name: str, returncode: int, stderr: str, elapsed: float) -> None:
    with atomic_file(os.path.join(results, f"{name}.json")) as f:
        json.dump({"name": name, "failed": True, "returncode": returncode, "elapsed_s": round(elapsed, 1),
                   "machine": machine_info(), "stderr_tail": stderr[-STDERR_TAIL:]}, f, indent=2, ensure_ascii=False)
        f.write("\n")


def add_elapsed(path: str, elapsed: float) -> None:
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    result["elapsed_s"] = round(elapsed, 1)
    with atomic_file(path) as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
        f.write("\n")


def run_one(script: str, args, results: str) -> bool:
    """Run one benchmark; True when it exited 0 and wrote a fresh result."""
    name = bench_name(script)
    path = os.path.join(results, f"{name}.json")
    argv = [sys.executable, script] + (["--quick"] if args.quick else [])
    print(f"== {name}: {' '.join(argv[1:])}", flush=True)
    env = dict(os.environ, **{RESULTS_ENV: results})
    start = time.time()
    try:
        proc = subprocess.run(argv, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, timeout=args.timeout)
        returncode, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        returncode, stderr = -1, f"timed out after {args.timeout} s\n{exc.stderr or ''}"
    elapsed = time.time() - start
    sys.stderr.write(stderr[-STDERR_TAIL:] if returncode else "")
    fresh = os.path.exists(path) and os.path.getmtime(path) >= start
    if returncode == 0 and fresh:
        add_elapsed(path, elapsed)
        print(f"== {name}: ok in {elapsed:.1f} s -> {os.path.relpath(path, REPO)}", flush=True)
        return True
    if returncode == 0:
        returncode, stderr = -2, "exited 0 but wrote no result file\n" + stderr
    record_failure(results, name, returncode, stderr, elapsed)
    print(f"== {name}: FAILED (exit {returncode}) after {elapsed:.1f} s", flush=True)
    return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (not for reported numbers)")
    parser.add_argument("--only", action="append", default=None,
                        help="run only this benchmark (name, e.g. bench_6_memory_estimate, or number, e.g. 6); repeatable")
    parser.add_argument("--results_dir", default=RESULTS_DIR, help="where the result JSON files go (default bench/results)")
    parser.add_argument("--report", default=os.path.join(BENCH_DIR, "REPORT.md"), help="the markdown report written at the end")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before one benchmark is stopped and marked failed")
    parser.add_argument("--bench_dir", default=BENCH_DIR, help="where the bench_*.py scripts are (default bench/)")
    args = parser.parse_args(argv)
    scripts = discover(args.only, args.bench_dir)
    if not scripts:
        parser.error(f"no benchmark matches --only {args.only}")
    os.makedirs(args.results_dir, exist_ok=True)
    start = time.time()
    ok = [run_one(script, args, args.results_dir) for script in scripts]
    report.write_report(args.results_dir, args.report)
    print(f"== {sum(ok)}/{len(ok)} benchmarks ok in {time.time() - start:.0f} s; report: {args.report}", flush=True)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
