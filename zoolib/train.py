"""Training a generation with fastai: the recipe, the warm-start fine-tune, resume.

One call, `train(workspace, TrainConfig(...))`, scans the library, selects the
classes above the cutoff, splits them by content hash, builds the model (from
scratch or warm-started from a parent generation), trains it and saves the kept
epoch as a new generation.

The recipe, each piece from fastai or timm:

- architecture by timm name; `zoo_cnn` (zoolib/archs.py) for small inputs;
- augmentation on whole batches: flip, slight rotation and zoom (the
  practitioner's), whole-pixel translation, optional warp and lighting;
- label smoothing, decoupled weight decay (fastai's Adam), an exponential
  moving average of the weights (timm's ModelEmaV3) that validation and the
  saved model use;
- mixed precision where it pays: fastai's `MixedPrecision` on CUDA, bfloat16
  autocast on CPUs with native bfloat16; fastai's `ChannelsLast` everywhere
  (oneDNN's CPU convolutions are faster on it too: zoo_cnn trains 1.4x faster
  at 32 px on 2 cores, measured);
- the schedule of zoolib/schedule.py: warm up, hold the peak rate until the
  validation loss plateaus, then anneal; the best annealed epoch is kept.

A warm start is a fine-tune: the Learner's splitter (`recipe.split_groups`)
makes the body and the new output layer two parameter groups, so fastai's
`freeze` trains the head alone for `freeze_epochs` (batch-norm statistics frozen
too), then the whole model trains with the body at `lr_warm / lr_mult`.

Each epoch is checkpointed under `models/_inprogress/`, so an interrupted run
resumes where it stopped when started again with the same settings. A run
killed while writing its checkpoint (a `saving` file marks the folder for the
time the epoch's files are written) starts again from epoch 1 instead, saying so.
A run killed after saving its generation but before removing its folder is
not trained again: its run.json carries an id (`attempt`) that the saved
model.json repeats (`run_attempt`), and the next start finds it.

Under torchrun (zoolib/distributed.py) every process calls `train`; rank 0 alone
writes (data preparation, the run folder, checkpoints, the generation) and sends
what it decided to the others (`distributed.on_main`). model.json records the
number of processes: the effective batch is `processes` x `batch_size`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.training import BnFreeze
from fastai.optimizer import Adam, OptimWrapper
from fastai.vision.all import (CategoryBlock, ColReader, CrossEntropyLossFlat, DataBlock,
                               ImageBlock, Learner, Normalize, accuracy, set_seed)
from timm.optim import Lookahead
from fastai.torch_core import get_model

from . import augment, library, models, recipe, splits, warmstart
from .config import TrainConfig
from .callbacks import (RNG_FILE, Checkpoint, CpuAutocast, Ema, GroupWeightDecay, LookaheadRate,
                        ReleaseMemory, SkipDone, TrainableUntil,
                        cpu_has_bf16, release_memory)
from .distributed import is_main, on_main, parallel_callbacks, rank0_first, world_size
from .images import read_file, squished_pixels
from .muon import MuonSGD
from .pixel_cache import PixelCache
from .schedule import PlateauSchedule, Progress, TriangleSchedule
from .workspace import (Workspace, ZoolibError, check_class_name, class_folders, file_lock,
                        open_workspace, write_atomic)

INPROGRESS = "_inprogress"
SAVING = "saving"  # in a run folder while an epoch's checkpoint files are being written


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
    classes = library.training_classes(manifest, cfg.min_images, library.discarded_paths(ws))
    for name in classes:  # class names become folder names and labels everywhere
        check_class_name(name)
    if len(classes) < 2:
        raise ZoolibError(f"only {classes} reach MIN_IMAGES={cfg.min_images}: "
                          "a classifier needs at least 2 classes")
    conflicts = splits.conflicting_labels(ws, manifest, classes)
    if len(conflicts):  # left out by split_manifest; say which, so curation can fix them
        print(f"left out {len(conflicts)} image(s) whose content is filed under two classes: "
              + ", ".join(conflicts["path"]))
    if not cfg.throwaway:  # a class's benchmark freezes when it first trains for real
        splits.freeze_benchmark(ws, manifest, classes)
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
    """Item loader: an image's model-input pixels (upright RGB, squish-resized, uint8).

    The pixels come from `images.squished_pixels`, the decode path inference uses
    too, with the filter and decode mode model.json records, so training and
    serving see the same pixels; resizing before fastai's item transforms is also
    about 1.5x cheaper per image than its Resize, which matters when data loading
    shares two CPU cores with the model. With a `PixelCache` each image is decoded
    once per input size, not once per epoch.
    """

    def __init__(self, size: int, interpolation: str = "bilinear", decode: str = "full",
                 cache: PixelCache | None = None, flip: augment.AlternatingFlip | None = None):
        self.size, self.interpolation, self.decode, self.cache = size, interpolation, decode, cache
        self.flip = flip

    def __call__(self, row):
        pixels = self.pixels(row)
        if self.flip is not None and row.get("train"):  # never a validation image
            pixels = self.flip(pixels, row["hash"])
        return pixels

    def pixels(self, row):
        """The image's pixels as inference sees them (no augmentation)."""
        try:
            if self.cache is not None:
                return self.cache.get(row["file"], row["hash"])
            return squished_pixels(read_file(row["file"]), self.size, self.interpolation,
                                   self.decode)
        except Exception as exc:  # noqa: BLE001 - say which file, whatever the decoder raised
            raise ZoolibError(f"cannot decode training image {row['file']}: "
                              f"{type(exc).__name__}: {exc}; rescan the library (01_curate) "
                              "or move the file out") from exc


