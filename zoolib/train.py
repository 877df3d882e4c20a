"""Training a generation with fastai: DataLoaders, Learner, plateau stop, resume.

One call, `train(workspace, TrainConfig(...))`, scans the library, selects the
classes above the cutoff, splits them by content hash, builds the model (from
scratch or warm-started from a parent generation), trains with a one-cycle
schedule until the validation loss plateaus and saves the best epoch as a new
generation. Each epoch is checkpointed under `models/_inprogress/`, so an
interrupted run resumes where it stopped when started again with the same
settings.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
from fastai.vision.all import (Callback, CancelEpochException, CategoryBlock, ColReader,
                               CrossEntropyLossFlat, DataBlock, ImageBlock, Learner, Normalize,
                               TrainEvalCallback, accuracy, aug_transforms, set_seed)

from . import library, models, splits, warmstart
from .images import load_rgb
from .workspace import (Workspace, ZoolibError, check_class_name, class_folders,
                        open_workspace)

INPROGRESS = "_inprogress"


@dataclass
class TrainConfig:
    """Every knob of a training run (the 02_train notebook's parameters).

    Attributes:
        arch: timm architecture name.
        img_size: square input size in pixels.
        epochs: one-cycle length (the most epochs the run may take).
        lr: peak learning rate of the one-cycle schedule.
        batch_size: images per batch.
        min_images: readable images a class needs to take part.
        init_from: "scratch", "last" or a generation name to warm-start from.
        patience: epochs without a better validation loss before stopping.
        throwaway: mark the generation as a throw-away run (never promoted).
        seed: random seed for the model, the order of batches and augmentation.
        flip: random left-right flips.
        max_rotate: largest rotation in degrees.
        max_zoom: largest zoom factor (1.0 = none).
        max_warp: perspective warp (0 = off).
        max_lighting: brightness/contrast change (0 = off).
        carry_rows: on a warm start, keep output rows of shared classes.
        pretrained: start a scratch run from ImageNet weights (needs internet).
        num_workers: DataLoader workers; None = fastai's default.
        resume: continue an interrupted run with the same settings.
        folds: cross-validation: k folds of train+valid by content hash (0 = off).
        fold: which fold (0..folds-1) is the valid split; test/benchmark untouched.
    """

    arch: str = "resnet18"
    img_size: int = 64
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 64
    min_images: int = 40
    init_from: str = "scratch"
    patience: int = 3
    throwaway: bool = False
    seed: int = 42
    flip: bool = True
    max_rotate: float = 10.0
    max_zoom: float = 1.1
    max_warp: float = 0.0
    max_lighting: float = 0.0
    carry_rows: bool = False
    pretrained: bool = False
    num_workers: int | None = None
    resume: bool = True
    folds: int = 0
    fold: int = 0

    def check(self) -> None:
        """Raise ZoolibError naming the first parameter that makes no sense."""
        for name in ("img_size", "epochs", "batch_size", "min_images", "patience"):
            if int(getattr(self, name)) < 1:
                raise ZoolibError(f"{name.upper()} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ZoolibError(f"LR must be positive, got {self.lr}")
        if self.max_zoom < 1:
            raise ZoolibError(f"max_zoom must be at least 1.0, got {self.max_zoom}")
        if self.folds and not (self.folds >= 2 and 0 <= self.fold < self.folds):
            raise ZoolibError(f"FOLDS={self.folds}, FOLD={self.fold}: need FOLDS >= 2 "
                              "and 0 <= FOLD < FOLDS (FOLDS=0 turns folds off)")


@dataclass
class TrainResult:
    """What a finished run produced."""

    name: str
    info: dict
    history: pd.DataFrame
    splits: pd.DataFrame = field(repr=False)


def prepare_data(ws: Workspace, cfg: TrainConfig, progress: bool = True
                 ) -> tuple[pd.DataFrame, list[str]]:
    """Scan, select the classes above the cutoff and split them.

    Returns:
        The split manifest (train, valid, test and benchmark rows) and the class list.

    Raises:
        ZoolibError: a class folder without readable images, or too few classes.
    """
    manifest = library.scan(ws, progress=progress)
    empty = sorted(set(p.name for p in class_folders(ws)) - set(manifest["label"]))
    if empty:
        raise ZoolibError(f"class folder(s) with no readable image: {', '.join(map(repr, empty))}"
                          " (no files at all); add images or remove the folder")
    classes = library.training_classes(manifest, cfg.min_images)
    for name in classes:  # class names become folder names and labels everywhere
        check_class_name(name)
    if len(classes) < 2:
        raise ZoolibError(f"only {classes} reach MIN_IMAGES={cfg.min_images}: "
                          "a classifier needs at least 2 classes")
    data = splits.split_manifest(ws, manifest, classes)
    if cfg.folds:
        data = splits.apply_fold(data, cfg.folds, cfg.fold)
    for part in ("train", "valid"):
        if not (data["split"] == part).any():
            raise ZoolibError(f"the {part} split is empty: add images")
    return data, classes


def data_hash(data: pd.DataFrame) -> str:
    """A hash of the training data (content hash, label, split), for model.json."""
    rows = data.sort_values("hash")[["hash", "label", "split"]].to_csv(index=False)
    return hashlib.blake2b(rows.encode(), digest_size=16).hexdigest()


class _SquishLoader:
    """Item loader: an upright RGB image squished to the input size.

    Resizing here with PIL (bilinear) is exactly what `inference.to_tensor` does,
    so training and serving see the same pixels; it is also about 1.5x cheaper per
    image than fastai's Resize item transform, which matters when data loading
    shares two CPU cores with the model.
    """

    def __init__(self, size: int):
        self.size = size

    def __call__(self, row) -> Image.Image:
        return load_rgb(row["file"]).resize((self.size, self.size), Image.BILINEAR)


def make_dataloaders(ws: Workspace, data: pd.DataFrame, classes: list[str],
                     cfg: TrainConfig, mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD):
    """fastai DataLoaders over the train and valid rows of a split manifest.

    Augmentation (flip, rotation, zoom; warp and lighting when asked) runs on whole
    batches, as fastai does on a GPU.
    """
    rows = data[data["split"].isin(["train", "valid"])].reset_index(drop=True)
    rows = rows.assign(is_valid=rows["split"] == "valid", file=[str(ws.library / p)
                                                                  for p in rows["path"]])
    augment = aug_transforms(do_flip=cfg.flip, flip_vert=False, max_rotate=cfg.max_rotate,
                             min_zoom=1.0, max_zoom=cfg.max_zoom, max_warp=cfg.max_warp,
                             max_lighting=cfg.max_lighting,
                             p_lighting=0.75 if cfg.max_lighting else 0.0)
    valid = rows["is_valid"].to_numpy()
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock(vocab=classes)),
        get_x=_SquishLoader(cfg.img_size),
        get_y=ColReader("label"),
        splitter=lambda items: ([i for i in range(len(items)) if not valid[i]],
                                [i for i in range(len(items)) if valid[i]]),
        batch_tfms=[*augment, Normalize.from_stats(list(mean), list(std))],
    )
    kwargs = {} if cfg.num_workers is None else {"num_workers": cfg.num_workers}
    # plain dicts as items: reading a DataFrame row per image costs more than decoding it
    records = rows[["file", "label"]].to_dict("records")
    return block.dataloaders(records, bs=cfg.batch_size, seed=cfg.seed, **kwargs)


class _Checkpoint(Callback):
    """Save model, optimizer and progress after every epoch so a run can resume."""

    order = 62  # after SaveModelCallback (61) updates the best, before EarlyStopping (63) may stop

    def __init__(self, run_dir: Path, history: list[dict]):
        self.run_dir, self.history = run_dir, history

    def after_epoch(self):
        names = self.recorder.metric_names[1:-1]
        row = {"epoch": self.epoch + 1, **dict(zip(names, map(float, self.recorder.values[-1])))}
        self.history.append(row)
        self.learn.save("last", with_opt=True)
        state = {"epochs_done": self.epoch + 1, "best": float(self.learn.save_model.best),
                 "history": self.history}
        _write_json(self.run_dir / "state.json", state)


class _SkipDone(Callback):
    """On resume, skip the epochs already done.

    fastai's own `start_epoch` lets the recorder and trackers see the skipped
    epochs as empty rows (and fail); here they are switched off while skipping.
    The one-cycle schedule stays right: fastai derives its position from the epoch.
    """

    order = -10

    def __init__(self, done: int):
        self.done = done

    def before_fit(self):
        self.others = [cb for cb in self.learn.cbs
                       if cb is not self and not isinstance(cb, TrainEvalCallback) and cb.run]

    def before_epoch(self):
        skip = self.epoch < self.done
        for cb in self.others:
            cb.run = not skip
        if skip:
            raise CancelEpochException()


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def _initial_model(ws: Workspace, cfg: TrainConfig, classes: list[str]):
    if cfg.init_from == "scratch":
        model = models.create_model(cfg.arch, len(classes), pretrained=cfg.pretrained)
        return model, {"parent": None, "init": "pretrained" if cfg.pretrained else "scratch",
                       "head_init": "random"}
    parent = models.resolve_generation(ws, cfg.init_from)
    return warmstart.warm_start(ws, parent, cfg.arch, classes, carry_rows=cfg.carry_rows)


def _run_dir(ws: Workspace, run_key: dict, resume: bool) -> tuple[Path, dict | None]:
    """The in-progress folder, and the saved state if it holds a matching run."""
    run_dir = ws.models / INPROGRESS
    saved = run_dir / "run.json"
    if resume and saved.exists() and (run_dir / "state.json").exists():
        if json.loads(saved.read_text()) == json.loads(json.dumps(run_key, default=str)):
            return run_dir, json.loads((run_dir / "state.json").read_text())
        print(f"an unfinished run with other settings in {run_dir} is discarded")
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "checkpoint").mkdir(parents=True)
    _write_json(saved, run_key)
    return run_dir, None


def build_learner(ws: Workspace, cfg: TrainConfig, data: pd.DataFrame, classes: list[str],
                  model: torch.nn.Module, run_dir: Path, extra_cbs=()) -> Learner:
    """The fastai Learner of a run: one-cycle ready, with plateau stop and checkpoints."""
    dls = make_dataloaders(ws, data, classes, cfg)
    cbs = [SaveModelCallback(monitor="valid_loss", fname="best", reset_on_fit=False),
           EarlyStoppingCallback(monitor="valid_loss", patience=cfg.patience,
                                 reset_on_fit=False), *extra_cbs]
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                   path=run_dir, model_dir="checkpoint", cbs=cbs)


def train(workspace, cfg: TrainConfig, progress: bool = True, extra_cbs=()) -> TrainResult:
    """Train and save one generation.

    Args:
        workspace: a workspace path or Workspace.
        cfg: the run's settings.
        progress: show fastai's progress bars and epoch table.
        extra_cbs: additional fastai callbacks (tests use one to interrupt a run).

    Returns:
        The saved generation's name, model.json content, history and splits.

    Raises:
        ZoolibError: bad settings, data or INIT_FROM (message names the problem).
    """
    cfg.check()
    ws = open_workspace(workspace)
    data, classes = prepare_data(ws, cfg, progress=progress)
    set_seed(cfg.seed, reproducible=True)
    model, init = _initial_model(ws, cfg, classes)
    run_key = {"config": asdict(cfg), "classes": classes, "data": data_hash(data),
               "init": init}
    run_dir, state = _run_dir(ws, run_key, cfg.resume)
    history = list(state["history"]) if state else []
    start = state["epochs_done"] if state else 0
    learn = build_learner(ws, cfg, data, classes, model, run_dir,
                          extra_cbs=[_Checkpoint(run_dir, history), _SkipDone(start), *extra_cbs])
    if state:
        learn.load("last", with_opt=True, weights_only=False)
        learn.save_model.best = learn.early_stopping.best = state["best"]
        print(f"resuming an interrupted run after epoch {start}")
    started = time.perf_counter()
    with _quiet(learn, progress):
        if start < cfg.epochs:
            learn.fit_one_cycle(cfg.epochs, lr_max=cfg.lr)
    seconds = time.perf_counter() - started
    return _finish(ws, cfg, learn, data, classes, init, history, seconds, start, run_dir)


class _quiet:
    """Context that hides fastai's bars and tables when progress is off."""

    def __init__(self, learn: Learner, progress: bool):
        self.ctx = None if progress else (learn.no_bar(), learn.no_logging())

    def __enter__(self):
        for c in self.ctx or ():
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.ctx or ()):
            c.__exit__(*exc)


