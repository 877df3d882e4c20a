"""Training throughput on camera photos: zoolib's training path versus a plain loop
over already-decoded tensors (the ceiling).

The set is `photos.camera_photos`: 12-megapixel JPEGs (4032x3024, quality 90, some
with EXIF orientations) made from ../shared/datasets/animals10-mini. zoolib trains
through `train.train` as a user would (fastai, batch augmentation, EMA, plateau
schedule, per-epoch checkpoints), with its pixel cache (decoded once, in
parallel, before the first epoch) and, for comparison, without it (every
epoch decodes every photo). The ceiling is a hand-written loop over the same
training images decoded beforehand into one uint8 tensor: the same model, seed,
batch size, optimizer, channels-last memory and precision, no augmentation, no
data loading at all.

The figure is training images per second in the training phase of epochs 2 and
later (the first epoch warms oneDNN's kernels and, uncached, the page cache);
all three run one after another in this process.

    python bench/train_throughput.py                      # 240 photos, resnet18 at 224 px
    python bench/train_throughput.py --photos 200 --epochs 3 --arch efficientnet_b0
"""
from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback

from cifar import place
from photos import camera_photos
from zoolib import models, workspace
from zoolib.images import read_file, squished_pixels
from zoolib.train import TrainConfig, resolve_precision, train


class PhaseTimer(Callback):
    """Seconds and images of each epoch's training phase."""

    order = 100

    def before_fit(self):
        self.epochs = []

    def before_train(self):
        self.start, self.images = time.perf_counter(), 0

    def after_batch(self):
        if self.training:
            self.images += len(self.yb[0])

    def after_train(self):
        self.epochs.append((time.perf_counter() - self.start, self.images))


def rate(epochs: list[tuple[float, int]]) -> float:
    """Images per second over the epochs after the first."""
    later = epochs[1:] or epochs
    return sum(n for _, n in later) / sum(t for t, _ in later)


def make_workspace(root: Path, photos: list[Path]) -> workspace.Workspace:
    """A workspace whose library is the camera photos (hard links), one folder per class."""
    ws = workspace.create(root / "ws")
    for f in photos:
        (ws.library / f.parent.name).mkdir(exist_ok=True)
        place(f, ws.library / f.parent.name / f.name)
    return ws


def zoolib_run(ws, cfg: TrainConfig) -> tuple[float, list, object]:
    """Train one generation through zoolib; the later epochs' rate, all epochs, the result."""
    timer = PhaseTimer()
    start = time.perf_counter()
    result = train(ws, cfg, progress=False, extra_cbs=[timer])
    print(f"  zoolib cache={cfg.cache}: {time.perf_counter() - start:.1f} s in all, "
          f"epochs (s, images): {[(round(t, 1), n) for t, n in timer.epochs]}")
    return rate(timer.epochs), timer.epochs, result


def plain_run(ws, result, cfg: TrainConfig) -> tuple[float, list]:
    """The ceiling: the same training images decoded beforehand, a bare loop over them."""
    rows = result.splits[result.splits["split"] == "train"]
    classes = list(result.info["classes"])
    info = result.info
    x = torch.from_numpy(np.stack([squished_pixels(read_file(ws.library / p), cfg.img_size,
                                                   info["interpolation"], info["decode"])
                                   for p in rows["path"]])).permute(0, 3, 1, 2)
    y = torch.tensor([classes.index(lbl) for lbl in rows["label"]])
    mean = torch.tensor(info["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(info["std"]).view(1, 3, 1, 1)
    torch.manual_seed(cfg.seed)
    model = models.create_model(cfg.arch, len(classes)).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=cfg.weight_decay)
    bf16 = resolve_precision(cfg) == "bf16"
    steps = len(x) // cfg.batch_size  # fastai drops the last partial batch too
    epochs = []
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(x))
        start = time.perf_counter()
        for b in range(steps):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            xb = ((x[idx].float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
                loss = F.cross_entropy(model(xb).float(), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        epochs.append((time.perf_counter() - start, steps * cfg.batch_size))
    print(f"  plain loop: epochs (s, images): {[(round(t, 1), n) for t, n in epochs]}")
    return rate(epochs), epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=240)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-uncached", action="store_true", help="skip the run without the cache")
    args = ap.parse_args()
    photos = camera_photos(args.photos)
    cfg = TrainConfig(arch=args.arch, img_size=args.size, epochs=args.epochs,
                      batch_size=args.batch_size, patience=99, min_images=2, resume=False)
    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(Path(tmp), photos)
        cached, _, result = zoolib_run(ws, cfg)
        uncached = None
        if not args.no_uncached:
            import dataclasses
            uncached = zoolib_run(ws, dataclasses.replace(cfg, cache=False))[0]
        plain, _ = plain_run(ws, result, cfg)
    n_train = int((result.splits["split"] == "train").sum())
    print(f"{args.arch} {args.size}px, {n_train} training photos of 4032x3024 x {args.epochs} "
          f"epochs, batch {args.batch_size}, precision {resolve_precision(cfg)}, "
          f"decode {result.info['decode']}; images/s in epochs 2+")
    print(f"zoolib (cache) {cached:.1f} img/s, plain loop over decoded tensors {plain:.1f} img/s: "
          f"ratio {cached / plain:.2f}x (goal >= 0.9x)")
    if uncached is not None:
        print(f"zoolib without the cache {uncached:.1f} img/s: {uncached / plain:.2f}x the plain "
              f"loop; the cache is {cached / uncached:.2f}x")


if __name__ == "__main__":
    main()
