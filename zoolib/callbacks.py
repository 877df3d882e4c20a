"""fastai callbacks of a training run: weight averaging, CPU mixed precision, resume.

fastai has the rest of the recipe (label smoothing, `ChannelsLast`, `to_fp16`,
the splitter hooks of `freeze`); these fill its gaps:

- `Ema`: timm's `ModelEmaV3` kept alongside the model. Validation runs on the
  average, and the average is what a run keeps: on a short schedule it is worth
  about what a longer anneal would be.
- `CpuAutocast`: bfloat16 autocast on a CPU with native bfloat16 instructions.
  fastai's `MixedPrecision` always asks for CUDA autocast, which does nothing to
  CPU tensors; on AVX512-BF16 cores convolutions run about twice as fast.
- `Checkpoint` / `SkipDone`: save everything after each epoch as one dict in
  one atomic write (`checkpoint/state.pth`: model, optimizer, averaged weights,
  random state, progress; as timm's `CheckpointSaver` and nanoGPT do), and skip
  the done epochs on resume.
- `ValidateLast`: validate on the last epoch only (`VALIDATE="last"`): a
  fixed-budget schedule reads nothing else, and 3,000 validation images cost
  about 4% of a 27,000-image epoch of the airbench recipe on two cores.
- `NormFreeze`: batch norm in eval mode (its statistics kept) where the layer's
  parameters are all fixed: a warm start's frozen body, a pretrained model's fixed
  norms. fastai's `BnFreeze` asks only whether the first parameter (the scale)
  trains, and the airbench recipe fixes every scale for the whole run: a warm start
  then trained its body on the parent's statistics all run long, and a shrunk body
  (shrink-and-perturb, DASH) was never normalised again (bench/replicate.py: those
  chains fell to near chance).
- `ReleaseMemory`: hand freed heap back to the OS after each epoch. Measured on
  CIFAR: resident memory grew by 25-40 MB every epoch with glibc keeping freed
  small blocks (per-batch images, tensors of a few sizes); with `malloc_trim`
  after each epoch it stayed flat (1043-1044 MB over 6 epochs). Not a leak, but
  a process that grows for hours is one a laptop kills.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from fastai.callback.core import Callback, CancelEpochException, CancelValidException
from fastai.callback.fp16 import MixedPrecision
from fastai.learner import Recorder
from fastai.torch_core import get_model, to_float
from fastai.callback.core import TrainEvalCallback
from timm.utils import ModelEmaV3

from . import machine
from .workspace import write_atomic


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (AVX512-BF16 or AMX), not emulated."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probes: assume not
        return False


class Ema(Callback):
    """An exponential moving average of the weights; validation uses it.

    The decay warms up with the step count (timm's `use_warmup`, power 3/4):
    about 0.99 after 500 steps and 0.999 after 10,000, so short runs average
    over a short window and long runs over a long one.

    Args:
        decay: the largest decay the warmup reaches.
        state: {"weights": state_dict, "steps": int} of a resumed run.
    """

    order = MixedPrecision.order + 1  # the model is already in its final memory format

    def __init__(self, decay: float = 0.9998, state: dict | None = None):
        self.decay, self.state = decay, state

    def before_fit(self):
        self.average = ModelEmaV3(self.learn.model, decay=self.decay, use_warmup=True,
                              warmup_power=0.75)
        self.steps = 0
        if self.state:
            self.average.module.load_state_dict(self.state["weights"])
            self.steps = int(self.state["steps"])

    def after_step(self):
        self.steps += 1
        self.average.update(self.learn.model, step=self.steps)

    def before_validate(self):
        self.raw, self.learn.model = self.learn.model, self.average.module

    def after_validate(self):
        self.learn.model = self.raw

    def snapshot(self) -> dict:
        """What a resume needs: the averaged weights and the step count."""
        return {"weights": self.average.module.state_dict(), "steps": self.steps}


def release_memory() -> bool:
    """Return freed heap memory to the OS (glibc `malloc_trim`); False where unavailable."""
    libc = machine.glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False  # not glibc: nothing to do


class ReleaseMemory(Callback):
    """`release_memory` after every epoch (see the module docstring)."""

    order = 99  # after everything else of the epoch

    def after_epoch(self):
        release_memory()


def norm_frozen(norm: torch.nn.Module) -> bool:
    """A batch-norm layer with parameters, none of them trained (see `NormFreeze`)."""
    params = list(norm.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)


class NormFreeze(Callback):
    """Batch-norm layers whose parameters are all fixed run in eval mode while
    training (see the module docstring); the others update their statistics.

    Runs after fastai's `TrainEvalCallback` (which sets the model to train mode) and
    after the schedule's `before_epoch` (which freezes or unfreezes the body).
    """

    run_after = TrainEvalCallback

    def before_train(self):
        for mod in self.model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and norm_frozen(mod):
                mod.eval()


class ValidateLast(Callback):
    """Skip validation on every epoch but the last; the skipped epochs' validation
    values are recorded as NaN, so history rows keep their columns (plots leave
    gaps, and the schedule reads only the last epoch's values).

    The weights are those of a run that validates every epoch: starting the
    validation DataLoader draws one number from torch's global generator (torch's
    DataLoader base seed), which the training augmentation draws from next, so a
    skipped validation draws it too (tests/test_recipe.py checks the weights).
    """

    order = Recorder.order + 1  # after the recorder's after_validate: pad what it logged

    def before_validate(self):
        self.skipped = self.epoch < self.n_epoch - 1
        if self.skipped:
            torch.empty((), dtype=torch.int64).random_()  # the draw validation would make
            raise CancelValidException()

    def after_validate(self):
        if self.skipped:
            missing = len(self.recorder.metric_names) - 1 - len(self.recorder.log)
            self.recorder.log += [float("nan")] * missing  # names: epoch, ..., time


class CpuAutocast(Callback):
    """bfloat16 autocast for CPU training (fastai's `MixedPrecision` is CUDA-only)."""

    order = MixedPrecision.order

    def before_batch(self):
        self.ctx = torch.autocast("cpu", dtype=torch.bfloat16)
        self.ctx.__enter__()

    def after_pred(self):
        self.learn.pred = to_float(self.pred)

    def after_loss(self):
        self.ctx.__exit__(None, None, None)


CHECKPOINT = "state.pth"  # in the run folder's checkpoint/: everything a resume needs


def random_state(learn) -> dict:
    """Every random generator a resumed run must continue: Python's, NumPy's, torch's
    and the training DataLoader's own (it draws each epoch's shuffle)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), "loader": learn.dls.train.rng.getstate()}


def restore_random_state(learn, state: dict) -> None:
    """Put back what `random_state` saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    learn.dls.train.rng.setstate(state["loader"])


class Checkpoint(Callback):
    """Save everything a resume needs after every epoch, as one dict in one atomic write.

    `checkpoint/state.pth` holds the model and optimizer state, the averaged
    weights, every random generator, the epochs done, the history rows and the
    schedule's progress. One file written whole (`write_atomic`): a kill leaves
    the previous epoch's checkpoint, never parts of two epochs.

    Args:
        run_dir: the in-progress folder.
        history: the run's per-epoch rows, appended to here.
        progress: returns the schedule's JSON-able state, saved with each epoch.
    """

    order = Recorder.order + 2  # after the schedule has judged the epoch

    def __init__(self, run_dir: Path, history: list[dict], progress: Callable[[], dict]):
        self.run_dir, self.history, self.progress = run_dir, history, progress

    def after_epoch(self):
        names = self.recorder.metric_names[1:-1]
        row = {"epoch": self.epoch + 1, **dict(zip(names, map(float, self.recorder.values[-1])))}
        self.history.append(row)
        state = {"epochs_done": self.epoch + 1, "history": self.history,
                 "schedule": self.progress(), "model": get_model(self.learn.model).state_dict(),
                 "optimizer": self.learn.opt.state_dict(), "rng": random_state(self.learn),
                 "ema": self.learn.ema.snapshot() if hasattr(self.learn, "ema") else None}
        write_atomic(self.run_dir / "checkpoint" / CHECKPOINT,
                     write=lambda path: torch.save(state, path))


class SkipDone(Callback):
    """On resume, skip the epochs already done.

    fastai's own `start_epoch` lets the recorder and trackers see the skipped
    epochs as empty rows (and fail); here they are switched off while skipping.
    The schedule stays right: it derives its position from the epoch. Given the
    random state the checkpoint saved (`rng`), the first epoch run again starts
    from the random state the interrupted run had there.
    """

    order = TrainEvalCallback.order - 1  # first of all: nothing else sees a skipped epoch

    def __init__(self, done: int, rng: dict | None = None):
        self.done, self.rng = done, rng

    def before_fit(self):
        self.others = [cb for cb in self.learn.cbs
                       if cb is not self and not isinstance(cb, TrainEvalCallback) and cb.run]

    def before_epoch(self):
        skip = self.epoch < self.done
        for cb in self.others:
            cb.run = not skip
        if skip:
            raise CancelEpochException()
        if self.epoch == self.done and self.done and self.rng:
            # the resumed epoch shuffles and augments as the interrupted run would have
            restore_random_state(self.learn, self.rng)


class LookaheadRate(Callback):
    """airbench's lookahead schedule on timm's `Lookahead` optimizer.

    timm's `Lookahead` keeps slow weights and, every k steps, moves them
    `lookahead_alpha` of the way to the fast ones and resets the fast ones there.
    airbench moves them all the way at first and ever less as training goes on
    (`recipe.lookahead_alpha`), and ends with the slow weights: this callback sets
    the rate before each step and copies the slow weights into the model at the
    end of the last training epoch, before that epoch's validation.

    Args:
        total_steps: the run's budget in optimizer steps.
    """

    order = Recorder.order + 3  # after the schedule has set the step's rates

    def __init__(self, total_steps: int):
        self.total = int(total_steps)

    def _lookahead(self):
        opt = getattr(self.learn.opt, "opt", None)
        return opt if hasattr(opt, "sync_lookahead") else None

    def before_batch(self):
        opt = self._lookahead()
        if self.training and opt is not None:
            from .recipe import lookahead_alpha

            # the step from the epoch, not fastai's train_iter, which a resumed run
            # starts again at 0
            alpha = lookahead_alpha(self.epoch * self.n_iter + self.iter + 1, self.total)
            for group in opt.param_groups:
                group["lookahead_alpha"] = alpha

    def after_train(self):
        opt = self._lookahead()
        if opt is not None and self.epoch == self.n_epoch - 1:
            for group in opt.param_groups:
                group["lookahead_alpha"] = 0.0  # the slow weights as they are
            opt.sync_lookahead()


class TrainableUntil(Callback):
    """Train some parameters for the first `epochs` epochs only (airbench trains the
    whitening layer's bias for 3 epochs, then fixes it).

    Runs after the schedule's `before_epoch`, which may have unfrozen every group;
    before then it leaves them as the schedule set them (a warm start's head-only
    epochs keep them frozen).
    """

    order = Recorder.order + 3

    def __init__(self, params: list[torch.nn.Parameter], epochs: int):
        self.params, self.epochs = list(params), int(epochs)

    def before_epoch(self):
        if self.epoch >= self.epochs:
            for p in self.params:
                p.requires_grad_(False)


class GroupWeightDecay(Callback):
    """Set each parameter group's weight decay once the optimizer exists.

    fastai's `Learner.fit` gives every group the same decay; airbench gives each
    group `decay / rate` (see `recipe.sgd_rates`).
    """

    def __init__(self, decays: list[float]):
        self.decays = list(decays)

    def before_fit(self):
        self.learn.opt.set_hyper("wd", self.decays)
