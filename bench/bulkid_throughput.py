"""Bulk identification throughput: zoolib (per runtime) vs fastai get_preds vs the bare model.

One run, the same model (a timm resnet18 with random weights saved as a zoolib
generation) and the same files, measured side by side in images/s:

- forward <runtime>: the bare pass bulk identification makes (`inference.outputs`
  with the knn stage features) on pre-decoded, pre-normalised tensors, batch by
  batch, with each runtime zoolib offers here (torch; onnx and onnx-int8 with
  the `onnx` extra): no file reading, no decoding;
- ceiling: the fastest of those bare passes;
- zoolib <runtime>: `bulkid.run(..., runtime=...)` end to end (list of files ->
  results.parquet with hashes, scores, knn and embeddings), timed around the call;
  "zoolib" is the fastest runtime's, and "zoolib onnx/torch" compares the two;
- fastai: `learn.get_preds(dl=learn.dls.test_dl(files))` on a Learner over the
  same model, its DataLoaders built as a fastai user builds them
  (`ImageDataLoaders.from_lists` with a squish `Resize` item transform and
  ImageNet `Normalize`);
- fastai_zl: the same call, the Learner built on zoolib's training DataLoaders
  instead, whose item loader squish-resizes with Pillow directly (~1.5x cheaper
  per image than fastai's Resize): a stricter baseline, reported alongside.

Datasets: ../shared/datasets/cifar10/train (32 px JPEGs, model at 32 px),
../shared/datasets/animals10-mini (photos, model at 224 px), and camera photos
made from them (`photos.camera_photos`: 4032x3024 JPEGs, quality 90, some with
EXIF orientations; model at 224 and 299 px). The generation decodes as new
generations do (`images.DECODE`). Each path gets a
warm-up run first; with --repeats > 1 the paths are interleaved and the best
run of each is kept. The ONNX export of each runtime is made before timing (on
first load). onnx-int8's images/s say nothing of its accuracy. Run it with `nice`:

    nice .venv/bin/python bench/bulkid_throughput.py [--cifar 4000] [--animals 320]
        [--camera 200] [--camera-sizes 224,299] [--runtimes torch,onnx,onnx-int8]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from itertools import zip_longest
from pathlib import Path

import pandas as pd
import torch

from photos import camera_photos
from zoolib import bulkid, inference, models, workspace
from zoolib.images import DECODE
from zoolib.workspace import ZoolibError

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def pick_files(root: Path, n: int) -> tuple[list[Path], list[str]]:
    """Up to n files taken round-robin over the class folders, and the class names."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    per_class = [sorted((root / c).iterdir()) for c in classes]
    files = [f for group in zip_longest(*per_class) for f in group if f is not None]
    return files[:n], classes


def make_generation(root: Path, classes: list[str], size: int) -> workspace.Workspace:
    """A temporary workspace holding a random-weight resnet18 generation."""
    ws = workspace.create(root)
    (ws.library / classes[0]).mkdir(exist_ok=True)  # open_workspace wants one class folder
    info = {"arch": "resnet18", "img_size": size, "mean": list(models.IMAGENET_MEAN),
            "std": list(models.IMAGENET_STD), "classes": classes, "resize": "squish",
            "interpolation": "bilinear", "decode": DECODE}
    torch.manual_seed(0)
    models.save_generation(ws, models.create_model("resnet18", len(classes)), info)
    return ws


def available_runtimes(wanted: list[str]) -> list[str]:
    """The wanted runtimes this environment can run (the ONNX ones need the extra)."""
    try:
        from zoolib import onnx_export

        onnx_export.require()
        have = list(inference.RUNTIMES)
    except ZoolibError as exc:
        print(f"ONNX runtimes skipped: {exc}")
        have = ["torch"]
    return [r for r in wanted if r in have]


def time_forward(loaded: inference.Loaded, files: list[Path], batch_size: int) -> float:
    """images/s of the bare pass (with the knn stage features) on tensors decoded
    beforehand (not timed)."""
    ds = bulkid.ImageFiles(files, loaded.info["img_size"], decode=loaded.info["decode"])
    pixels = torch.stack([ds[i][0] for i in range(len(ds))])
    batches = [bulkid.normalise(pixels[i:i + batch_size], loaded.info, loaded.device)
               for i in range(0, len(pixels), batch_size)]
    inference.outputs(loaded, batches[0], stage=True)  # warm-up
    start = time.perf_counter()
    for b in batches:
        inference.outputs(loaded, b, stage=True)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    return len(files) / (time.perf_counter() - start)