def _workers(cfg: TrainConfig) -> dict:
    """DataLoader workers: none on a machine of 2 cores or fewer (they would only
    take cores from the model's threads), else fastai's default."""
    if cfg.num_workers is not None:
        return {"num_workers": cfg.num_workers}
    return {"num_workers": 0} if (torch.get_num_threads() <= 2
                                  and not torch.cuda.is_available()) else {}


def make_dataloaders(ws: Workspace, data: pd.DataFrame, classes: list[str],
                     cfg: TrainConfig, prep: dict | None = None, progress: bool = True):
    """fastai DataLoaders over the train and valid rows of a split manifest.

    Args:
        prep: mean, std, interpolation and decode (`models.preprocessing`);
            a new scratch model's when None.
        progress: show the progress of filling the pixel cache (`cfg.cache`).

    Augmentation runs on whole training batches, as fastai does on a GPU (the
    alternating flip as items load); a validation batch is the inference
    preprocessing of its files, nothing more. The batch size is at most the number
    of training images (fastai drops a last short batch). The item loader is kept
    as `dls.item_loader` (the whitening init reads training pixels through it).
    """
    cfg = cfg.resolved()
    prep = prep or models.preprocessing(None, pretrained=False)
    rows = data[data["split"].isin(["train", "valid"])].reset_index(drop=True)
    rows = rows.assign(is_valid=rows["split"] == "valid", file=[str(ws.library / p)
                                                                  for p in rows["path"]])
    valid = rows["is_valid"].to_numpy()
    decode = prep["decode"]
    cache = None
    if cfg.cache:  # decoded once here, in parallel, rather than in the first epoch's loop
        cache = PixelCache(ws, cfg.img_size, prep["interpolation"], decode)
        cache.fill(rows["file"].tolist(), rows["hash"].tolist(), progress=progress)
    flip = augment.AlternatingFlip(cfg.seed) if cfg.flip == "alternate" else None
    loader = _SquishLoader(cfg.img_size, prep["interpolation"], decode, cache, flip)
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock(vocab=classes)),
        get_x=loader,
        get_y=ColReader("label"),
        splitter=lambda items: ([i for i in range(len(items)) if not valid[i]],
                                [i for i in range(len(items)) if valid[i]]),
        batch_tfms=[*augment.batch_augmentation(cfg),
                    Normalize.from_stats(list(prep["mean"]), list(prep["std"]))],
    )
    # plain dicts as items: reading a DataFrame row per image costs more than decoding it
    records = rows.assign(train=~rows["is_valid"])[["file", "hash", "label", "train"]]
    bs = batch_size(cfg, int((~rows["is_valid"]).sum()))
    dls = block.dataloaders(records.to_dict("records"), bs=bs, seed=cfg.seed, **_workers(cfg))
    dls.item_loader = loader
    return dls


