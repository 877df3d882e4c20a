"""The learning-rate schedule of a run: warm up, hold, anneal at the plateau.

Why not one-cycle with early stopping: a one-cycle fixes its length up front, and
stopping it early at a plateau stops it at a high learning rate, so the saved
model never annealed and the "plateau epoch" is mostly where the schedule was
cut. Here the length is found, not chosen (a warmup-stable-decay schedule):

1. frozen (warm starts only, `freeze_epochs`): the body is frozen, the new
   output layer trains at the head's rate after a linear warmup;
2. flat: the whole model, linear warmup over `warmup_epochs`, then the peak rate
   held while the plateau test watches the monitored validation value;
3. anneal: cosine to ~0 over `ceil(anneal_pct * epochs so far)` epochs, started
   when the plateau test fires or when the budget (`epochs`) leaves just room
   for it; the run ends when the anneal does.

The weights kept are those of the best annealed epoch by the monitored value,
so the saved model has always annealed.

Recorded figures (model.json `metrics`, `schedule`):

- `plateau_epoch`: the last flat-phase epoch (1-based, counting frozen epochs)
  whose monitored value beat the best of the earlier flat-phase epochs by more
  than `min_improvement` of it (0.005: 0.5%), when the plateau test fired
  (`patience` epochs without such an improvement). None when the budget forced
  the anneal first. The threshold is relative because an averaged model's
  validation loss creeps down by a few thousandths per epoch long after it has
  stopped learning anything that matters.
- `anneal_start`: the first annealed epoch (1-based); `best_epoch`: the epoch
  whose weights are kept.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.schedule import SchedCos, SchedLin
from fastai.learner import Recorder

_DIV = 25.0  # warmup starts at peak / 25 (fastai's one-cycle `div`)
_DIV_FINAL = 1e5  # the anneal ends at peak / 1e5 (fastai's `div_final`)


@dataclass
class Progress:
    """Where a run's schedule stands; saved with every checkpoint so a resume continues it.

    Attributes:
        phase: "frozen", "flat", "anneal" or "done".
        best: best monitored value of the flat phase; `wait`: epochs since it improved.
        plateau_epoch: see the module docstring (None until the test fires).
        anneal_start, anneal_epochs: 1-based first annealed epoch and anneal length.
        kept: best monitored value among annealed epochs; `best_epoch` its epoch.
    """

    phase: str = "flat"
    best: float | None = None
    wait: int = 0
    plateau_epoch: int | None = None
    last_improved: int | None = None
    anneal_start: int | None = None
    anneal_epochs: int = 0
    kept: float | None = None
    best_epoch: int | None = None


def anneal_length(epochs_before: int, anneal_pct: float) -> int:
    """Epochs of the anneal after `epochs_before` epochs: ceil(pct * epochs), at least 1."""
    return max(1, math.ceil(anneal_pct * epochs_before))


class PlateauSchedule(Callback):
    """Set each batch's learning rate and decide the phases (see the module docstring).

    Args:
        lr_max: peak learning rate per optimizer parameter group (body, head).
        epochs: the budget: the most epochs the run may take.
        freeze_epochs: head-only epochs first (0 = none).
        warmup_epochs: linear warmup at the start of the frozen and flat phases.
        patience: flat epochs without improvement that make a plateau.
        anneal_pct: anneal length as a share of the epochs before it.
        monitor: recorder column watched ("valid_loss": lower is better; a metric:
            higher is better).
        min_improvement: smallest change, as a share of the best value, that
            counts as an improvement.
        progress: a saved `Progress` to continue from (resume).
        on_kept: called with the Learner when an annealed epoch becomes the kept one
            (the caller saves the weights).
    """

    order = Recorder.order + 1  # reads the epoch's validation values the recorder just wrote

    def __init__(self, lr_max: list[float], epochs: int, freeze_epochs: int = 0,
                 warmup_epochs: float = 1.0, patience: int = 3, anneal_pct: float = 0.25,
                 monitor: str = "valid_loss", min_improvement: float = 0.005,
                 progress: Progress | None = None, on_kept=None):
        self.lr_max = np.array(lr_max, dtype=float)
        self.epochs, self.freeze_epochs = int(epochs), int(freeze_epochs)
        self.warmup, self.patience, self.anneal_pct = float(warmup_epochs), int(patience), anneal_pct
        self.monitor, self.min_improvement, self.on_kept = monitor, float(min_improvement), on_kept
        self.lower_is_better = "loss" in monitor
        self.state = progress or Progress(phase="frozen" if self.freeze_epochs else "flat")

    # ---------------------------------------------------------------- events
    def before_fit(self):
        names = list(self.recorder.metric_names[1:])
        if self.monitor not in names:
            raise ValueError(f"monitor {self.monitor!r} is not recorded (have {names})")
        self.idx = names.index(self.monitor)

    def before_epoch(self):
        s, e = self.state, self.epoch
        if s.phase == "done":
            raise CancelFitException()
        if s.phase == "frozen" and e >= self.freeze_epochs:
            s.phase = "flat"
        if s.phase == "flat":
            length = anneal_length(e, self.anneal_pct)
            if e + length >= self.epochs:  # the budget leaves just room to anneal
                self._start_anneal(e, min(length, self.epochs - e))
        self._set_trainable()

    def before_batch(self):
        if self.training:
            self.opt.set_hyper("lr", self.lr_max * self.factor(self.epoch + self.iter / self.n_iter))

    def after_epoch(self):
        s, e = self.state, self.epoch + 1  # 1-based: this epoch is done
        value = float(self.recorder.values[-1][self.idx])
        if s.phase == "flat":
            if s.best is None or self._better(value, s.best):
                s.best, s.wait, s.last_improved = value, 0, e
            else:
                s.wait += 1
            if s.wait >= self.patience and e < self.epochs:
                s.plateau_epoch = s.last_improved
                self._start_anneal(e, min(anneal_length(e, self.anneal_pct), self.epochs - e))
        elif s.phase == "anneal":
            if s.kept is None or self._better(value, s.kept, strict=False):
                s.kept, s.best_epoch = value, e
                if self.on_kept is not None:
                    self.on_kept(self.learn)
            if e >= s.anneal_start - 1 + s.anneal_epochs:
                s.phase = "done"

    # ---------------------------------------------------------------- helpers
    def factor(self, pos: float) -> float:
        """The learning rate as a share of the peak at `pos` epochs into the run."""
        s = self.state
        if s.phase in ("anneal", "done") and s.anneal_start is not None:
            start = s.anneal_start - 1
            return SchedCos(1.0, 1 / _DIV_FINAL)(min(1.0, (pos - start) / s.anneal_epochs))
        start = 0 if s.phase == "frozen" else self.freeze_epochs
        if self.warmup > 0 and pos - start < self.warmup:
            return SchedLin(1 / _DIV, 1.0)(max(0.0, pos - start) / self.warmup)
        return 1.0

    def _start_anneal(self, epochs_done: int, length: int) -> None:
        s = self.state
        s.phase, s.anneal_start, s.anneal_epochs = "anneal", epochs_done + 1, max(1, length)

    def _better(self, value: float, than: float, strict: bool = True) -> bool:
        delta = self.min_improvement * abs(than) if strict else 0.0
        return value < than - delta if self.lower_is_better else value > than + delta

    def _set_trainable(self) -> None:
        """Body frozen during the frozen phase, everything trainable after it.

        The optimizer's own `freeze_to`: `Learner.freeze` would also clear the
        optimizer state, which a resumed run has just loaded.
        """
        if self.freeze_epochs:
            self.opt.freeze_to(-1 if self.state.phase == "frozen" else 0)

    def summary(self) -> dict:
        """The schedule's settings and outcome, for model.json."""
        return {"lr_max": [float(v) for v in self.lr_max], "epochs": self.epochs,
                "freeze_epochs": self.freeze_epochs, "warmup_epochs": self.warmup,
                "patience": self.patience, "anneal_pct": self.anneal_pct,
                "monitor": self.monitor, "min_improvement": self.min_improvement,
                **asdict(self.state)}


