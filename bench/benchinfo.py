"""What every benchmark records beside its figures: the CPU, the commit, the goals.

CPUs differ between machines (native bfloat16 or AVX2 only), so a figure means
little without the CPU model and flags; a goal is recorded as value, goal and met.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu() -> dict:
    """The CPU model and the flags that decide the speed of training and inference."""
    model, flags = "unknown", []
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
    keep = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))]
    import torch

    from zoolib.callbacks import cpu_has_bf16

    return {"model": model, "flags": keep, "native_bf16": cpu_has_bf16(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": len(os.sched_getaffinity(0))}


def commit() -> str:
    """The repository's HEAD commit."""
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()


def goal(value: float | None, target: float, at_least: bool = True) -> dict:
    """A goal as the results files record it: value, goal and met (not met when the
    value is None: unmeasured)."""
    met = value is not None and (value >= target if at_least else value <= target)
    return {"value": value, "goal": target, "met": bool(met)}


def stamp() -> dict:
    """CPU, date and commit, for a results file."""
    return {"cpu": cpu(), "date": time.strftime("%Y-%m-%d"), "commit": commit()}