def batch_size(cfg: TrainConfig, n_train: int) -> int:
    """Images per step: BATCH_SIZE, or all training images when there are fewer;
    None (the airbench recipe's): `recipe.auto_batch`."""
    if cfg.batch_size is None:
        return recipe.auto_batch(n_train)
    return max(1, min(int(cfg.batch_size), n_train))


def whitening_images(dls, n: int = 5000, seed: int = 0) -> torch.Tensor:
    """Up to `n` training images, normalised as the model sees them, unaugmented:
    what the whitening init measures (airbench uses 5,000)."""
    items = dls.train_ds.items
    pick = np.random.default_rng(seed).permutation(len(items))[:n]
    pixels = np.stack([dls.item_loader.pixels(items[i]) for i in sorted(pick)])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255)
    norm = next(t for t in dls.after_batch if isinstance(t, Normalize))
    return (x - norm.mean.view(1, -1, 1, 1).cpu()) / norm.std.view(1, -1, 1, 1).cpu()


def _initial_model(ws: Workspace, cfg: TrainConfig, classes: list[str]):
    """The model to train, its model.json record and its preprocessing."""
    if cfg.init_from == "scratch":
        args = recipe.model_args(cfg)
        model = models.create_model(cfg.arch, len(classes), pretrained=cfg.pretrained, **args)
        if cfg.dirac:
            recipe.dirac_init(model)
        return model, {"parent": None, "init": "pretrained" if cfg.pretrained else "scratch",
                       "head_init": "random", "model_args": args}, models.preprocessing(
                           model, cfg.pretrained)
    parent = models.resolve_generation(ws, cfg.init_from)
    model, record = warmstart.warm_start(ws, parent, cfg.arch, classes, carry_rows=cfg.carry_rows,
                                         shrink=cfg.warm_shrink, perturb=cfg.warm_perturb)
    # the body learned on the parent's inputs: keep its normalisation, filter and decode
    p_info = models.read_info(ws, parent)
    prep = {key: p_info[key] for key in ("mean", "std", "interpolation", "decode")}
    return model, record, prep


def _run_path(ws: Workspace, run_key: dict) -> Path:
    """The run's own in-progress folder, named by a hash of its settings, classes and
    data: an interrupted run of other settings keeps its folder (and can resume)."""
    key = json.dumps(run_key, sort_keys=True, default=str)
    return ws.models / INPROGRESS / hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


@contextmanager
def _exclusive(ws: Workspace, run_dir: Path):
    """Hold the run's lock: a second process starting the same run is refused. The
    lock file lives in `.zoolib/locks/` (it stays; see `workspace.file_lock`)."""
    lock = ws.cache / "locks" / f"train-{run_dir.name}.lock"
    with file_lock(lock, 0, f"the same training run is already going on in another process "
                            f"({run_dir}); wait for it, or change a setting"):
        try:
            yield
        finally:
            if run_dir.parent.exists() and not any(run_dir.parent.iterdir()):
                run_dir.parent.rmdir()


def _run_dir(run_dir: Path, run_key: dict, resume: bool) -> dict | None:
    """Prepare the run folder; the saved state when it holds an interrupted run to resume.

    A folder that cannot be resumed (see `_unresumable`) is started again from
    epoch 1, saying why; temporaries of a killed process in it are removed.
    """
    saved = run_dir / "run.json"
    if resume and saved.exists() and (run_dir / "state.json").exists():
        problem = _unresumable(run_dir)
        if problem is None:
            models.remove_dead_temps(run_dir)
            models.remove_dead_temps(run_dir / "checkpoint")
            return json.loads((run_dir / "state.json").read_text())
        print(f"cannot resume the interrupted run in {run_dir}: {problem}; "
              "starting it again from epoch 1")
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "checkpoint").mkdir(parents=True)
    record = {**run_key, "attempt": uuid.uuid4().hex}
    write_atomic(saved, json.dumps(record, indent=2, default=str))
    return None


def _unresumable(run_dir: Path) -> str | None:
    """Why an interrupted run's folder cannot be resumed, or None when it can."""
    if (run_dir / SAVING).exists():
        return ("it was stopped while writing an epoch's checkpoint, so the checkpoint "
                "files may come from two epochs or be cut short")
    try:
        state = json.loads((run_dir / "state.json").read_bytes())
        int(state["epochs_done"]), list(state["history"]), dict(state["schedule"])
    except (ValueError, KeyError, TypeError) as exc:
        return f"its state.json is unreadable ({type(exc).__name__}: {exc})"
    if not (run_dir / "checkpoint" / "last.pth").exists():
        return "its checkpoint/last.pth is missing"
    return None