class TriangleSchedule(PlateauSchedule):
    """airbench's fixed-budget schedule: a linear rise, then a linear fall, per step.

    The rate goes from `start` x peak to the peak over the first `peak_at` share of
    the steps, then down to `end` x peak at the last step (airbench94: 0.2, 0.23,
    0.07). The budget is fixed (`epochs`), so the run always ends there and keeps
    its last epoch (`best_epoch`); there is no plateau test (`plateau_epoch` is
    None). A warm start's head-only epochs (`freeze_epochs`) come first, with the
    frozen phase's warmup, and the triangle spans the epochs after them.

    Args:
        start, peak_at, end: the shape (see above).
        Others: as `PlateauSchedule`.
    """

    def __init__(self, lr_max: list[float], epochs: int, freeze_epochs: int = 0,
                 warmup_epochs: float = 1.0, start: float = 0.2, peak_at: float = 0.23,
                 end: float = 0.07, monitor: str = "valid_loss",
                 progress: Progress | None = None, on_kept=None):
        super().__init__(lr_max, epochs, freeze_epochs=freeze_epochs,
                         warmup_epochs=warmup_epochs, monitor=monitor,
                         progress=progress, on_kept=on_kept)
        self.start, self.peak_at, self.end = float(start), float(peak_at), float(end)

    def before_epoch(self):
        s = self.state
        if s.phase == "done":
            raise CancelFitException()
        if s.phase in ("frozen", "flat") and self.epoch >= self.freeze_epochs:
            s.phase, s.anneal_start = "triangle", self.freeze_epochs + 1
            s.anneal_epochs = self.epochs - self.freeze_epochs
        self._set_trainable()

    def after_epoch(self):
        s, e = self.state, self.epoch + 1
        value = float(self.recorder.values[-1][self.idx])  # NaN: not validated (VALIDATE)
        if not math.isnan(value) and (s.best is None or self._better(value, s.best, strict=False)):
            s.best, s.last_improved = value, e
        if e >= self.epochs:
            s.kept, s.best_epoch, s.phase = value, e, "done"
            if self.on_kept is not None:
                self.on_kept(self.learn)

    def factor(self, pos: float) -> float:
        """The rate as a share of the peak at `pos` epochs into the run."""
        if self.state.phase == "frozen" or pos < self.freeze_epochs:
            if self.warmup > 0 and pos < self.warmup:
                return SchedLin(1 / _DIV, 1.0)(max(0.0, pos) / self.warmup)
            return 1.0
        t = (pos - self.freeze_epochs) / max(self.epochs - self.freeze_epochs, 1e-9)
        return triangle(t, self.start, self.peak_at, self.end)

    def summary(self) -> dict:
        return {**super().summary(), "start": self.start, "peak_at": self.peak_at,
                "end": self.end}


def triangle(t: float, start: float = 0.2, peak_at: float = 0.23, end: float = 0.07) -> float:
    """The triangle's share of the peak rate at `t` (0..1) of the budget."""
    t = min(max(t, 0.0), 1.0)
    if t < peak_at:
        return start + (1.0 - start) * t / peak_at
    return 1.0 + (end - 1.0) * (t - peak_at) / max(1.0 - peak_at, 1e-9)