def time_zoolib(ws, files: list[Path], batch_size: int, workers: int | None, tag: str,
                device: str | None, runtime: str = "torch") -> float:
    """images/s of bulkid.run end to end (model load, decode, forward, parquet)."""
    start = time.perf_counter()
    out = bulkid.run(ws, files=files, name=f"bench-{runtime}-{tag}", batch_size=batch_size,
                     num_workers=workers, progress=False, runtime=runtime,
                     device=device if runtime == "torch" else None)  # ONNX: the CPU
    seconds = time.perf_counter() - start
    assert len(out) == len(files) and (out["error"] == "").all()
    return len(files) / seconds


def fastai_learner(ws, loaded: inference.Loaded, files: list[Path], batch_size: int,
                   workers: int | None, stock: bool = True):
    """A fastai Learner over the same model: stock fastai DataLoaders, or zoolib's."""
    # imported here: --no-fastai runs without fastai
    from fastai.vision.all import (ImageDataLoaders, Learner, Normalize, Resize, ResizeMethod,
                                   imagenet_stats)

    from zoolib.loaders import make_dataloaders
    from zoolib.train import TrainConfig

    classes, size = loaded.classes, loaded.info["img_size"]
    picked = files[:2 * len(classes)]  # a tiny train/valid set: only test_dl is timed
    labels = [classes[i % len(classes)] for i in range(len(picked))]
    kw = {} if workers is None else {"num_workers": workers}
    if stock:
        dls = ImageDataLoaders.from_lists(
            ws.root, picked, labels, valid_pct=0.5, seed=0, bs=batch_size,
            item_tfms=Resize(size, method=ResizeMethod.Squish),
            batch_tfms=Normalize.from_stats(*imagenet_stats), device=loaded.device, **kw)
    else:
        rows = pd.DataFrame({"path": [str(f) for f in picked], "label": labels,
                             "split": ["train", "valid"] * (len(picked) // 2)})
        cfg = TrainConfig(img_size=size, batch_size=batch_size, num_workers=workers)
        dls = make_dataloaders(ws, rows, classes, cfg).to(loaded.device)
    return Learner(dls, loaded.model)


def time_fastai(learn, files: list[Path], stock: bool) -> float:
    """images/s of learn.get_preds over a test DataLoader of the files."""
    start = time.perf_counter()
    # items as each DataLoaders expects them: paths, or records as in zoolib's training
    dl = learn.dls.test_dl(files if stock else [{"file": str(f)} for f in files])
    with learn.no_bar():
        probs, _ = learn.get_preds(dl=dl)
    seconds = time.perf_counter() - start
    assert probs.shape[0] == len(files)
    return len(files) / seconds


def bench(name: str, root: Path, n: int, size: int, args) -> dict:
    files, classes = pick_files(root, n)
    runtimes = args.runtimes
    with tempfile.TemporaryDirectory() as tmp:
        ws = make_generation(Path(tmp) / "ws", classes, size)
        # Loading with an ONNX runtime exports the generation: done here, untimed.
        loaded = {r: inference.load(ws, "last", device=None if r != "torch" else args.device,
                                    runtime=r) for r in runtimes}
        model = loaded["torch"] if "torch" in loaded else loaded[runtimes[0]]
        learners = {} if args.no_fastai else {
            "fastai": fastai_learner(ws, model, files, args.batch_size, args.workers),
            "fastai_zl": fastai_learner(ws, model, files, args.batch_size, args.workers,
                                        stock=False)}
        warm = files[: 2 * args.batch_size]
        for r in runtimes:
            time_zoolib(ws, warm, args.batch_size, args.workers, "warm", args.device, r)
        for key, learn in learners.items():
            time_fastai(learn, warm, key == "fastai")
        keys = [f"forward {r}" for r in runtimes] + [f"zoolib {r}" for r in runtimes]
        other = args.compare_workers  # the same runs with another number of decoders
        if other is not None:
            keys += [f"zoolib {r} w{other}" for r in runtimes]
        best = dict.fromkeys([*keys, *learners], 0.0)
        for rep in range(args.repeats):
            for r in runtimes:  # interleaved, so that no runtime always runs first
                best[f"forward {r}"] = max(best[f"forward {r}"],
                                           time_forward(loaded[r], files, args.batch_size))
                best[f"zoolib {r}"] = max(best[f"zoolib {r}"], time_zoolib(
                    ws, files, args.batch_size, args.workers, str(rep), args.device, r))
                if other is not None:
                    best[f"zoolib {r} w{other}"] = max(best[f"zoolib {r} w{other}"], time_zoolib(
                        ws, files, args.batch_size, other, f"w{other}-{rep}", args.device, r))
            for key, learn in learners.items():
                best[key] = max(best[key], time_fastai(learn, files, key == "fastai"))
    fastest = max(runtimes, key=lambda r: best[f"forward {r}"])
    best["ceiling"] = best[f"forward {fastest}"]
    best["zoolib"] = max(best[f"zoolib {r}"] for r in runtimes)
    row = {"dataset": name, "images": len(files), "px": size, **best,
           "zoolib/ceiling": best["zoolib"] / best["ceiling"]}
    for r in runtimes:
        row[f"zoolib {r}/ceiling"] = best[f"zoolib {r}"] / best["ceiling"]
        if other is not None:
            row[f"zoolib {r} w{other}/ceiling"] = best[f"zoolib {r} w{other}"] / best["ceiling"]
    if "torch" in runtimes and "onnx" in runtimes:
        row["zoolib onnx/torch"] = best["zoolib onnx"] / best["zoolib torch"]
        row["forward onnx/torch"] = best["forward onnx"] / best["forward torch"]
    print(f"{name}: ceiling = forward {fastest}")
    for key in learners:
        row.update({f"{key}/ceiling": best[key] / best["ceiling"],
                    f"zoolib/{key}": best["zoolib"] / best[key]})
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=int, default=4000, help="CIFAR-10 files (0 = skip)")
    parser.add_argument("--animals", type=int, default=320, help="animals10 photos (0 = skip)")
    parser.add_argument("--camera", type=int, default=200,
                        help="12-megapixel photos made from animals10-mini (0 = skip)")
    parser.add_argument("--camera-sizes", default="224,299", help="model input sizes for them")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers for zoolib and fastai (default: zoolib's)")
    parser.add_argument("--compare-workers", type=int, default=None,
                        help="also time zoolib with this many decoding workers, in the same run")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: auto)")
    parser.add_argument("--no-fastai", action="store_true", help="skip the fastai path")
    parser.add_argument("--runtimes", default="torch,onnx",
                        help="comma-separated, of " + ", ".join(inference.RUNTIMES)
                        + " (ONNX ones skipped without the onnx extra)")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args(argv)
    wanted = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = sorted(set(wanted) - set(inference.RUNTIMES))
    if unknown or not wanted:
        parser.error(f"--runtimes: unknown {unknown or 'none given'}; "
                     f"choose from {', '.join(inference.RUNTIMES)}")
    args.runtimes = available_runtimes(wanted)
    if not args.runtimes:
        parser.error("--runtimes: none of them can run here (install the onnx extra)")
    if args.workers is None:  # zoolib's default, given to fastai too
        cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
        args.workers = bulkid.engine._default_workers(cuda)
    print(f"torch threads {torch.get_num_threads()}, workers {args.workers}, "
          f"batch {args.batch_size}, device {args.device or 'auto'}, "
          f"runtimes {', '.join(args.runtimes)}")
    rows = []
    if args.cifar:
        rows.append(bench("cifar10", args.data / "cifar10" / "train", args.cifar, 32, args))
    if args.animals:
        rows.append(bench("animals10-mini", args.data / "animals10-mini", args.animals, 224,
                          args))
    if args.camera:
        folder = camera_photos(args.camera)[0].parents[1]
        for size in (int(v) for v in args.camera_sizes.split(",")):
            rows.append(bench(f"camera {size}px", folder, args.camera, size, args))
    table = pd.DataFrame(rows).set_index("dataset").T  # a column per data set: fits a screen
    print("images/s (higher is better) and ratios, measured in this run:")
    print(table.map(lambda v: f"{v:.0f}" if v >= 10 else f"{v:.2f}").to_string())


if __name__ == "__main__":
    main()
