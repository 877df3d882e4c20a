"""Benchmark: bulk identification's peak memory does not grow with the inbox.

Goal (issue 16): peak RSS at 10,000 and at 100,000 inbox files differs by less than
20%. Each size runs in a fresh process (its own peak RSS) on generated 32 px JPEGs
in a workspace with a random-weight resnet18 generation at 32 px (the engine does
not care how a model was trained).

    nice .venv/bin/python bench/bulkid_memory.py [--sizes 10000 100000]
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["cheetah", "elephant", "flamingo", "leopard", "lion", "okapi", "penguin", "zebra"]


def make_workspace(root: Path, files: int) -> None:
    """A workspace with a tiny library, a generation and `files` inbox JPEGs."""
    import torch

    from zoolib import models, workspace

    ws = workspace.create(root)
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(64):  # 64 distinct images, repeated under distinct names
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
        blobs.append(buf.getvalue())
    for cls in CLASSES:
        (ws.library / cls).mkdir(parents=True)
        (ws.library / cls / "a.jpg").write_bytes(blobs[0])
    for i in range(files):
        folder = ws.inbox / f"cam{i // 10000:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:07d}.jpg").write_bytes(blobs[i % len(blobs)])
    torch.manual_seed(0)
    info = {"arch": "resnet18", "img_size": 32, "mean": list(models.IMAGENET_MEAN),
            "std": list(models.IMAGENET_STD), "classes": CLASSES, "resize": "squish",
            "interpolation": "bilinear"}
    models.save_generation(ws, models.create_model("resnet18", len(CLASSES)), info)


def child(root: str) -> dict:
    from zoolib import bulkid

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    view = bulkid.run(root, progress=False, knn=False, runtime="torch", lazy=True)
    seconds = time.perf_counter() - t
    assert len(view) == sum(1 for p in (Path(root) / "inbox").rglob("*.jpg"))
    return {"seconds": seconds, "rss_before_mb": base,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    peaks = {}
    for n in args.sizes:
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            make_workspace(Path(tmp) / "ws", n)
            proc = subprocess.run([sys.executable, __file__, "--child", str(Path(tmp) / "ws")],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{n} files failed:\n{proc.stderr[-3000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            peaks[n] = out["peak_rss_mb"]
            print(f"{n:>8,} files: peak RSS {out['peak_rss_mb']:7.0f} MB "
                  f"(after imports {out['rss_before_mb']:.0f} MB), "
                  f"{n / out['seconds']:.0f} img/s")
    low, high = min(args.sizes), max(args.sizes)
    print(f"peak RSS {high:,} vs {low:,} files: {peaks[high] / peaks[low]:.3f}x "
          f"(goal: within 1.20x)")


if __name__ == "__main__":
    main()
