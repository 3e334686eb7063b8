"""One prepared GPU check: every recipe at real size on one CUDA card in one run of at most ~8 minutes.

    python -m bench.gpu_check                       # on the GPU machine (make gpu-check)
    python -m bench.gpu_check --install_wheels      # first installs what the image lacks from build/gpu-wheels
    python -m bench.gpu_check --dry_run             # CPU, tiny models, fp32: every section in seconds

Sections: LoRA through chatglm_lora/finetune.py (ChatGLM-6B), llama_ner/train_trainer.py (Chinese-Alpaca-7B)
and glm4_finetune/finetune.py (GLM-4-9B), P-tuning v2 through the last, QLoRA 4-bit through llama_ner (when
bitsandbytes is importable), and serving/engine.py on GLM-4-9B. Models are the real configs with random bf16
weights created on the GPU (no download), trained with each recipe's own batch size and sequence length.
Reported per training section: tokens/s, MFU against the card's bf16 dense peak, peak CUDA memory beside
model_hub.estimate_memory's figure for the same settings; for serving: time to first token and batch-1 / batch-8
decode tok/s against the HBM bandwidth limit. A section that fails is recorded (exception type and message)
and the others still run; each has a share of --time_budget_s and stops its steps when that runs out.
It runs with whatever torch / transformers / peft the machine has and records their versions beside the pins.
Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md.
"""
import argparse
import datetime
import glob
import importlib.metadata
import json
import os
import subprocess
import sys
import time
import traceback

from bench.common import REPO

SECTION_NAMES = ("chatglm_lora", "llama_ner_lora", "glm4_lora", "glm4_ptuning", "qlora", "serving")
WHEELS_DIR = os.path.join(REPO, "build", "gpu-wheels")
SITE = os.path.join(REPO, "build", "gpu-site")  # where --install_wheels installs what the image lacks
INSTALLED_ENV = "GPU_CHECK_WHEELS_INSTALLED"  # set in the run that --install_wheels starts again
DEFAULTS = {False: {"steps": 6, "decode_tokens": 64, "time_budget_s": 420, "out_dir": os.path.join(
                REPO, "bench", "results", "gpu_check")},
            True: {"steps": 3, "decode_tokens": 6, "time_budget_s": 240, "out_dir": os.path.join(
                REPO, "build", "gpu_check_dry")}}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2 instead of argparse's usage block
        self.exit(2, f"gpu_check.py: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0],
                           epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry_run", action="store_true",
                        help="CPU, tiny models (model_hub.make_tiny) in fp32, short runs: checks every section's "
                             "code path without a GPU (the test suite runs this)")
    parser.add_argument("--out_dir", help="where gpu_check.json and gpu_check.md go (default bench/results/gpu_check, "
                                          "build/gpu_check_dry with --dry_run)")
    parser.add_argument("--only", help=f"comma-separated sections to run (default all: {','.join(SECTION_NAMES)})")
    parser.add_argument("--steps", type=int, help="optimizer steps per training section, the first untimed "
                                                  "(default 6; 3 with --dry_run)")
    parser.add_argument("--decode_tokens", type=int, help="new tokens per serving request (default 64; 6 with "
                                                          "--dry_run)")
    parser.add_argument("--time_budget_s", type=float, help="seconds for all sections together, shared out by "
                                                            "section (default 420; 240 with --dry_run)")
    parser.add_argument("--install_wheels", nargs="?", const=WHEELS_DIR, metavar="DIR",
                        help="first pip-install, offline, the wheels in DIR (default build/gpu-wheels, made by "
                             "bench/gpu_wheels.py) whose packages are not installed, into build/gpu-site (put first "
                             "on sys.path); the machine's own packages are left as they are")
    parser.add_argument("--fail_section", metavar="NAME", help="make this section raise at its start (to see a "
                                                               "failure recorded while the rest runs)")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.dry_run].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else list(SECTION_NAMES)
    unknown = [s for s in args.only + ([args.fail_section] if args.fail_section else []) if s not in SECTION_NAMES]
    if not args.only:
        parser.error("--only names no section")
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; expected some of {', '.join(SECTION_NAMES)}")
    if args.steps < 2 or args.decode_tokens < 2:
        parser.error("--steps and --decode_tokens must be at least 2 (the first step or token is not timed)")
    if args.time_budget_s <= 0:
        parser.error("--time_budget_s must be positive")
    if args.install_wheels and not glob.glob(os.path.join(args.install_wheels, "*.whl")):
        parser.error(f"no wheels in {args.install_wheels}; build them with `python -m bench.gpu_wheels`")
    return args


