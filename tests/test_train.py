import json
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback
from fastai.learner import Recorder
from filelock import FileLock

from PIL import Image

from zoolib import demo, evaluate, models, workspace
from zoolib import train as train_module
from zoolib.runs import INPROGRESS, read_checkpoint
from zoolib.train import TrainConfig, train
from zoolib.workspace import ZoolibError

from .conftest import TINY
from .test_models import dead_pid

COLOUR_TINY = {**TINY, "batch_size": 8, "min_images": 10}  # 7 batches an epoch
# The plateau schedule and the weight average: the classic recipe (Adam, EMA, plateau).
PLATEAU = {**TINY, "recipe": "classic"}


def colour_workspace(root):
    """Three colour classes of 24 tiny images (and an inbox file): 4 epochs of
    COLOUR_TINY train in well under a second."""
    ws = workspace.create(root)
    rng = np.random.default_rng(0)
    for cls, colour in {"red": (200, 40, 40), "green": (40, 200, 40),
                        "blue": (40, 40, 200)}.items():
        (ws.library / cls).mkdir()
        for i in range(24):
            px = np.clip(np.array(colour) + rng.normal(0, 50, (32, 32, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(ws.library / cls / f"{i:02d}.png")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(ws.inbox / "new.png")  # a user file too
    return ws


def test_scratch_generation_saved_with_its_record(trained_ws, truth):
    info = models.read_info(trained_ws, "gen-0001")
    assert info["classes"] == sorted(c for c, n in truth["counts"].items() if n >= 40)
    assert info["init"] == "scratch" and info["parent"] is None
    assert (info["arch"], info["img_size"], info["throwaway"]) == ("zoo_cnn_small", 32, False)
    assert (info["mean"], info["interpolation"]) == (list(models.IMAGENET_MEAN), "bilinear")
    hist = pd.read_csv(trained_ws.models / "gen-0001" / "history.csv")
    assert hist["epoch"].tolist() == [1, 2]
    assert set(hist.columns) >= {"train_loss", "valid_loss", "accuracy"}
    m, sched = info["metrics"], info["schedule"]
    assert m["best_epoch"] == sched["best_epoch"] >= sched["anneal_start"]
    assert m["best_valid_loss"] == pytest.approx(hist["valid_loss"].iloc[m["best_epoch"] - 1])
    assert sched["phase"] == "done" and sched["kind"] == "triangle"
    _, body, bias, head = sched["lr_max"]  # filters (muon), body, batch-norm biases, head
    assert bias == pytest.approx(64 * body) and head == pytest.approx(body)
    assert sum(info["split_counts"].values()) > 300 and info["split_counts"]["valid"] > 0
    assert not (trained_ws.models / INPROGRESS).exists()


class _AtStart(Callback):
    """The model's weights when the fit begins (after the warm start, before any step)."""

    def before_fit(self):
        self.state = {k: v.clone() for k, v in self.learn.model.state_dict().items()}


def test_warm_start_generation_after_adding_a_class(trained_ws):
    demo.add_class(trained_ws)
    start = _AtStart()
    r = train(trained_ws, TrainConfig(**{**TINY, "epochs": 1}, init_from="last", freeze_epochs=0),
              progress=False, extra_cbs=[start])
    assert r.name == "gen-0002"
    assert r.info["parent"] == "gen-0001" and r.info["init"] == "warm"
    assert r.info["classes_added"] == ["giraffe"]
    assert "giraffe" in r.info["classes"] and len(r.info["classes"]) == 8
    parent, _ = models.load_generation(trained_ws, "gen-0001")
    head = models.classifier_keys(parent)  # airbench's head has no bias: one tensor
    assert r.info["transferred_tensors"] == len(parent.state_dict()) - len(head)
    # the practitioner's warm start: every body tensor as the parent had it, a new head
    for k, v in parent.state_dict().items():
        if k not in head:
            assert torch.equal(start.state[k], v), k
    for k in head:
        assert start.state[k].shape[0] == 8  # one row per class of the grown list


@pytest.mark.parametrize("method,schedule", [("copy", "fine_tune"), ("shrink_perturb", "rewarm"),
                                             ("dash", "rewarm")])
def test_each_warm_method_learns_the_grown_set_and_is_recorded(trained_ws, method, schedule):
    demo.add_class(trained_ws)
    start = _AtStart()
    cfg = TrainConfig(**{**TINY, "epochs": 3}, init_from="last", warm_method=method,
                      warm_schedule=schedule)
    r = train(trained_ws, cfg, progress=False, extra_cbs=[start])
    assert (r.info["warm_method"], r.info["warm_schedule"]) == (method, schedule)
    assert r.info["config"]["warm_method"] == method
    assert r.info["metrics"]["valid_accuracy"] > 3 / len(r.info["classes"])  # chance: 1/8
    parent, _ = models.load_generation(trained_ws, "gen-0001")
    p = parent.state_dict()
    body = [k for k in p if k not in models.classifier_keys(parent) and p[k].dim() > 1]
    moved = [k for k in body if not torch.equal(start.state[k], p[k])]
    # copy keeps the body as it is; the others change it before the first step, but
    # from the parent's weights, not from new random ones
    assert (not moved) if method == "copy" else moved
    cos = {k: torch.nn.functional.cosine_similarity(start.state[k].flatten().float(),
                                                    p[k].flatten().float(), 0) for k in body}
    assert min(cos.values()) > 0.5, min(cos.items(), key=lambda kv: kv[1])
    stem = "stem.0.weight"  # the whitening layer is fixed: copied, never shrunk or perturbed
    assert torch.equal(start.state[stem], p[stem])


def test_a_resumed_dash_run_is_not_shrunk_twice(trained_ws, monkeypatch, capsys):
    from zoolib import warmstart

    calls = []
    real = warmstart.dash
    monkeypatch.setattr(warmstart, "dash", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = TrainConfig(**{**TINY, "epochs": 3}, init_from="last", warm_method="dash")
    _interrupted(trained_ws, cfg, 1)
    capsys.readouterr()
    r = train(trained_ws, cfg, progress=False)
    assert "resuming an interrupted run after epoch 1" in capsys.readouterr().out
    assert len(calls) == 1 and r.info["warm_method"] == "dash"


def test_warm_settings_are_checked():
    with pytest.raises(ZoolibError, match="WARM_METHOD must be one of"):
        TrainConfig(warm_method="reset").check()
    with pytest.raises(ZoolibError, match="apply with WARM_METHOD='shrink_perturb'"):
        TrainConfig(warm_shrink=0.5).check()
    sp = TrainConfig(warm_method="shrink_perturb").resolved()
    assert (sp.warm_shrink, sp.warm_perturb) == (0.4, 0.1)  # Ash & Adams'
    with pytest.raises(ZoolibError, match="DASH_LAMBDA"):
        TrainConfig(dash_lambda=0).check()


def test_throwaway_run_with_lower_cutoff(trained_ws):
    cfg = TrainConfig(**{**TINY, "epochs": 1}, min_images=35, throwaway=True, init_from="last",
                      freeze_epochs=0)
    r = train(trained_ws, cfg, progress=False)
    assert r.info["throwaway"] is True and "okapi" in r.info["classes"]
    assert r.info["min_images"] == 35
    with pytest.raises(ZoolibError, match="throw-away"):
        models.write_deployed(trained_ws, r.name)


class _Stop(Exception):
    pass


class _InterruptAfter(Callback):
    order = 90  # after the checkpoint is written

    def __init__(self, epoch):
        self.stop_at = epoch

    def after_epoch(self):
        if self.epoch + 1 == self.stop_at:
            raise _Stop("interrupted")


class _ScriptedLoss(Callback):
    """Replace the recorded validation loss with a script, before the schedule reads it."""
    order = Recorder.order + 0.5

    def __init__(self, losses):
        self.losses = losses

    def after_epoch(self):
        vals = self.recorder.values[-1]
        vals[self.recorder.metric_names[1:].index("valid_loss")] = self.losses[self.epoch]


def test_plateau_starts_the_anneal_and_records_the_epoch(demo_ws):
    cfg = TrainConfig(**{**PLATEAU, "epochs": 6, "patience": 2})
    r = train(demo_ws, cfg, progress=False,
              extra_cbs=[_ScriptedLoss([1.0, 0.8, 0.9, 0.95, 0.5, 0.4])])
    # best at 2, no better at 3 and 4: plateau; anneal ceil(0.25 * 4) = 1 epoch, then stop
    assert r.history["valid_loss"].tolist() == [1.0, 0.8, 0.9, 0.95, 0.5]
    m = r.info["metrics"]
    assert (m["plateau_epoch"], m["anneal_start"], m["best_epoch"]) == (2, 5, 5)
    assert m["epochs_run"] == 5 and m["stopped_early"]


class _Grab(Callback):
    """Keep the weights after every epoch: the average (what a run keeps) or the raw ones."""
    order = 80  # before _InterruptAfter stops the run

    def __init__(self, average: bool = True):
        self.saved, self.average = {}, average

    def after_epoch(self):
        model = self.learn.ema.average.module if self.average else self.learn.model
        self.saved[self.epoch + 1] = {k: v.clone() for k, v in model.state_dict().items()}


def test_the_best_annealed_epoch_is_kept_not_the_last(demo_ws):
    grab = _Grab()
    cfg = TrainConfig(**{**PLATEAU, "epochs": 4, "patience": 5, "anneal_pct": 1.0})
    # anneal over epochs 3-4 (budget); epoch 1's loss is lowest but never annealed
    r = train(demo_ws, cfg, progress=False, extra_cbs=[_ScriptedLoss([0.1, 0.9, 0.3, 0.5]), grab])
    assert r.info["metrics"]["best_epoch"] == 3
    model, _ = models.load_generation(demo_ws, r.name)
    for k, v in model.state_dict().items():
        assert torch.equal(v, grab.saved[3][k]), k
    assert not torch.equal(model.state_dict()["head.weight"], grab.saved[4]["head.weight"])


class _First(Callback):
    """Weights (raw and averaged) and schedule progress when the first trained epoch begins."""
    order = 96

    def __init__(self):
        self.raw = None

    def before_train(self):
        if self.raw is None:
            self.raw = {k: v.clone() for k, v in self.learn.model.state_dict().items()}
            self.average = {k: v.clone() for k, v in
                        self.learn.ema.average.module.state_dict().items()}
            self.progress = asdict(self.learn.plateau_schedule.state)


def test_interrupted_run_resumes_the_same_run(demo_ws, capsys):
    losses = [1.0, 0.8, 0.9, 0.95, 0.5, 0.4]
    cfg = TrainConfig(**{**PLATEAU, "epochs": 6, "patience": 2})
    raw, avg = _Grab(average=False), _Grab()
    with pytest.raises(_Stop, match="interrupted"):
        train(demo_ws, cfg, progress=False,
              extra_cbs=[_ScriptedLoss(losses), raw, avg, _InterruptAfter(3)])
    (folder,) = (demo_ws.models / INPROGRESS).glob("*/run.json")  # the run's own folder
    state = read_checkpoint(folder.parent)  # one file: weights, optimizer, progress, rng
    assert {"model", "optimizer", "rng", "ema"} <= set(state)
    assert state["epochs_done"] == 3 and len(state["history"]) == 3
    assert (state["schedule"]["best"], state["schedule"]["wait"]) == (0.8, 1)
    assert models.generation_names(demo_ws) == []  # nothing half-saved
    first = _First()
    r = train(demo_ws, cfg, progress=False, extra_cbs=[_ScriptedLoss(losses), first])
    assert "resuming an interrupted run after epoch 3" in capsys.readouterr().out
    # the same run goes on: its weights, its average, its patience counter and best
    for k, v in raw.saved[3].items():
        assert torch.equal(first.raw[k], v), k
    for k, v in avg.saved[3].items():
        assert torch.equal(first.average[k], v), k
    assert (first.progress["best"], first.progress["wait"]) == (0.8, 1)
    # so the plateau test fires after epoch 4, as in an uninterrupted run
    assert (r.info["metrics"]["plateau_epoch"], r.info["metrics"]["anneal_start"]) == (2, 5)
    assert r.history["epoch"].tolist() == [1, 2, 3, 4, 5]
    assert r.history.iloc[:3].to_dict("records") == state["history"]
    assert not (demo_ws.models / INPROGRESS).exists()


class _FirstBatches(Callback):
    """Per epoch: the labels and pixel sum of the first augmented training batch."""
    order = 95

    def before_fit(self):
        self.seen = {}

    def before_batch(self):
        if self.training and self.iter == 0:
            self.seen[self.epoch] = (self.y.tolist(), round(float(self.x.float().sum()), 2))


def test_a_resumed_run_shuffles_and_augments_as_the_uninterrupted_one(demo_ws):
    cfg = TrainConfig(**{**TINY, "epochs": 5, "patience": 5})
    whole = _FirstBatches()
    train(demo_ws, cfg, progress=False, extra_cbs=[whole])
    with pytest.raises(_Stop):
        train(demo_ws, cfg, progress=False, extra_cbs=[_FirstBatches(), _InterruptAfter(3)])
    resumed = _FirstBatches()
    train(demo_ws, cfg, progress=False, extra_cbs=[resumed])
    assert set(resumed.seen) == {3, 4}
    assert resumed.seen == {k: whole.seen[k] for k in (3, 4)}


def test_a_run_with_other_settings_leaves_an_interrupted_one_alone(demo_ws, capsys):
    cfg = TrainConfig(**{**TINY, "epochs": 3})
    with pytest.raises(_Stop):
        train(demo_ws, cfg, progress=False, extra_cbs=[_InterruptAfter(1)])
    (waiting,) = (demo_ws.models / INPROGRESS).glob("*/run.json")
    capsys.readouterr()
    other = train(demo_ws, TrainConfig(**{**TINY, "epochs": 2}), progress=False)
    assert other.name == "gen-0001" and waiting.exists()  # still there to resume
    assert "1 other interrupted run(s)" in capsys.readouterr().out  # and said so
    lock = demo_ws.cache / "locks" / f"train-{waiting.parent.name}.lock"
    with FileLock(lock):  # as if another process were running it
        with pytest.raises(ZoolibError, match="already going on in another process"):
            train(demo_ws, cfg, progress=False)
    assert waiting.exists()
    resumed = train(demo_ws, cfg, progress=False)
    assert resumed.name == "gen-0002" and not (demo_ws.models / INPROGRESS).exists()
    # the lock file stays: removing it on release lets a process that opened the old
    # file hold it while a third locks a new one (one lock helper, workspace.file_lock)
    assert lock.is_file()


def test_a_crash_after_the_last_epoch_still_saves_the_kept_weights(demo_ws):
    cfg = TrainConfig(**{**PLATEAU, "epochs": 4, "patience": 5, "anneal_pct": 1.0})
    grab = _Grab()
    with pytest.raises(_Stop):
        train(demo_ws, cfg, progress=False,
              extra_cbs=[_ScriptedLoss([0.1, 0.9, 0.3, 0.5]), grab, _InterruptAfter(4)])
    assert models.generation_names(demo_ws) == []
    r = train(demo_ws, cfg, progress=False)  # nothing left to train: it only saves
    assert r.info["metrics"]["best_epoch"] == 3 and len(r.history) == 4
    model, _ = models.load_generation(demo_ws, r.name)
    for k, v in model.state_dict().items():
        assert torch.equal(v, grab.saved[3][k]), k
    assert not torch.equal(model.state_dict()["head.weight"], grab.saved[4]["head.weight"])


@pytest.fixture
def colour_ws(tmp_path):
    """Three classes of 24 tiny images: a run of COLOUR_TINY takes well under a second."""
    return colour_workspace(tmp_path / "colours")


def _interrupted(ws, cfg, epochs_done):
    """Interrupt a run after `epochs_done` epochs; its folder."""
    with pytest.raises(_Stop):
        train(ws, cfg, progress=False, extra_cbs=[_InterruptAfter(epochs_done)])
    (run,) = (ws.models / INPROGRESS).glob("*/run.json")
    return run.parent


def test_a_kill_while_writing_the_checkpoint_resumes_from_the_epoch_before(colour_ws, capsys):
    """One checkpoint file written whole: a kill mid-write leaves the previous epoch's
    checkpoint and a dead temporary, never files of two epochs."""
    cfg = TrainConfig(**{**COLOUR_TINY, "patience": 5}, validate="every")  # compared below
    whole = train(colour_ws, cfg, progress=False)
    run_dir = _interrupted(colour_ws, cfg, 1)
    names = {p.name for p in (run_dir / "checkpoint").iterdir()}
    assert "state.pth" in names and names <= {"kept.pth", "state.pth"}  # one file per epoch
    cut = run_dir / "checkpoint" / f".state.pth.{dead_pid()}-2.tmp"  # epoch 2, cut short
    cut.write_bytes((run_dir / "checkpoint" / "state.pth").read_bytes()[:1000])
    capsys.readouterr()
    r = train(colour_ws, cfg, progress=False)
    said = capsys.readouterr().out
    assert "resuming an interrupted run after epoch 1" in said and cut.name in said
    # the same run: epoch 2 trained from epoch 1's weights, as without the kill (the
    # smoothed training loss restarts with the process; the validation is the same)
    same = ["epoch", "valid_loss", "accuracy"]
    assert r.history[same].to_dict("records") == whole.history[same].to_dict("records")


def test_a_run_folder_of_an_older_zoolib_starts_again_saying_so(colour_ws, capsys):
    cfg = TrainConfig(**COLOUR_TINY)
    run_dir = _interrupted(colour_ws, cfg, 1)
    (run_dir / "checkpoint" / "state.pth").unlink()  # the old layout: four files per epoch
    (run_dir / "state.json").write_text('{"epochs_done": 1, "history": [], "schedule": {}}')
    (run_dir / "checkpoint" / "last.pth").write_bytes(b"old")
    capsys.readouterr()
    r = train(colour_ws, cfg, progress=False)
    said = capsys.readouterr().out
    assert "older zoolib" in said and "from epoch 1" in said and "resuming" not in said
    assert r.history["epoch"].tolist() == [1, 2]


def test_a_damaged_checkpoint_is_named(colour_ws):
    cfg = TrainConfig(**COLOUR_TINY)
    run_dir = _interrupted(colour_ws, cfg, 1)
    (run_dir / "checkpoint" / "state.pth").write_bytes(b"\x00garbage")
    with pytest.raises(ZoolibError, match=r"checkpoint/state.pth is unreadable .*set "
                                          "RESUME=False"):
        train(colour_ws, cfg, progress=False)
    r = train(colour_ws, TrainConfig(**{**COLOUR_TINY, "resume": False}), progress=False)
    assert r.history["epoch"].tolist() == [1, 2]  # RESUME=False: this run, from epoch 1
    assert not (colour_ws.models / INPROGRESS).exists()  # the damaged folder went with it


def test_dead_temporaries_of_an_interrupted_run_are_removed(colour_ws, capsys):
    cfg = TrainConfig(**COLOUR_TINY)
    run_dir = _interrupted(colour_ws, cfg, 1)
    kept = run_dir / "checkpoint" / f".kept.pth.{dead_pid()}-1.tmp"  # a kill in write_atomic
    kept.write_bytes(b"half")
    done = colour_ws.models / INPROGRESS / f".0123456789abcdef.{dead_pid()}-done.tmp"
    (done / "checkpoint").mkdir(parents=True)  # a finished run killed while removing its folder
    capsys.readouterr()
    train(colour_ws, cfg, progress=False)
    said = capsys.readouterr().out
    assert kept.name in said and done.name in said and "resuming" in said
    assert not (colour_ws.models / INPROGRESS).exists()


def test_a_run_killed_after_saving_is_not_trained_again(colour_ws, monkeypatch, capsys):
    cfg = TrainConfig(**COLOUR_TINY)
    monkeypatch.setattr(train_module, "discard_run", lambda run_dir: None)  # killed there
    first = train(colour_ws, cfg, progress=False)
    monkeypatch.undo()
    (run_dir,) = (colour_ws.models / INPROGRESS).iterdir()
    attempt = json.loads((run_dir / "run.json").read_text())["attempt"]
    assert first.info["run_attempt"] == attempt
    capsys.readouterr()
    again = train(colour_ws, cfg, progress=False)
    assert "this run was saved as gen-0001 before it was interrupted" in capsys.readouterr().out
    assert again.name == "gen-0001" and models.generation_names(colour_ws) == ["gen-0001"]
    assert again.history.equals(first.history)  # NaN where not validated (VALIDATE="last")
    assert not (colour_ws.models / INPROGRESS).exists()
    assert train(colour_ws, cfg, progress=False).name == "gen-0002"  # a new run trains anew


class _FrozenCheck(Callback):
    """The head before training, all weights after epoch 1, the lrs of epoch 2's first batch."""
    order = 96

    def before_fit(self):
        self.head0 = {k: v.clone() for k, v in self.learn.model.get_classifier().state_dict().items()}

    def after_epoch(self):
        if self.epoch == 0:
            self.after_first = {k: v.clone() for k, v in self.learn.model.state_dict().items()}

    def before_batch(self):
        if self.training and self.epoch == 1 and self.iter == 0:
            self.lrs = [h["lr"] for h in self.opt.hypers]


def test_a_frozen_warm_epoch_trains_the_head_alone(trained_ws):
    demo.add_class(trained_ws)
    parent, _ = models.load_generation(trained_ws, "gen-0001")
    check = _FrozenCheck()
    cfg = TrainConfig(**{**TINY, "epochs": 2}, init_from="last", freeze_epochs=1, lr_mult=10.0,
                      optimizer="sgd", warm_schedule="fine_tune")
    r = train(trained_ws, cfg, progress=False, extra_cbs=[check])
    body = [k for k in parent.state_dict() if not k.startswith("head.")]
    assert len(body) > 20
    for k in body:  # weights and batch-norm statistics alike
        assert torch.equal(check.after_first[k], parent.state_dict()[k]), k
    assert not torch.equal(check.after_first["head.weight"], check.head0["weight"])
    body_lr, bias_lr, head_lr = check.lrs  # body, batch-norm biases, head: distinct rates
    assert body_lr == pytest.approx(head_lr / 10) and body_lr != head_lr
    assert bias_lr == pytest.approx(64 * body_lr)
    assert r.info["schedule"]["freeze_epochs"] == 1
    body_max, _, head_max = r.info["schedule"]["lr_max"]
    assert body_max == pytest.approx(head_max / 10)
    model, _ = models.load_generation(trained_ws, r.name)
    assert any(not torch.equal(model.state_dict()[k], parent.state_dict()[k]) for k in body)


def test_a_warm_body_renormalises_once_it_trains(trained_ws):
    """The airbench recipe fixes batch-norm scales for the whole run; the body's
    statistics must still follow its data once the frozen epochs are over (fastai's
    BnFreeze kept them at the parent's all run long)."""
    demo.add_class(trained_ws)
    parent, _ = models.load_generation(trained_ws, "gen-0001")
    check = _FrozenCheck()
    cfg = TrainConfig(**{**TINY, "epochs": 2}, init_from="last", freeze_epochs=1,
                      recipe="airbench")
    r = train(trained_ws, cfg, progress=False, extra_cbs=[check])
    assert r.info["recipe"]["bn_frozen_scale"]
    model, _ = models.load_generation(trained_ws, r.name)
    stats = [k for k in parent.state_dict() if k.endswith("running_mean")]
    assert stats
    for k in stats:  # the frozen epoch keeps them, the whole-model epoch updates them
        assert torch.equal(check.after_first[k], parent.state_dict()[k]), k
        assert not torch.equal(model.state_dict()[k], parent.state_dict()[k]), k


def test_training_learns_a_separable_set(tmp_path):
    ws = workspace.create(tmp_path / "ws")
    rng = np.random.default_rng(0)
    for cls, colour in {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}.items():
        (ws.library / cls).mkdir(parents=True)
        for i in range(60):
            px = np.clip(np.array(colour) + rng.normal(0, 50, (32, 32, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(ws.library / cls / f"{i:02d}.png")
    r = train(ws, TrainConfig(**{**TINY, "epochs": 4}), progress=False)
    assert r.info["metrics"]["valid_accuracy"] >= 0.9  # chance is 1/3
    rows = r.splits[r.splits["split"].isin(["test", "benchmark"])]
    frame = evaluate.predict_rows(ws, r.name, rows)
    assert len(frame) >= 20 and (frame["pred"] == frame["label"]).mean() >= 0.9


@pytest.mark.parametrize("cfg,match", [
    (dict(init_from="gen-0007"), "'gen-0007' does not exist"),
    (dict(init_from="last"), "no generation yet"),
    (dict(arch="resnet_18"), "unknown architecture 'resnet_18'"),
    (dict(epochs=0), "EPOCHS must be at least 1"),
    (dict(lr=-1.0), "LR must be positive"),
])
def test_bad_settings_are_named(demo_ws, cfg, match):
    with pytest.raises(ZoolibError, match=match):
        train(demo_ws, TrainConfig(**{**TINY, **cfg}), progress=False)


def test_init_from_other_architecture(trained_ws):
    with pytest.raises(ZoolibError, match="cannot warm-start a zoo_cnn from gen-0001"):
        train(trained_ws, TrainConfig(**{**TINY, "arch": "zoo_cnn"}, init_from="gen-0001"),
              progress=False)


def test_class_folder_without_readable_image(demo_ws):
    (demo_ws.library / "ghost").mkdir()
    with pytest.raises(ZoolibError, match="'ghost'"):
        train(demo_ws, TrainConfig(**TINY), progress=False)
    (demo_ws.library / "ghost" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ZoolibError, match="'ghost' \\(1 files\\)"):
        train(demo_ws, TrainConfig(**TINY), progress=False)


def test_missing_workspace(tmp_path):
    with pytest.raises(ZoolibError, match="does not exist"):
        train(tmp_path / "nowhere", TrainConfig(**TINY), progress=False)


def test_class_folder_name_that_is_not_plain(demo_ws):
    bad = demo_ws.library / "lion\x07bell"
    (demo_ws.library / "lion").rename(bad)
    with pytest.raises(ZoolibError, match="not a plain name: contains control"):
        train(demo_ws, TrainConfig(**TINY), progress=False)


def test_a_warm_start_keeps_its_parents_preprocessing(demo_ws):
    classes = ["cheetah", "elephant", "flamingo", "leopard", "lion", "penguin", "zebra"]
    info = {"arch": "zoo_cnn_small", "img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
            "interpolation": "bicubic", "classes": classes}
    models.save_generation(demo_ws, models.create_model("zoo_cnn_small", len(classes)), info)
    r = train(demo_ws, TrainConfig(**{**TINY, "epochs": 2}, init_from="last"), progress=False)
    assert (r.info["mean"], r.info["std"], r.info["interpolation"]) == ([0.5] * 3, [0.5] * 3,
                                                                         "bicubic")


def test_notebook_parameters_reach_the_config_by_name():
    cfg = TrainConfig.from_params({"LR_WARM": 0.001, "FREEZE_EPOCHS": 2, "WORKSPACE": "x",
                                   "EPOCHS": 5, "lr": 9.0})
    assert (cfg.lr_warm, cfg.freeze_epochs, cfg.epochs, cfg.lr) == (0.001, 2, 5, TrainConfig.lr)


@pytest.mark.parametrize("params,match", [
    ({"EPOCH": 20}, "unknown training parameter EPOCH: did you mean EPOCHS"),
    ({"TTA": True}, "unknown training parameter TTA"),
    ({"EPOCHS": "ten"}, "EPOCHS must be an int"),
    ({"EPOCHS": 2.5}, "EPOCHS must be an int"),
    ({"LR": True}, "LR must be a float"),
    ({"LOOKAHEAD": "maybe"}, "LOOKAHEAD must be a bool"),
    ({"ARCH": 3}, "ARCH must be a str"),
])
def test_unknown_parameters_and_wrong_types_are_refused_by_name(params, match):
    with pytest.raises(ZoolibError, match=match):
        TrainConfig.from_params(params)


def test_parameter_values_are_read_as_their_fields_type():
    """PyYAML reads `LR: 1e-3` as a string; a notebook's own names pass with `other`."""
    cfg = TrainConfig.from_params({"LR": "1e-3", "EPOCHS": "20", "LOOKAHEAD": "false",
                                   "BATCH_SIZE": 64.0, "FLIP": False, "TTA": True},
                                  other={"TTA"})
    assert (cfg.lr, cfg.epochs, cfg.lookahead, cfg.batch_size, cfg.flip) == (
        0.001, 20, False, 64, False)
    assert type(cfg.epochs) is int and type(cfg.batch_size) is int


@pytest.mark.parametrize("cfg,match", [
    (dict(init_from="last", freeze_epochs=3, epochs=3), "FREEZE_EPOCHS=3 leaves no epoch"),
    (dict(anneal_pct=0.0), "ANNEAL_PCT"),
    (dict(precision="fp8"), "PRECISION must be one of"),
    (dict(max_shift=0.6), "MAX_SHIFT"),
    (dict(lr_warm=0.0), "LR_WARM must be positive"),
])
def test_recipe_settings_that_make_no_sense_are_named(cfg, match):
    with pytest.raises(ZoolibError, match=match):
        TrainConfig(**{**TINY, **cfg}).check()


def test_settings_that_change_nothing_are_not_part_of_a_runs_identity(demo_ws):
    """NUM_WORKERS (or the cache, or RESUME) changed between attempts: the same run."""
    cfg = TrainConfig(**{**TINY, "epochs": 3})
    with pytest.raises(_Stop):
        train(demo_ws, cfg, progress=False, extra_cbs=[_InterruptAfter(1)])
    r = train(demo_ws, TrainConfig(**{**TINY, "epochs": 3, "num_workers": 0, "cache": False}),
              progress=False)
    assert r.history["epoch"].tolist() == [1, 2, 3]
    assert not (demo_ws.models / INPROGRESS).exists()  # resumed, not a second folder