def _finish(ws, cfg, learn, data, classes, init, history, seconds, start, run_dir):
    hist = pd.DataFrame(history)
    best_epoch = int(hist["valid_loss"].idxmin()) + 1
    epochs_run = len(hist)
    n_train = int((data["split"] == "train").sum())
    counts = data.groupby("split").size().to_dict()
    info = {
        "arch": cfg.arch, "img_size": cfg.img_size,
        "mean": list(models.IMAGENET_MEAN), "std": list(models.IMAGENET_STD),
        "resize": "squish", "interpolation": "bilinear", "classes": classes, **init,
        "min_images": cfg.min_images, "throwaway": cfg.throwaway,
        "data_hash": data_hash(data), "split_counts": counts, "config": asdict(cfg),
        "metrics": {
            "best_valid_loss": float(hist["valid_loss"].min()),
            "valid_accuracy": float(hist["accuracy"].iloc[best_epoch - 1]),
            "plateau_epoch": best_epoch, "epochs_run": epochs_run,
            "stopped_early": epochs_run < cfg.epochs,
            "train_seconds": round(seconds, 2),
            "train_images_per_s": round(n_train * (epochs_run - start) / max(seconds, 1e-9), 1),
        },
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }
    name = models.save_generation(ws, learn.model, info, hist)
    shutil.rmtree(run_dir, ignore_errors=True)
    return TrainResult(name=name, info=models.read_info(ws, name), history=hist, splits=data)
