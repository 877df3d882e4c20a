"""The GPU check of issue 13: inception_v4 at 299 px with mixed precision, end to end.

One short script for a lent CUDA machine (`device`): a workspace of photos or
CIFAR images is built in a temporary folder, then

1. two epochs of inception_v4 at 299 px from scratch (fp16 autocast through
   fastai, channels-last), the budget annealing over the second;
2. a warm start from it for a third epoch (EPOCHS=1, FREEZE_EPOCHS=0: the whole
   model fine-tuned at the warm rates over one annealed epoch);
3. bulk identification of `--inbox` images;
4. the saved generations loaded again on the CPU and run on a few images, which
   must give the CUDA model's probabilities to within 1e-3.

It prints images/s for each step and writes them to `<out>/gpu_check.json`. On a
CPU-only machine it runs the same steps with a small model (`--arch zoo_cnn_small
--size 32`), which is how it is tested; the project never needs a GPU.

    python bench/gpu_check.py --out /tmp/gpu-check                  # on the GPU machine
    python bench/gpu_check.py --arch zoo_cnn_small --size 32 --per-class 40 --inbox 100
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from cifar import ANIMALS, DATA, VEHICLES, link_library, place, shuffled

from zoolib import bulkid, inference, models, workspace
from zoolib.images import load_rgb
from zoolib.train import TrainConfig, train


def build(root: Path, data: Path, per_class: int, inbox: int) -> workspace.Workspace:
    """A workspace: `per_class` images of each animal, an inbox of `inbox` other images."""
    ws = workspace.create(root)
    rest = []
    for cls in ANIMALS + VEHICLES:
        files = shuffled(data, cls, per_class + inbox // 10 + 1, seed=0)
        if cls in ANIMALS:
            link_library(ws, cls, files[:per_class])
        rest += files[per_class:per_class + inbox // 10 + 1]
    for i, f in enumerate(rest[:inbox]):
        place(f.resolve(), ws.inbox / f"{i:05d}.jpg")
    return ws


def timed_train(ws, cfg: TrainConfig) -> tuple[str, float]:
    """Train one generation; return its name and training images per second."""
    r = train(ws, cfg, progress=False)
    return r.name, r.info["metrics"]["train_images_per_s"]


def cpu_parity(ws, name: str, files: list[Path], device: str) -> float:
    """Largest probability difference between the generation on `device` and on the CPU."""
    on_dev, on_cpu = inference.load(ws, name, device=device), inference.load(ws, name, "cpu")
    batch = torch.stack([inference.to_tensor(load_rgb(f), on_cpu.info) for f in files])
    a, _ = inference.forward(on_dev, batch)
    b, _ = inference.forward(on_cpu, batch)
    return float((a - b).abs().max())


def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ws = build(root / "workspace", Path(args.data), args.per_class, args.inbox)
    base = dict(arch=args.arch, img_size=args.size, batch_size=args.batch_size, resume=False,
                min_images=min(40, args.per_class), warmup_epochs=0.5)
    out = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
           "arch": args.arch, "size": args.size}
    gen1, out["train_images_per_s"] = timed_train(ws, TrainConfig(**base, epochs=2))
    out["precision"] = models.read_info(ws, gen1)["precision"]
    gen2, out["warm_images_per_s"] = timed_train(
        ws, TrainConfig(**base, epochs=1, freeze_epochs=0, init_from=gen1))
    t = time.perf_counter()
    results = bulkid.run(ws, gen2, batch_size=args.batch_size, progress=False)
    out["bulkid_images_per_s"] = round(len(results) / (time.perf_counter() - t), 1)
    sample = sorted((ws.library / ANIMALS[0]).iterdir())[:8]
    out["cpu_max_prob_diff"] = {g: cpu_parity(ws, g, sample, device) for g in (gen1, gen2)}
    out["loads_on_cpu"] = all(v < 1e-3 for v in out["cpu_max_prob_diff"].values())
    (root / "gpu_check.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2), flush=True)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="inception_v4")
    ap.add_argument("--size", type=int, default=299)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--per-class", type=int, default=500, help="library images per animal class")
    ap.add_argument("--inbox", type=int, default=1000)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=None, help="a folder for the workspace and gpu_check.json")
    return ap.parse_args(argv)


if __name__ == "__main__":
    result = run(parse_args())
    sys.exit(0 if result["loads_on_cpu"] else 1)
