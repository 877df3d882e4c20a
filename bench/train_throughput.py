"""Training throughput: zoolib's training path versus a plain PyTorch loop.

Both train the same timm model (same seed) on the same image files, with the same
batch size, number of epochs, one-cycle schedule, augmentation (flip, rotation,
zoom) and a validation pass per epoch. zoolib runs fastai through
`train.build_learner` with all of its callbacks (best-model tracking, plateau
stop, per-epoch checkpoint). The figure is training images per second of wall
time; the two are run alternately and the best of `--repeats` is kept for each, so
load from other processes hits both alike.

    python bench/train_throughput.py                 # CIFAR-10 animals if ../shared is there
    python bench/train_throughput.py --per-class 200 --epochs 2 --size 32
"""
from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from cifar import place
from zoolib import demo, library, models, splits, workspace
from zoolib.images import load_rgb
from zoolib.train import INPROGRESS, TrainConfig, build_learner

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10" / "train"
ANIMALS = ["bird", "cat", "deer", "dog", "frog", "horse"]


def make_workspace(root: Path, per_class: int) -> workspace.Workspace:
    """A workspace of CIFAR-10 animal JPEGs (hard-linked), or the demo if absent."""
    if not CIFAR.is_dir():
        print("../shared/datasets/cifar10 not found: using the demo workspace")
        return demo.build(root / "ws")
    ws = workspace.create(root / "ws")
    for cls in ANIMALS:
        (ws.library / cls).mkdir()
        for f in sorted((CIFAR / cls).glob("*.jpg"))[:per_class]:
            place(f, ws.library / cls / f.name)
    return ws


class Files(Dataset):
    """Decode, squish-resize and tensorise: what a hand-written loop would do."""

    def __init__(self, rows, classes, size, train):
        self.items = [(str(p), classes.index(lbl)) for p, lbl in rows]
        aug = [v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=10, scale=(1.0, 1.1))]
        # augment the small PIL image, then tensorise: the cheap order for a CPU
        self.tf = v2.Compose([v2.Resize((size, size)), *(aug if train else []),
                              v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                              v2.Normalize(models.IMAGENET_MEAN, models.IMAGENET_STD)])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, y = self.items[i]
        return self.tf(load_rgb(path)), y


def plain_loop(ws, data, classes, cfg) -> float:
    """Train with a hand-written loop; return seconds."""
    rows = lambda s: list(zip((ws.library / p for p in data.loc[data.split == s, "path"]),  # noqa: E731
                              data.loc[data.split == s, "label"]))
    # one torch thread per worker, as fastai does: otherwise workers fight the model
    kw = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers or 0,
              worker_init_fn=lambda _: torch.set_num_threads(1))
    train_dl = DataLoader(Files(rows("train"), classes, cfg.img_size, True), shuffle=True,
                          drop_last=True, **kw)
    valid_dl = DataLoader(Files(rows("valid"), classes, cfg.img_size, False), **kw)
    torch.manual_seed(cfg.seed)
    model = models.create_model(cfg.arch, len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * len(train_dl))
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        model.train()
        for x, y in train_dl:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            for x, y in valid_dl:
                model(x)
    return time.perf_counter() - start


def zoolib_loop(ws, data, classes, cfg) -> float:
    """Train through zoolib's fastai Learner (all callbacks on); return seconds."""
    torch.manual_seed(cfg.seed)
    model = models.create_model(cfg.arch, len(classes))
    run_dir = ws.models / INPROGRESS
    (run_dir / "checkpoint").mkdir(parents=True, exist_ok=True)
    from zoolib.train import _Checkpoint  # the per-epoch checkpoint of a real run

    learn = build_learner(ws, cfg, data, classes, model, run_dir,
                          extra_cbs=[_Checkpoint(run_dir, [])])
    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(cfg.epochs, lr_max=cfg.lr)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=1000)  # epochs of realistic length
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    cfg = TrainConfig(arch=args.arch, img_size=args.size, epochs=args.epochs,
                      batch_size=args.batch_size, num_workers=args.workers, patience=99)
    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(Path(tmp), args.per_class)
        manifest = library.scan(ws, progress=False)
        classes = library.training_classes(manifest, 2)
        data = splits.split_manifest(ws, manifest, classes)
        n_train = int((data.split == "train").sum())
        # fastai's train loader drops the last partial batch, as the plain loop does
        imgs = args.epochs * (n_train // args.batch_size) * args.batch_size
        times = {"zoolib": math.inf, "plain": math.inf}
        for r in range(args.repeats):
            for name, fn in (("zoolib", zoolib_loop), ("plain", plain_loop)):
                random.seed(r)
                t = fn(ws, data, classes, cfg)
                times[name] = min(times[name], t)
                print(f"  run {r + 1} {name:6s}: {imgs / t:7.1f} img/s ({t:.1f} s)")
    z, p = imgs / times["zoolib"], imgs / times["plain"]
    print(f"{args.arch} {args.size}px, {n_train} train images x {args.epochs} epochs, "
          f"batch {args.batch_size}, {args.workers} workers")
    print(f"zoolib {z:.1f} img/s, plain PyTorch {p:.1f} img/s, ratio {z / p:.2f}x (goal >= 0.9x)")


if __name__ == "__main__":
    main()
