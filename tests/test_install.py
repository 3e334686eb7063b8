"""The pinned stack: exact pins everywhere, torch exactly 2.13.0, nothing would pull another torch."""
import glob
import json
import os
import re
import subprocess
import sys

import torch
from conftest import REPO

PIN = re.compile(r"^[A-Za-z0-9_.\-\[\]]+==[0-9][^ ;#]*")


def _requirement_lines(path):
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if line and not line.startswith("-r "):
                yield line


def test_every_requirement_is_pinned_exactly():
    for path in glob.glob(os.path.join(REPO, "requirements", "*.txt")):
        if path.endswith("gpu-extras.txt"):
            continue  # optional GPU-only extras, installed by hand on GPU machines
        for line in _requirement_lines(path):
            assert PIN.match(line), f"{os.path.basename(path)}: {line!r} is not an exact == pin"


def test_torch_is_the_pinned_cpu_build():
    assert torch.__version__.split("+")[0] == "2.13.0"


def test_installing_the_pins_would_not_pull_another_torch():
    report = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-",
         "-r", os.path.join(REPO, "requirements", "dev.txt")],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    would_install = [item["metadata"]["name"].lower() for item in json.loads(report.stdout)["install"]]
    assert not [n for n in would_install if n == "torch" or n.startswith(("nvidia-", "triton"))], would_install