def install_missing_wheels(folder: str) -> list[str]:
    """pip install --no-index --no-deps the wheels of `folder` whose distributions are not installed, into
    build/gpu-site (the check then runs again with it first on PYTHONPATH): the image's own packages are left as
    they are, and an image Python that refuses pip installs (PEP 668) does not matter. By hand, the same is:
    pip install --no-index --no-deps --target build/gpu-site build/gpu-wheels/*.whl
    PYTHONPATH=build/gpu-site python -m bench.gpu_check"""
    import importlib

    missing = []
    for path in sorted(glob.glob(os.path.join(folder, "*.whl"))):
        name = os.path.basename(path).split("-")[0]
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(path)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--upgrade",
                        "--target", SITE, "--find-links", folder, *missing], check=True)
    return [os.path.basename(p) for p in missing]


def run_again_with_the_wheels(args, argv: list[str]) -> None:
    """Install what is missing, then run this check again in a Python that has build/gpu-site first on its path
    (a running interpreter's imports are settled; a new one reads PYTHONPATH). Returns only when already done."""
    if os.environ.get(INSTALLED_ENV) is not None or not args.install_wheels:
        return
    installed = install_missing_wheels(args.install_wheels)
    env = {**os.environ, INSTALLED_ENV: ",".join(installed),
           "PYTHONPATH": os.pathsep.join([SITE, REPO, *filter(None, [os.environ.get("PYTHONPATH")])])}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "bench.gpu_check", *argv], env)


def run_section(name: str, ctx, deadline: float, fail: bool) -> dict:
    """One section; whatever it raises is recorded (type, message, the last frames) instead of ending the run."""
    from bench import gpu_check_support as support
    from bench.gpu_check_sections import SECTIONS

    start = time.monotonic()
    try:
        if fail:
            raise RuntimeError(f"forced failure of section {name} (--fail_section)")
        result = SECTIONS[name](ctx, deadline)
        result = {"status": "skipped" if "skipped" in result else "ok", **result}
    except (Exception, SystemExit) as exc:  # SystemExit: a recipe's own exit on a user error
        frames = traceback.format_exception(type(exc), exc, exc.__traceback__)
        result = {"status": "failed", "error": {"type": type(exc).__name__, "message": str(exc)[:2000]},
                  "traceback_tail": "".join(frames)[-3000:]}
    finally:
        support.release(ctx.device)
    result["seconds"] = time.monotonic() - start
    return result