def _attempt(run_dir: Path) -> str | None:
    """The id of the run attempt in a run folder (None for a folder of older zoolib)."""
    try:
        return json.loads((run_dir / "run.json").read_bytes()).get("attempt")
    except (OSError, ValueError, AttributeError):
        return None


def _saved_as(ws: Workspace, run_dir: Path) -> str | None:
    """The generation an interrupted run was saved as before it could remove its folder."""
    attempt = _attempt(run_dir) if run_dir.is_dir() else None
    if attempt is None:
        return None
    for name in reversed(models.generation_names(ws)):
        if models.read_info(ws, name).get("run_attempt") == attempt:
            return name
    return None


def _discard_run(run_dir: Path) -> None:
    """Remove a finished run's folder: renamed first (atomic), so a kill part-way
    through the removal leaves a dead temporary (`models.remove_dead_temps` cleans
    it), never a folder that looks like a run to resume."""
    if not run_dir.exists():
        return
    dead = run_dir.with_name(f".{run_dir.name}.{os.getpid()}-done.tmp")
    run_dir.rename(dead)
    shutil.rmtree(dead, ignore_errors=True)


class _MarkedCheckpoint(Checkpoint):
    """`Checkpoint` with the run folder marked (`SAVING`) while it writes.

    `Checkpoint` writes the weights, random state and averaged weights in place,
    then state.json: a kill in between leaves files of two epochs, or one cut
    short, that no resume must load. The mark tells `_unresumable`. (kept.pth,
    written before by the schedule, is atomic: a resume re-runs its epoch.)
    """

    def after_epoch(self):
        mark = self.run_dir / SAVING
        mark.write_text(str(self.epoch + 1))
        super().after_epoch()
        mark.unlink()


def resolve_precision(cfg: TrainConfig) -> str:
    """The precision a run uses: "auto" picks fp16 on CUDA, bf16 on CPUs that have it.

    Raises:
        ZoolibError: fp16 asked for without CUDA.
    """
    cuda = torch.cuda.is_available()
    if cfg.precision == "auto":
        return "fp16" if cuda else ("bf16" if cpu_has_bf16() else "fp32")
    if cfg.precision == "fp16" and not cuda:
        raise ZoolibError("PRECISION='fp16' needs a CUDA GPU; use 'bf16' or 'fp32' on a CPU")
    return cfg.precision


def _precision_cbs(precision: str) -> list:
    if precision == "fp32":
        return []
    if torch.cuda.is_available():
        from fastai.callback.fp16 import MixedPrecision

        return [MixedPrecision(amp_mode=precision)]
    return [CpuAutocast()]


def lr_max(cfg: TrainConfig, warm: bool, batch: int) -> tuple[list[float], list[float] | None]:
    """Peak learning rate per parameter group, and each group's weight decay.

    "adam": groups (body, head); the decay is fastai's, the same for all (None).
    "sgd": groups (body, batch-norm biases, head) at (1, BIAS_LR_SCALE, 1) x the
    rate, in airbench's decoupled terms (`recipe.sgd_rates`) for `batch` images
    a step. A warm start's head trains at LR_WARM and its body at LR_WARM / LR_MULT.
    """
    cfg = cfg.resolved()
    head = cfg.lr_warm if warm else cfg.lr
    body = head / cfg.lr_mult if warm else head
    if cfg.optimizer == "adam":
        return [body, head], None
    shares = [body / cfg.lr, body * cfg.bias_lr_scale / cfg.lr, head / cfg.lr]
    rates, decays = recipe.sgd_rates(cfg.lr, cfg.weight_decay, cfg.momentum, batch, shares)
    if cfg.optimizer == "muon":  # the filters' group first, without decay
        rates, decays = [cfg.muon_lr * body / cfg.lr, *rates], [0.0, *decays]
    return rates, decays


