"""The warmup / flat / anneal-at-plateau schedule on fastai's synthetic learner."""
import math

import pytest
from fastai.callback.core import Callback
from fastai.learner import Recorder
from fastai.test_utils import synth_learner

from zoolib.schedule import PlateauSchedule, Progress, anneal_length


class Scripted(Callback):
    """Replace each epoch's valid loss by a scripted value before the schedule reads it."""
    order = Recorder.order + 0.5

    def __init__(self, losses):
        self.losses = losses

    def after_epoch(self):
        vals = self.recorder.values[-1]
        vals[self.recorder.metric_names[1:].index("valid_loss")] = self.losses[self.epoch]


class Rates(Callback):
    """Record the learning rate of every training batch, after the schedule set it."""
    order = PlateauSchedule.order + 1

    def __init__(self):
        self.lrs = []

    def before_batch(self):
        if self.training:
            self.lrs.append(self.opt.hypers[-1]["lr"])


def fit(losses, **kw):
    sched = PlateauSchedule([0.1], **kw)
    rates = Rates()
    learn = synth_learner(n_trn=4, cbs=[sched, Scripted(losses), rates])
    with learn.no_bar(), learn.no_logging():
        learn.fit(kw["epochs"], lr=0.1)
    return sched.state, rates.lrs, len(learn.recorder.values)


def test_plateau_fires_after_patience_and_the_run_ends_with_the_anneal():
    state, lrs, epochs = fit([1.0, 0.8, 0.9, 0.95, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1],
                             epochs=10, patience=2, anneal_pct=0.25)
    # best at epoch 2; epochs 3 and 4 do not improve: the plateau test fires after 4
    assert state.plateau_epoch == 2
    assert (state.anneal_start, state.anneal_epochs) == (5, anneal_length(4, 0.25)) == (5, 1)
    assert epochs == 5 and state.phase == "done" and state.best_epoch == 5


def test_the_learning_rate_warms_up_holds_and_anneals():
    state, lrs, _ = fit([1.0, 0.9, 0.9, 0.9, 0.9, 0.9], epochs=6, patience=2,
                        warmup_epochs=1.0, anneal_pct=0.5)
    # best at epoch 2, the plateau test fires after epoch 4, anneal ceil(0.5 * 4) = 2
    assert (state.plateau_epoch, state.anneal_start, state.anneal_epochs) == (2, 5, 2)
    per = len(lrs) // 6  # batches per epoch
    assert lrs[0] == pytest.approx(0.1 / 25)  # warmup starts at peak / 25
    assert lrs[per - 1] < 0.1 and lrs[per] == pytest.approx(0.1)  # warm by epoch 2
    assert all(lr == pytest.approx(0.1) for lr in lrs[per:4 * per])
    anneal = lrs[4 * per:]
    assert all(a > b for a, b in zip(anneal, anneal[1:]))  # cosine down, every batch
    assert anneal[-1] < 0.01 and state.anneal_epochs == math.ceil(0.5 * 4)


def test_the_budget_forces_the_anneal_when_no_plateau_comes():
    losses = [1.0 - 0.1 * i for i in range(8)]  # always improving
    state, _, epochs = fit(losses, epochs=8, patience=2, anneal_pct=0.25)
    # after 6 epochs ceil(0.25 * 6) = 2 anneal epochs just fit the budget of 8
    assert state.plateau_epoch is None and (state.anneal_start, state.anneal_epochs) == (7, 2)
    assert epochs == 8


def test_kept_epoch_is_the_best_annealed_one_never_a_flat_one():
    # the flat phase has the lowest loss (0.1), but it never annealed: epoch 5 is kept
    state, _, _ = fit([0.1, 0.5, 0.6, 0.7, 0.3, 0.4, 0.5], epochs=7, patience=3,
                      anneal_pct=0.5)
    assert state.anneal_start == 5 and state.best_epoch == 5 and state.kept == 0.3


def test_frozen_epochs_come_first_and_do_not_count_for_the_plateau():
    sched = PlateauSchedule([0.01, 0.1], epochs=6, freeze_epochs=2, patience=2)
    assert sched.state.phase == "frozen"
    assert sched.factor(0.0) == pytest.approx(1 / 25)  # the head warms up from epoch 0
    sched.state.phase = "flat"
    assert sched.factor(2.0) == pytest.approx(1 / 25)  # and again when the body joins
    assert sched.factor(3.0) == 1.0


def test_a_resumed_schedule_continues_from_its_progress():
    saved = Progress(phase="flat", best=0.8, wait=1, last_improved=2)
    sched = PlateauSchedule([0.1], epochs=10, patience=2, progress=saved)
    assert sched.state.wait == 1 and sched.state.best == 0.8