def run(args, save=lambda report: None) -> dict:
    """Every section in turn; `save(report)` after each, so a run cut short still leaves what it measured."""
    import torch

    from bench import gpu_check_support as support
    from bench.gpu_check_sections import BUDGET_SHARE, Context

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: error: no CUDA device here; run with --dry_run on a CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    installed = [n for n in os.environ.get(INSTALLED_ENV, "").split(",") if n]
    ctx = Context(device=device, real=not args.dry_run, card=support.card_info(device), steps=args.steps,
                  decode_tokens=args.decode_tokens)
    started, end = time.monotonic(), time.monotonic() + args.time_budget_s
    ran, pins = support.versions(), support.project_pins()
    sections = {}
    report = {"check": "bench/gpu_check.py", "dry_run": args.dry_run,
              "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
              "device": ctx.card, "versions": ran,
              "versions_differing_from_pins": {k: {"ran": v, "pinned": pins[k]} for k, v in ran.items()
                                               if k in pins and v.split("+")[0] != pins[k]},
              "wheels_installed": installed,
              "settings": {"steps": args.steps, "decode_tokens": args.decode_tokens,
                           "time_budget_s": args.time_budget_s, "sections": args.only},
              "sections": sections, "wall_s": 0.0}
    for i, name in enumerate(args.only):
        shares = [BUDGET_SHARE[n] for n in args.only[i:]]
        budget = (end - time.monotonic()) * shares[0] / sum(shares)  # what earlier sections left flows on
        print(f"[gpu_check] {name}: up to {budget:.0f} s", flush=True)
        sections[name] = run_section(name, ctx, time.monotonic() + budget, args.fail_section == name)
        sections[name]["budget_s"] = budget
        print(f"[gpu_check] {name}: {sections[name]['status']} in {sections[name]['seconds']:.1f} s", flush=True)
        report["wall_s"] = time.monotonic() - started
        save(report)
    return report


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    device, versions = report["device"], report["versions"]
    kind = "CPU dry run, tiny models" if report["dry_run"] else "real configs, bf16"
    lines = [f"GPU check on {device['card']} ({kind}"
             f"), {report['date_utc']} UTC; torch {versions['torch']} (CUDA {versions['cuda']}), transformers "
             f"{versions['transformers']}, peft {versions['peft']}; {report['wall_s']:.0f} s in all.", "",
             "| section | status | batch × seq | tokens/s | MFU % | peak memory MiB | estimator MiB | s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in report["sections"].items():
        if name == "serving" or s["status"] != "ok":
            detail = s.get("skipped") or (f"{s['error']['type']}: {s['error']['message'][:120]}" if "error" in s
                                          else "see the serving table")
            lines.append(f"| {name} | {s['status']} | {detail} | | | | | {s['seconds']:.0f} |")
            continue
        memory = s.get("peak_reserved_mib", s.get("peak_rss_mib_process"))
        lines.append(f"| {name} | ok | {s['batch_size']} × {s['seq_len']} | {fmt(s['tokens_per_s'])} | "
                     f"{fmt(s.get('mfu_pct'))} | {fmt(memory, 0)} | {fmt(s['estimate_mib'], 0)} | {s['seconds']:.0f} |")
    serving = report["sections"].get("serving", {})
    if serving.get("status") == "ok":
        lines += ["", "| serving (GLM-4-9B config) | batch 1 | batch 8 |", "|---|---|---|",
                  f"| decode tok/s | {fmt(serving['decode_tok_s_batch1'])} | {fmt(serving['decode_tok_s_batch8'])} |",
                  f"| HBM limit tok/s | {fmt(serving.get('hbm_limit_tok_s_batch1'))} | "
                  f"{fmt(serving.get('hbm_limit_tok_s_batch8'))} |",
                  f"| time to first token ms ({serving['prompt_tokens']}-token prompt) | {fmt(serving['ttft_ms'])} | "
                  f"{fmt(serving['ttft_8_together_ms'])} (8 together) |"]
    lines += ["", "Peak memory: torch.cuda.max_memory_reserved (the process's peak RSS on the CPU dry run); the "
                  "estimator's figure includes its 600 MiB CUDA context. MFU: model FLOPs over the timed steps "
                  "(all but the first) / the card's bf16 dense peak."]
    return "\n".join(lines) + "\n"


def save(report: dict, out_dir: str) -> None:
    from tuning.files import atomic_file

    os.makedirs(out_dir, exist_ok=True)
    with atomic_file(os.path.join(out_dir, "gpu_check.json")) as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with atomic_file(os.path.join(out_dir, "gpu_check.md")) as f:
        f.write(markdown(report))


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    run_again_with_the_wheels(args, argv)
    import torch

    threads = torch.get_num_threads()
    if args.dry_run:  # the CPU rehearsal: both cores, then back (a test calls main() in a worker that shares them)
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        report = run(args, lambda partial: save(partial, args.out_dir))
    finally:
        torch.set_num_threads(threads)
    print(markdown(report))
    print(f"[gpu_check] wrote {os.path.join(args.out_dir, 'gpu_check.json')} and gpu_check.md")
    return report


if __name__ == "__main__":
    main()
