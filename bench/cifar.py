"""CIFAR-10 workspaces for the benchmarks: samples hard-linked (or copied) into a temporary
workspace, never into the repository.

Shared by bench/train_recipe.py and bench/replicate.py. The six animal classes
(bird cat deer dog frog horse) form a small real zoo; the four vehicle classes
are junk for an inbox. `cifar10/test` is read only for final figures.
"""
from __future__ import annotations

import os
import random
import resource
import shutil
import time
from pathlib import Path

import pandas as pd
from fastai.callback.core import Callback

from zoolib import workspace
from zoolib.workspace import ZoolibError

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "cifar10"
ANIMALS = ["bird", "cat", "deer", "dog", "frog", "horse"]
VEHICLES = ["airplane", "automobile", "ship", "truck"]


def shuffled(data: Path, cls: str, need: int, seed: int) -> list[Path]:
    """The cifar10/train files of a class in a seeded shuffle.

    Raises:
        ZoolibError: the class folder is missing or holds fewer than `need` files.
    """
    folder = data / "train" / cls
    files = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if len(files) < need:
        raise ZoolibError(f"{folder} holds {len(files)} images, {need} needed; is --data right?")
    random.Random(f"{seed}-{cls}").shuffle(files)
    return files


def place(src: Path, dest: Path) -> None:
    """A hard link to `src` at `dest` (no space used), or a copy across file systems.

    Not a symbolic link: zoolib never follows links (a library link scans as
    unreadable, an inbox link is an error row), as a user's workspace would.
    """
    if dest.exists():
        return
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def link_library(ws: workspace.Workspace, cls: str, files: list[Path]) -> None:
    """Place `files` into library/<cls>/ (see `place`)."""
    folder = ws.library / workspace.check_class_name(cls)
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        place(f.resolve(), folder / f.name)


def link_inbox(ws: workspace.Workspace, inbox: dict[str, list[Path]], seed: int) -> pd.DataFrame:
    """Place the inbox under opaque shuffled names (see `place`); return the answer key.

    Returns:
        Columns path (absolute inbox path, as bulkid keys rows), label, junk, source.
    """
    items = [(cls, f) for cls in sorted(inbox) for f in inbox[cls]]
    random.Random(seed).shuffle(items)
    rows = []
    for i, (cls, f) in enumerate(items):
        link = ws.inbox / f"{i:06d}.jpg"
        place(f.resolve(), link)
        rows.append({"path": str(link), "label": cls, "junk": cls in VEHICLES, "source": str(f)})
    return pd.DataFrame(rows)


def test_rows(data: Path, per_class: int = 0) -> pd.DataFrame:
    """cifar10/test rows of the six animals (absolute paths), `per_class` each (0 = all)."""
    rows = []
    for cls in ANIMALS:
        files = sorted((data / "test" / cls).glob("*.jpg"))
        if not files:
            raise ZoolibError(f"{data / 'test' / cls} holds no image")
        rows += [{"path": str(f), "label": cls} for f in files[:per_class or None]]
    return pd.DataFrame(rows)


def current_rss_mb() -> float:
    """This process's resident memory now, in MB (VmRSS of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """The peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class EpochLog(Callback):
    """Print each epoch's metrics on one line (fastai's own table is off in batch runs)."""

    order = 100  # last: after the checkpoint and the memory release

    def __init__(self, label: str):
        self.label, self.t0, self.rss = label, time.perf_counter(), []

    def after_epoch(self):
        names = self.recorder.metric_names[1:-1]
        vals = ", ".join(f"{n} {float(v):.4f}" for n, v in zip(names, self.recorder.values[-1]))
        self.rss.append(round(current_rss_mb(), 1))
        print(f"[{self.label}] epoch {self.epoch + 1}: {vals} "
              f"({time.perf_counter() - self.t0:.0f} s, RSS {self.rss[-1]:.0f} MB, "
              f"peak {peak_rss_mb():.0f} MB)", flush=True)
