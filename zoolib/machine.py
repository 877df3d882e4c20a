"""What this machine lets the process use: one answer for every module that sizes a pool."""
from __future__ import annotations

import os


def cores() -> int:
    """The CPU cores this process may run on: its affinity where the OS tells (containers,
    `taskset`, CI runners), else every core (`os.cpu_count` ignores the affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)
