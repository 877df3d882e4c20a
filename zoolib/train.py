"""Training a generation with fastai: the recipe, the warm-start fine-tune, the command line.

One call, `train(workspace, TrainConfig(...))`, prepares the data (`loaders`:
the classes above the cutoff, split by content hash), builds the model (from
scratch or warm-started from a parent generation, `warmstart`), trains it under
its recipe and saves the kept epoch as a new generation. Where the pieces live:

- the settings: `config.TrainConfig`; the recipes and their model pieces
  (whitening, dirac, frozen batch-norm scales, parameter groups): `recipe`;
- the data and augmentation: `loaders`, `augment`; the pixel cache: `pixel_cache`;
- the schedule (triangle or plateau, the kept epoch): `schedule`; the callbacks
  (lookahead's rate, weight averaging, checkpoints): `callbacks`; Muon: `muon`;
- the run folder (lock, resume, attempts): `runs`; several processes: `distributed`.

This module puts them together: the optimizer of the recipe (fastai's Adam, or
Nesterov SGD/Muon through `OptimWrapper`, inside timm's `Lookahead`), the
Learner, precision (fastai's `MixedPrecision` on CUDA, bfloat16 autocast on
CPUs with native bfloat16, else fp32) and fastai's `ChannelsLast` (oneDNN's CPU
convolutions are faster on it too: zoo_cnn trains 1.4x faster at 32 px on 2
cores, measured), and the fit.

A warm start is a fine-tune, and so is a start from pretrained weights
(`PRETRAINED`, `zoolib.pretrained`): the Learner's splitter (`recipe.split_groups`)
makes the body and the new output layer separate parameter groups, so fastai's
`freeze` trains the head alone for `freeze_epochs` (batch-norm statistics frozen
too), then the whole model trains with the body at `lr_warm / lr_mult`.

Under torchrun every process calls `train`; rank 0 alone writes (data
preparation, the run folder, checkpoints, the generation) and sends what it
decided to the others (`distributed.on_main`). The command line is here, where
nanoGPT puts it, in the module that launches:

    torchrun --nproc_per_node=2 -m zoolib.train --workspace WS params.yaml

`params.yaml` (or `.json`) is the file papermill takes for 02_train (`-f`): its
UPPER_CASE names become the `TrainConfig` (`TrainConfig.from_params`), and
`WORKSPACE` is used when `--workspace` is not given. Without torchrun it trains
in one process, as 02_train does. model.json records the number of processes:
the effective batch is `processes` x the batch size.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from fastai.callback.channelslast import ChannelsLast
from fastai.optimizer import Adam, OptimWrapper
from fastai.vision.all import CrossEntropyLossFlat, Learner, accuracy, set_seed
from timm.optim import Lookahead

from . import augment, machine, models, pretrained, recipe, warmstart
from .callbacks import (Checkpoint, CpuAutocast, Ema, GroupWeightDecay, LookaheadRate,
                        NormFreeze, ReleaseMemory, SkipDone, TrainableUntil, ValidateLast,
                        cpu_has_bf16, release_memory)
from .config import TrainConfig, read_params
from .distributed import init, is_main, on_main, parallel_callbacks, rank0_first, world_size
from .loaders import (batch_size, dash_batches, data_hash, make_dataloaders, prepare_data,
                      whitening_images)
from .muon import MuonSGD
from .runs import (TrainResult, already_saved, attempt_id, discard_run, load_checkpoint, open_run,
                   read_checkpoint, run_path, save_kept)
from .schedule import PlateauSchedule, Progress, TriangleSchedule
from .workspace import Workspace, ZoolibError, open_workspace

# Settings that do not change what a run computes, so not part of its identity: the
# pixel cache (same pixels), data-loading workers, RESUME (False starts this run over),
# VALIDATE (only which epochs are scored).
NOT_IDENTITY = ("cache", "num_workers", "resume", "validate")


@dataclass
class _Run:
    """What `train` decided about a run, and what `_fit` adds for `_finish`."""

    ws: Workspace
    cfg: TrainConfig
    data: pd.DataFrame
    classes: list[str]
    init: dict  # model.json's parent, init, head_init, model_args
    prep: dict  # mean, std, interpolation, decode
    precision: str
    dir: Path
    state: dict | None  # an interrupted run's, to resume
    attempt: str | None
    history: list = field(default_factory=list)
    start: int = 0  # epochs done before this process started
    seconds: float = 0.0
    schedule: dict = field(default_factory=dict)
    batch_size: int = 0
    rates: list[float] = field(default_factory=list)
    decays: list[float] | None = None

    @property
    def warm(self) -> bool:
        """Warm-started from a parent generation."""
        return self.init["init"] == "warm"

    @property
    def fine_tune(self) -> bool:
        """Starts from trained weights (a parent's or pretrained ones): the head trains
        alone for FREEZE_EPOCHS, then the body as WARM_SCHEDULE says."""
        return self.init["init"] in ("warm", "pretrained")


def _initial_model(ws: Workspace, cfg: TrainConfig, classes: list[str]):
    """The model to train, its model.json record and its preprocessing."""
    if cfg.init_from == "scratch":
        args = recipe.model_args(cfg)
        model, record, prep = pretrained.new_model(cfg.arch, len(classes), cfg.pretrained, args)
        if cfg.dirac and not cfg.pretrained:  # identity filters would overwrite trained ones
            recipe.dirac_init(model)
        if cfg.pretrained:  # a fine-tune: the head alone first, then the body as this says
            record["warm_schedule"] = cfg.warm_schedule
        return model, {**record, "model_args": args}, prep
    parent = models.resolve_generation(ws, cfg.init_from)
    sp = cfg.warm_method == "shrink_perturb"
    model, record = warmstart.warm_start(ws, parent, cfg.arch, classes, carry_rows=cfg.carry_rows,
                                         shrink=cfg.warm_shrink if sp else 1.0,
                                         perturb=cfg.warm_perturb if sp else 0.0,
                                         fix=partial(_freeze_fixed, cfg=cfg))
    record.update(warm_method=cfg.warm_method, warm_schedule=cfg.warm_schedule)
    # the body learned on the parent's inputs: keep its normalisation, filter and decode
    p_info = models.read_info(ws, parent)
    prep = {key: p_info[key] for key in ("mean", "std", "interpolation", "decode")}
    return model, record, prep


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
    a step. A warm or pretrained start (`warm`) trains its head at LR_WARM and its body
    at LR_WARM / LR_MULT (WARM_SCHEDULE="fine_tune"), or both at LR ("rewarm").
    """
    cfg = cfg.resolved()
    fine_tune = warm and cfg.warm_schedule == "fine_tune"  # "rewarm": the scratch rates
    head = cfg.lr_warm if fine_tune else cfg.lr
    body = head / cfg.lr_mult if fine_tune else head
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
    config = {k: v for k, v in asdict(cfg).items() if k not in NOT_IDENTITY}
    run_key = {"config": config, "classes": classes, "data": data_hash(data),
               "init": init}
    if world_size() > 1:  # N processes step on N x batch_size images: another run
        run_key["processes"] = world_size()
    run_dir = run_path(ws, run_key)
    with ExitStack() as held:
        saved, state = on_main(open_run, held, ws, run_dir, run_key, cfg.resume)
        if saved is not None:
            return already_saved(ws, saved, data)
        run = _Run(ws, cfg, data, classes, init, prep, precision, run_dir, state,
                   attempt_id(run_dir))
        return _fit(run, model, progress, extra_cbs)


def _fit(run: _Run, model: torch.nn.Module, progress: bool, extra_cbs) -> TrainResult:
    """Build the Learner, train (or resume) under the run's schedule, save the generation."""
    ws, cfg, data, classes, state = run.ws, run.cfg, run.data, run.classes, run.state
    run_dir = run.dir
    warm = run.fine_tune  # from trained weights: frozen head epochs, the fine-tune's rates
    history = run.history = list(state["history"]) if state else []
    start = run.start = state["epochs_done"] if state else 0
    ckpt = run_dir / "checkpoint"
    _freeze_fixed(model, cfg)
    batch = batch_size(cfg, int((data["split"] == "train").sum()))
    rates, decays = lr_max(cfg, warm, batch)
    saved = read_checkpoint(run_dir) if state else None  # every process reads rank 0's
    ema = Ema(cfg.ema_decay, state=saved and saved["ema"]) if cfg.ema_decay else None
    sched = _schedule(cfg, rates, warm, Progress(**state["schedule"]) if state else None,
                      on_kept=partial(save_kept, ckpt) if is_main() else None)
    saves = [Checkpoint(run_dir, history, lambda: asdict(sched.state))] if is_main() else []
    cbs = [sched, *saves, SkipDone(start, saved and saved["rng"]),
           ChannelsLast(), *_precision_cbs(run.precision),
           *([ema] if ema else []), *([NormFreeze()] if warm else []), ReleaseMemory(),
           *([GroupWeightDecay(decays)] if decays else []),
           *([ValidateLast()] if cfg.validate == "last" else []),
           *parallel_callbacks(), *extra_cbs]
    with rank0_first():  # rank 0 fills the pixel cache; the others then only read it
        learn = build_learner(ws, cfg, data, classes, model, run_dir, run.prep, cbs, progress)
    started = time.perf_counter()  # the whitening init is part of training
    learn.add_cbs(_recipe_callbacks(learn, cfg, run.init["init"], fresh=not state))
    if state:
        load_checkpoint(learn, saved)
        if is_main():
            print(f"resuming an interrupted run after epoch {start}")
    # on a CPU, large activations reuse heap pages instead of a fresh mmap a step
    with _quiet(learn, progress), machine.kept_heap(on=not torch.cuda.is_available()):
        if sched.state.phase != "done" and start < cfg.epochs:
            learn.fit(cfg.epochs, lr=rates[-1])
    run.seconds = time.perf_counter() - started
    run.schedule, run.batch_size, run.rates, run.decays = sched.summary(), batch, rates, decays
    result = on_main(_keep, learn, run)  # one generation, whatever the processes
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
    """Fix what the recipe never trains: batch-norm scales, the whitening weights, a
    fine-tune's first FROZEN_STAGES stages."""
    pretrained.freeze_stages(model, cfg.frozen_stages)
    if cfg.bn_frozen_scale:
        recipe.freeze_norm_scales(model)
    if cfg.whiten:
        recipe.stem_conv(model).weight.requires_grad_(False)


def _recipe_callbacks(learn: Learner, cfg: TrainConfig, init: str, fresh: bool) -> list:
    """The pieces that need the Learner and its data: DASH (a new warm run), the
    whitening init (a new run from random weights, `init` "scratch"), the whitening
    bias's epochs, the alternating flip's epoch, lookahead."""
    cbs = []
    if fresh and init == "warm" and cfg.warm_method == "dash":
        warmstart.dash(learn.model, dash_batches(learn.dls), lam=cfg.dash_lambda)
    if cfg.whiten:
        stem = recipe.stem_conv(learn.model)
        if fresh and init == "scratch":
            recipe.whiten_init(stem, whitening_images(learn.dls, seed=cfg.seed))
        if stem.bias is not None:
            cbs.append(TrainableUntil([stem.bias], cfg.whiten_bias_epochs))
    if learn.dls.item_loader.flip is not None:
        cbs.append(augment.FlipEpoch(learn.dls.item_loader.flip))
    if cfg.optimizer != "adam" and cfg.lookahead:
        cbs.append(LookaheadRate(cfg.epochs * len(learn.dls.train)))
    return cbs


def _keep(learn: Learner, run: _Run) -> TrainResult:
    """Save the kept epoch's weights (kept.pth) as the generation."""
    learn.model.load_state_dict(torch.load(run.dir / "checkpoint" / "kept.pth",
                                           weights_only=True))
    return _finish(learn.model, run)


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


def _finish(model: torch.nn.Module, run: _Run) -> TrainResult:
    """Save the kept weights as a generation with its model.json; clear the run folder."""
    ws, cfg, data, sched = run.ws, run.cfg, run.data, run.schedule
    hist = pd.DataFrame(run.history)
    kept = int(sched["best_epoch"])
    n_train = int((data["split"] == "train").sum())
    trained_epochs = len(hist) - run.start
    info = {
        "arch": cfg.arch, "img_size": cfg.img_size, **run.prep, "resize": "squish",
        "classes": run.classes, **run.init, "min_images": cfg.min_images,
        "throwaway": cfg.throwaway, "data_hash": data_hash(data),
        "split_counts": data.groupby("split").size().to_dict(), "config": asdict(cfg),
        "schedule": {"kind": cfg.schedule, "warm": run.warm, "fine_tune": run.fine_tune,
                     **sched},
        "recipe": {"name": cfg.recipe, "optimizer": cfg.optimizer,
                   "batch_size": run.batch_size, "lr_per_group": run.rates,
                   "weight_decay_per_group": run.decays, "lookahead": bool(cfg.lookahead),
                   "ema_decay": cfg.ema_decay, "flip": cfg.flip, "whiten": bool(cfg.whiten),
                   "dirac": bool(cfg.dirac), "bn_frozen_scale": bool(cfg.bn_frozen_scale)},
        "precision": run.precision,
        "processes": world_size(),  # data-parallel: the effective batch is this x batch_size
        "metrics": {
            "best_valid_loss": float(hist["valid_loss"].iloc[kept - 1]),
            "valid_accuracy": float(hist["accuracy"].iloc[kept - 1]),
            "plateau_epoch": sched["plateau_epoch"], "anneal_start": sched["anneal_start"],
            "best_epoch": kept, "epochs_run": len(hist),
            "stopped_early": len(hist) < cfg.epochs,
            "train_seconds": round(run.seconds, 2),
            "train_images_per_s": round(n_train * trained_epochs / max(run.seconds, 1e-9), 1),
        },
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "run_attempt": run.attempt,  # so a kill before the cleanup is not trained again
    }
    name = models.save_generation(ws, model, info, hist,
                                  splits=data[["hash", "path", "label", "split"]])
    discard_run(run.dir)
    return TrainResult(name=name, info=models.read_info(ws, name), history=hist, splits=data)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m zoolib.train",
        description="Train one generation; under torchrun, data-parallel on its processes.")
    parser.add_argument("--workspace", help="the workspace folder (else the file's WORKSPACE)")
    parser.add_argument("params", nargs="?", help="02_train parameters (.yaml or .json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command line: train, print the saved generation on rank 0, return the exit code."""
    args = _arguments(argv)
    main_rank = True  # decided before the process group is gone
    try:
        params = read_params(args.params) if args.params else {}
        workspace = args.workspace or params.get("WORKSPACE")
        if not workspace:
            raise ZoolibError("no workspace: pass --workspace WS or set WORKSPACE in the file")
        init()
        main_rank = is_main()
        result = train(workspace, TrainConfig.from_params(params))
    except ZoolibError as exc:
        if main_rank:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if main_rank:
        info = result.info
        print(f"saved {result.name}: {len(info['classes'])} classes, init={info['init']}, "
              f"parent={info['parent']}, {info['processes']} process(es), effective batch "
              f"{info['processes'] * info['recipe']['batch_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
