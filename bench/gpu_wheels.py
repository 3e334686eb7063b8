"""Build the wheel folder bench/gpu_check.py needs on the GPU machine, which has no internet.

    python -m bench.gpu_wheels                  # → build/gpu-wheels (make gpu-wheels)
    python -m bench.gpu_check --install_wheels  # there: installs, offline, only what is not installed yet

The GPU image brings Python 3.12 with torch, transformers, peft, accelerate, safetensors, sentencepiece, tokenizers,
tiktoken and pytest (and what they depend on). The check uses that torch and transformers as they are (their
versions are recorded in its JSON); it needs only what the recipes import on its path and the image lacks: typer
(glm4_finetune/finetune.py's command line) and its dependencies. datasets (Arrow: ~60 MB of pyarrow and pandas),
deepspeed, bitsandbytes (a CUDA build over the limit), jieba and rouge-chinese are not sent: the check runs
without them (the QLoRA section says so in one line). The versions are the ones installed in this environment,
i.e. the project's pins. Everything the GPU machine receives, the repository's tracked files plus this folder,
must stay under 64 MiB: the script checks that and exits 1 when it does not.
"""
import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys

from bench.common import REPO

NEEDED = ("typer",)  # what the check imports that the GPU image lacks; their dependencies follow
IMAGE_HAS = ("torch", "transformers", "peft", "accelerate", "safetensors", "sentencepiece", "tokenizers", "tiktoken",
             "pytest")
LIMIT_MIB = 64
MIB = 2**20


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots) -> dict[str, str]:
    """normalized name → installed version of `roots` and everything they require here (extras left out)."""
    from packaging.requirements import Requirement

    seen, todo = {}, list(roots)
    while todo:
        name = normalize(todo.pop())
        if name in seen:
            continue
        try:
            seen[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional or platform-specific requirement that is not installed here
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def wanted() -> dict[str, str]:
    """The packages to send: what NEEDED pulls in, minus the image's named packages and torch's dependencies.
    What those others depend on is not assumed: the image's transformers 5.17 may not pull in what our 5.23 does
    (gpu_check.py --install_wheels skips whatever is installed already, so a wheel too many costs only bytes)."""
    image = {normalize(name) for name in IMAGE_HAS} | set(closure(["torch"]))
    return {name: version for name, version in sorted(closure(NEEDED).items()) if name not in image}


def tracked_bytes() -> int:
    """Bytes of the repository's tracked files: what the GPU machine receives besides the carried folders."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return sum(os.path.getsize(os.path.join(REPO, n)) for n in names.decode().split("\0")
               if n and os.path.isfile(os.path.join(REPO, n)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=os.path.join(REPO, "build", "gpu-wheels"),
                        help="folder to fill (emptied first; default build/gpu-wheels)")
    parser.add_argument("--python_version", default="3.12", help="the GPU image's Python (default 3.12)")
    parser.add_argument("--list", action="store_true", help="print the packages and versions, download nothing")
    args = parser.parse_args(argv)
    packages = wanted()
    specs = [f"{name}=={version}" for name, version in packages.items()]
    if args.list:
        print("\n".join(specs))
        return 0
    shutil.rmtree(args.out_dir, ignore_errors=True)
    os.makedirs(args.out_dir)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", args.python_version, "--dest", args.out_dir, *specs], check=True)
    wheels = sum(os.path.getsize(os.path.join(args.out_dir, n)) for n in os.listdir(args.out_dir))
    repo = tracked_bytes()
    total = wheels + repo
    print(f"{len(specs)} wheels ({', '.join(specs)}) in {args.out_dir}: {wheels / MIB:.1f} MiB; with the repository's "
          f"tracked files ({repo / MIB:.1f} MiB): {total / MIB:.1f} MiB of the {LIMIT_MIB} MiB the GPU machine "
          "receives")
    if total > LIMIT_MIB * MIB:
        print(f"gpu_wheels.py: error: {total / MIB:.1f} MiB is over the {LIMIT_MIB} MiB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