def _sgd(params, lr: float, momentum: float = 0.85, lookahead_every: int = 0,
         muon_momentum: float | None = None, **kwargs):
    """Nesterov SGD (with Muon for the first group when `muon_momentum`), inside timm's
    `Lookahead` when `lookahead_every` (its rate is set per step by
    `callbacks.LookaheadRate`)."""
    if muon_momentum is None:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=0.0)
    else:
        groups = [dict(g, muon=i == 0) for i, g in enumerate(params)]
        opt = MuonSGD(groups, lr=lr, momentum=momentum, muon_momentum=muon_momentum)
    return Lookahead(opt, alpha=1.0, k=lookahead_every) if lookahead_every else opt


def _opt_func(cfg: TrainConfig):
    """fastai's optimizer of the recipe: its Adam, or ours through `OptimWrapper`."""
    if cfg.optimizer == "adam":
        return Adam
    every = cfg.lookahead_every if cfg.lookahead else 0
    muon = cfg.muon_momentum if cfg.optimizer == "muon" else None
    return partial(OptimWrapper, opt=partial(_sgd, momentum=cfg.momentum,
                                             lookahead_every=every, muon_momentum=muon))


def build_learner(ws: Workspace, cfg: TrainConfig, data: pd.DataFrame, classes: list[str],
                  model: torch.nn.Module, run_dir: Path, prep: dict | None = None,
                  cbs=(), progress: bool = True) -> Learner:
    """The fastai Learner of a run: the recipe's parameter groups, optimizer, loss and
    callbacks (`lr_max` says which groups).

    `train_bn=False`: batch norm is frozen with the body (fastai's default trains it),
    so a frozen epoch leaves every body tensor as the parent had it.
    """
    cfg = cfg.resolved()
    dls = make_dataloaders(ws, data, classes, cfg, prep, progress)
    loss = CrossEntropyLossFlat(label_smoothing=cfg.label_smoothing)
    sgd = cfg.optimizer in ("sgd", "muon")
    return Learner(dls, model, loss_func=loss, metrics=accuracy, opt_func=_opt_func(cfg),
                   splitter=partial(recipe.split_groups, bias_group=sgd,
                                    filter_group=cfg.optimizer == "muon"),
                   wd=None if sgd else cfg.weight_decay, train_bn=False, path=run_dir,
                   model_dir="checkpoint", cbs=list(cbs))


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
    cfg = cfg.resolved()
    ws = open_workspace(workspace)
    progress = progress and is_main()  # one process reports for all
    precision = resolve_precision(cfg)
    data, classes = on_main(prepare_data, ws, cfg, progress=progress)  # it writes the scan
    set_seed(cfg.seed, reproducible=True)
    model, init, prep = _initial_model(ws, cfg, classes)
    warm = init["init"] == "warm"
    config = {k: v for k, v in asdict(cfg).items() if k != "cache"}  # same pixels either way
    run_key = {"config": config, "classes": classes, "data": data_hash(data),
               "init": init}
    if world_size() > 1:  # N processes step on N x batch_size images: another run
        run_key["processes"] = world_size()
    run_dir = _run_path(ws, run_key)
    with ExitStack() as held:
        saved, state = on_main(_open_run, held, ws, run_dir, run_key, cfg.resume)
        if saved is not None:
            return _already_saved(ws, saved, data)
        run = {"ws": ws, "cfg": cfg, "data": data, "classes": classes, "init": init,
               "prep": prep, "precision": precision, "warm": warm, "state": state,
               "attempt": _attempt(run_dir)}
        return _fit(run, model, run_dir, progress, extra_cbs)


def _open_run(held: ExitStack, ws: Workspace, run_dir: Path, run_key: dict,
              resume: bool) -> tuple[str | None, dict | None]:
    """Take the run's lock into `held` and find where the run stands (rank 0: it writes).

    Returns:
        The generation an earlier attempt of this run saved before it was stopped
        (its leftover folder removed) or None; the state of an interrupted run to
        resume or None.
    """
    held.enter_context(_exclusive(ws, run_dir))
    models.remove_dead_temps(run_dir.parent)  # folders of finished runs killed mid-removal
    saved = _saved_as(ws, run_dir) if resume else None
    if saved is None:
        return None, _run_dir(run_dir, run_key, resume)
    print(f"this run was saved as {saved} before it was interrupted: removing its "
          f"leftover folder {run_dir}")
    _discard_run(run_dir)
    return saved, None


