"""Bulk identification on Ray Data against the local engine, side by side in one run.

The same files (CIFAR-10 train JPEGs, 32 px) and the same generation (a random-weight
resnet18 saved as a zoolib generation; the engine does not care how it was trained),
each engine timed around `bulkid.run` with a fresh run name:

- start-up: `ray.init` of a local cluster with --workers CPUs, and the first Ray
  run on a few files (actors starting and loading the generation), each timed;
- local: the default engine (decoding in this process on a small machine);
- ray: a warm cluster, --workers actors of one CPU each.

Needs the ray extra (`pip install -e '.[ray]'`). Run it alone:

    nice .venv/bin/python bench/ray_throughput.py [--files 4000] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bulkid_throughput import DATA, make_generation, pick_files
from zoolib import bulkid


def timed(ws, files, **kw) -> float:
    """Seconds of one `bulkid.run` over `files` (a new run name each call)."""
    timed.n = getattr(timed, "n", 0) + 1
    start = time.perf_counter()
    out = bulkid.run(ws, files=files, name=f"bench-{timed.n}", progress=False, **kw)
    assert len(out) == len(files)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=4000)
    ap.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--runtime", default="torch", help="the model runtime of both engines")
    ap.add_argument("--data", type=Path, default=DATA / "cifar10" / "train")
    args = ap.parse_args()
    import ray

    files, classes = pick_files(args.data, args.files)
    with tempfile.TemporaryDirectory(prefix="zoolib-ray-") as tmp:
        ws = make_generation(Path(tmp) / "ws", classes, 32)
        kw = {"runtime": args.runtime, "knn": False}
        timed(ws, files[:64], **kw)  # warm-up of the local path (model load, caches)
        start = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - start
        first_s = timed(ws, files[:64], engine="ray", num_workers=args.workers, **kw)
        local_s = timed(ws, files, **kw)
        ray_s = timed(ws, files, engine="ray", num_workers=args.workers, **kw)
        ray.shutdown()
    n = len(files)
    print(json.dumps({
        "files": n, "workers": args.workers, "runtime": args.runtime,
        "local_img_s": round(n / local_s, 1), "ray_img_s": round(n / ray_s, 1),
        "ray_vs_local": round(local_s / ray_s, 2),
        "ray_init_s": round(init_s, 1), "ray_first_run_64_files_s": round(first_s, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
