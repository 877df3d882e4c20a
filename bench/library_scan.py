"""Library scan: serial versus the process pool, same files, one run; time and peak memory.

A temporary workspace gets `--files` tiny images (copies of a few 32 px JPEG and
PNG files, in `--classes` class folders). Each scan runs cold (no manifest
cache) in its own process, so peak memory is comparable: the serial one with
workers=1, the parallel one with `--workers` (default: library.default_workers).
Each child then rescans with the cache it wrote (nothing to decode). Each kind
runs `--repeats` times, alternating; the best cold time is compared (a shared
host's slow spells only ever add time), the largest peak memory is reported.

Peak memory is reported two ways: the scanning process's own peak RSS
(getrusage), and the peak of the summed PSS of it and all its descendants
(the forkserver and the workers), sampled every 20 ms with psutil. PSS, not
RSS, for the sum: the workers share the forkserver's imported pages, which a sum
of RSS would count once per process. The two
manifests are compared: the parallel scan must give the serial scan's rows.

`--threshold` instead times serial and pool scans of a few small libraries, each in
a fresh process (the pool's cost includes starting the forkserver, as a kernel's
first scan pays it), to place library.POOL_MIN_FILES.

    nice .venv/bin/python bench/library_scan.py [--files 100000] [--workers N]
    nice .venv/bin/python bench/library_scan.py --threshold
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
from PIL import Image

from zoolib import library
from zoolib.workspace import create

THRESHOLD_SIZES = (250, 500, 1000, 2000, 4000, 8000)


def tiny_images() -> list[tuple[str, bytes]]:
    """Eight distinct 32 px images: four JPEGs and four PNGs, (suffix, bytes)."""
    out = []
    for k in range(8):
        img = Image.new("RGB", (32, 32), (30 * k, 255 - 30 * k, 90))
        img.paste((255, 255, 255), (k * 3, k * 3, k * 3 + 8, k * 3 + 8))
        buf = io.BytesIO()
        fmt = "JPEG" if k % 2 == 0 else "PNG"
        img.save(buf, fmt)
        out.append((".jpg" if fmt == "JPEG" else ".png", buf.getvalue()))
    return out


def make_library(root: Path, files: int, classes: int) -> Path:
    """A workspace at `root` whose library holds `files` tiny images."""
    ws = create(root)
    images = tiny_images()
    folders = [ws.library / f"class_{c:02d}" for c in range(classes)]
    for folder in folders:
        folder.mkdir()
    for i in range(files):
        suffix, data = images[i % len(images)]
        (folders[i % classes] / f"img_{i:07d}{suffix}").write_bytes(data)
    return ws.root


class TreePeak:
    """The peak summed PSS of this process and its descendants, sampled in a thread."""

    def __init__(self, every: float = 0.02):
        import psutil

        self.me, self.every, self.peak = psutil.Process(), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> int:
        total = 0
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except Exception:  # noqa: BLE001 - a worker may exit between listing and reading
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.every)

    def stop(self) -> float:
        """Stop sampling; the peak in MB."""
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def child(root: Path, workers: int, out: Path | None, force_pool: bool) -> None:
    """Cold scan, then warm rescan, of the workspace; print one JSON line."""
    if force_pool:
        library.POOL_MIN_FILES = 1
    (root / ".zoolib" / "manifest.parquet").unlink(missing_ok=True)
    try:
        tree = TreePeak()
    except ImportError:
        tree = None
    t0 = time.perf_counter()
    manifest = library.scan(root, progress=False, workers=workers)
    cold = time.perf_counter() - t0
    tree_mb = tree.stop() if tree else float("nan")
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    library.scan(root, progress=False, workers=workers)
    warm = time.perf_counter() - t0
    if out:
        manifest.to_parquet(out, index=False)
    print(json.dumps({"n": len(manifest), "cold_s": cold, "warm_s": warm,
                      "self_mb": self_mb, "tree_mb": tree_mb}))


def run_child(root: Path, workers: int, out: Path | None = None,
              force_pool: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", str(root), "--workers", str(workers)]
    cmd += ["--out", str(out)] if out else []
    cmd += ["--force-pool"] if force_pool else []
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def threshold(tmp: Path, workers: int) -> None:
    print(f"pool start-up: cold scans, fresh process each, {workers} workers (pool forced)")
    for n in THRESHOLD_SIZES:
        root = make_library(tmp / f"t{n}", n, 10)
        serial = run_child(root, 1)
        pool = run_child(root, workers, force_pool=True)
        print(f"{n:>6} files: serial {serial['cold_s']:.2f} s, pool {pool['cold_s']:.2f} s, "
              f"pool/serial time {pool['cold_s'] / serial['cold_s']:.2f}", flush=True)


def compare(tmp: Path, files: int, classes: int, workers: int, repeats: int,
            kinds: list[str]) -> None:
    t0 = time.perf_counter()
    root = make_library(tmp / "ws", files, classes)
    print(f"{files} files in {classes} class folders written in "
          f"{time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs, pool of {workers}; "
          f"{repeats} runs each, alternating", flush=True)
    runs = {name: [] for name in kinds}
    for k in range(repeats):  # alternate, so a slow spell of a shared host hits both
        for name in (kinds if k % 2 == 0 else kinds[::-1]):
            w = 1 if name == "serial" else workers
            runs[name].append(run_child(root, w, tmp / f"{name}.parquet"))
    best = {}
    for name, rs in runs.items():
        cold = sorted(r["cold_s"] for r in rs)
        best[name] = r = {"cold_s": cold[0], "n": rs[0]["n"],
                          "warm_s": min(r["warm_s"] for r in rs),
                          "self_mb": max(r["self_mb"] for r in rs),
                          "tree_mb": max(r["tree_mb"] for r in rs)}
        print(f"{name:>9}: cold best {r['cold_s']:.1f} s ({r['n'] / r['cold_s']:.0f} files/s), "
              f"median {statistics.median(cold):.1f} s, all {', '.join(f'{c:.1f}' for c in cold)};"
              f" cached rescan {r['warm_s']:.1f} s; peak RSS {r['self_mb']:.0f} MB (scanning "
              f"process), PSS {r['tree_mb']:.0f} MB (with its workers)", flush=True)
    if len(kinds) < 2:
        return
    s, p = best["serial"], best["parallel"]
    same = pd.read_parquet(tmp / "serial.parquet").equals(pd.read_parquet(tmp / "parallel.parquet"))
    print(f"parallel / serial files/s (best runs): {s['cold_s'] / p['cold_s']:.2f}x; peak RSS "
          f"parallel / serial: {p['self_mb'] / s['self_mb']:.2f}x (scanning process), "
          f"{p['tree_mb'] / s['tree_mb']:.2f}x (PSS with workers); rows identical: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--workers", type=int, default=library.default_workers())
    parser.add_argument("--repeats", type=int, default=3, help="cold scans of each kind")
    parser.add_argument("--threshold", action="store_true", help="place POOL_MIN_FILES")
    parser.add_argument("--kinds", nargs="+", choices=["serial", "parallel"],
                        default=["serial", "parallel"], help="the scans to run")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--force-pool", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.workers, args.out, args.force_pool)
    with tempfile.TemporaryDirectory() as tmp:
        if args.threshold:
            threshold(Path(tmp), args.workers)
        else:
            compare(Path(tmp), args.files, args.classes, args.workers, args.repeats,
                    args.kinds)


if __name__ == "__main__":
    main()