def _already_saved(ws: Workspace, name: str, data: pd.DataFrame) -> TrainResult:
    """The result of a run that saved `name` and was stopped before removing its folder."""
    history = pd.read_csv(ws.models / name / "history.csv")
    return TrainResult(name=name, info=models.read_info(ws, name), history=history, splits=data)


def _fit(run: dict, model: torch.nn.Module, run_dir: Path, progress: bool,
         extra_cbs) -> TrainResult:
    """Build the Learner, train (or resume) under the run's schedule, save the generation."""
    ws, cfg, data, classes, state = run["ws"], run["cfg"], run["data"], run["classes"], run["state"]
    warm, prep, precision = run["warm"], run["prep"], run["precision"]
    history = list(state["history"]) if state else []
    start = state["epochs_done"] if state else 0
    ckpt = run_dir / "checkpoint"
    _freeze_fixed(model, cfg)
    batch = batch_size(cfg, int((data["split"] == "train").sum()))
    rates, decays = lr_max(cfg, warm, batch)
    ema = Ema(cfg.ema_decay, state=torch.load(ckpt / "ema.pth", weights_only=False)
              if state and (ckpt / "ema.pth").exists() else None) if cfg.ema_decay else None
    sched = _schedule(cfg, rates, warm, Progress(**state["schedule"]) if state else None,
                      on_kept=partial(_save_kept, ckpt) if is_main() else None)
    saves = [_MarkedCheckpoint(run_dir, history, lambda: asdict(sched.state))] if is_main() else []
    cbs = [sched, *saves, SkipDone(start, ckpt / RNG_FILE),
           ChannelsLast(), *_precision_cbs(precision),
           *([ema] if ema else []), *([BnFreeze()] if warm else []), ReleaseMemory(),
           *([GroupWeightDecay(decays)] if decays else []),
           *parallel_callbacks(), *extra_cbs]
    with rank0_first():  # rank 0 fills the pixel cache; the others then only read it
        learn = build_learner(ws, cfg, data, classes, model, run_dir, prep, cbs, progress)
    started = time.perf_counter()  # the whitening init is part of training
    learn.add_cbs(_recipe_callbacks(learn, cfg, warm, fresh=not state))
    if state:
        _load_checkpoint(learn, run_dir)
        if is_main():
            print(f"resuming an interrupted run after epoch {start}")
    with _quiet(learn, progress):
        if sched.state.phase != "done" and start < cfg.epochs:
            learn.fit(cfg.epochs, lr=rates[-1])
    seconds = time.perf_counter() - started
    run.update(history=history, seconds=seconds, start=start, schedule=sched.summary(),
               batch_size=batch, rates=rates, decays=decays)
    result = on_main(_keep, learn, run, run_dir)  # one generation, whatever the processes
    del learn
    release_memory()
    return result


def _schedule(cfg: TrainConfig, rates: list[float], warm: bool, progress: Progress | None,
              on_kept) -> PlateauSchedule:
    """The run's learning-rate schedule: SCHEDULE's kind with its settings."""
    common = dict(freeze_epochs=cfg.freeze_epochs if warm else 0,
                  warmup_epochs=cfg.warmup_epochs, progress=progress, on_kept=on_kept)
    if cfg.schedule == "triangle":
        return TriangleSchedule(rates, cfg.epochs, start=cfg.triangle_start,
                                peak_at=cfg.triangle_peak, end=cfg.triangle_end, **common)
    return PlateauSchedule(rates, cfg.epochs, patience=cfg.patience, anneal_pct=cfg.anneal_pct,
                           min_improvement=cfg.min_improvement, **common)


def _freeze_fixed(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Fix what the recipe never trains: batch-norm scales, the whitening weights."""
    if cfg.bn_frozen_scale:
        recipe.freeze_norm_scales(model)
    if cfg.whiten:
        recipe.stem_conv(model).weight.requires_grad_(False)


def _recipe_callbacks(learn: Learner, cfg: TrainConfig, warm: bool, fresh: bool) -> list:
    """The airbench pieces that need the Learner: the whitening init (a new scratch
    run), the whitening bias's epochs, the alternating flip's epoch, lookahead."""
    cbs = []
    if cfg.whiten:
        stem = recipe.stem_conv(learn.model)
        if fresh and not warm:
            recipe.whiten_init(stem, whitening_images(learn.dls, seed=cfg.seed))
        if stem.bias is not None:
            cbs.append(TrainableUntil([stem.bias], cfg.whiten_bias_epochs))
    if learn.dls.item_loader.flip is not None:
        cbs.append(augment.FlipEpoch(learn.dls.item_loader.flip))
    if cfg.optimizer != "adam" and cfg.lookahead:
        cbs.append(LookaheadRate(cfg.epochs * len(learn.dls.train)))
    return cbs


def _keep(learn: Learner, run: dict, run_dir: Path) -> TrainResult:
    """Save the kept epoch's weights (kept.pth) as the generation."""
    learn.model.load_state_dict(torch.load(run_dir / "checkpoint" / "kept.pth",
                                           weights_only=True))
    return _finish(learn.model, run, run_dir)


def _load_checkpoint(learn: Learner, run_dir: Path) -> None:
    """Load the interrupted run's weights and optimizer, or say which file is damaged."""
    try:
        learn.load("last", with_opt=True, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise ZoolibError(f"{run_dir / 'checkpoint' / 'last.pth'} is unreadable "
                          f"({type(exc).__name__}: {exc}): the interrupted run cannot resume; "
                          f"set RESUME=False (or delete {run_dir}) to train it again from "
                          "epoch 1") from exc


def _save_kept(ckpt: Path, learn: Learner) -> None:
    """Save the weights a run keeps (the averaged ones when averaging) to kept.pth."""
    # get_model: under several processes the model is wrapped in DistributedDataParallel
    model = learn.ema.average.module if hasattr(learn, "ema") else get_model(learn.model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomic(ckpt / "kept.pth", write=lambda p: torch.save(state, p))


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


def _finish(model: torch.nn.Module, run: dict, run_dir: Path) -> TrainResult:
    """Save the kept weights as a generation with its model.json; clear the run folder."""
    ws, cfg, data, sched = run["ws"], run["cfg"], run["data"], run["schedule"]
    hist = pd.DataFrame(run["history"])
    kept = int(sched["best_epoch"])
    n_train = int((data["split"] == "train").sum())
    trained_epochs = len(hist) - run["start"]
    info = {
        "arch": cfg.arch, "img_size": cfg.img_size, **run["prep"], "resize": "squish",
        "classes": run["classes"], **run["init"], "min_images": cfg.min_images,
        "throwaway": cfg.throwaway, "data_hash": data_hash(data),
        "split_counts": data.groupby("split").size().to_dict(), "config": asdict(cfg),
        "schedule": {"kind": cfg.schedule, "warm": run["init"]["init"] == "warm", **sched},
        "recipe": {"name": cfg.recipe, "optimizer": cfg.optimizer,
                   "batch_size": run["batch_size"], "lr_per_group": run["rates"],
                   "weight_decay_per_group": run["decays"], "lookahead": bool(cfg.lookahead),
                   "ema_decay": cfg.ema_decay, "flip": cfg.flip, "whiten": bool(cfg.whiten),
                   "dirac": bool(cfg.dirac), "bn_frozen_scale": bool(cfg.bn_frozen_scale)},
        "precision": run["precision"],
        "processes": world_size(),  # data-parallel: the effective batch is this x batch_size
        "metrics": {
            "best_valid_loss": float(hist["valid_loss"].iloc[kept - 1]),
            "valid_accuracy": float(hist["accuracy"].iloc[kept - 1]),
            "plateau_epoch": sched["plateau_epoch"], "anneal_start": sched["anneal_start"],
            "best_epoch": kept, "epochs_run": len(hist),
            "stopped_early": len(hist) < cfg.epochs,
            "train_seconds": round(run["seconds"], 2),
            "train_images_per_s": round(n_train * trained_epochs / max(run["seconds"], 1e-9), 1),
        },
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "run_attempt": run["attempt"],  # so a kill before the cleanup is not trained again
    }
    name = models.save_generation(ws, model, info, hist,
                                  splits=data[["hash", "path", "label", "split"]])
    _discard_run(run_dir)
    return TrainResult(name=name, info=models.read_info(ws, name), history=hist, splits=data)
