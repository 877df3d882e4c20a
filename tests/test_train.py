import json

import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback

from zoolib import demo, models
from zoolib.train import INPROGRESS, TrainConfig, train
from zoolib.workspace import ZoolibError

from .conftest import TINY


def test_scratch_generation_saved_with_its_record(trained_ws, truth):
    info = models.read_info(trained_ws, "gen-0001")
    assert info["classes"] == sorted(c for c, n in truth["counts"].items() if n >= 40)
    assert info["init"] == "scratch" and info["parent"] is None
    assert (info["arch"], info["img_size"], info["throwaway"]) == ("resnet18", 32, False)
    hist = pd.read_csv(trained_ws.models / "gen-0001" / "history.csv")
    assert hist["epoch"].tolist() == [1, 2]
    assert set(hist.columns) >= {"train_loss", "valid_loss", "accuracy"}
    m = info["metrics"]
    assert m["plateau_epoch"] == int(hist["valid_loss"].idxmin()) + 1
    assert m["best_valid_loss"] == pytest.approx(hist["valid_loss"].min())
    assert sum(info["split_counts"].values()) > 300 and info["split_counts"]["valid"] > 0
    assert not (trained_ws.models / INPROGRESS).exists()


def test_warm_start_generation_after_adding_a_class(trained_ws):
    demo.add_class(trained_ws)
    r = train(trained_ws, TrainConfig(**{**TINY, "epochs": 1}, init_from="last"), progress=False)
    assert r.name == "gen-0002"
    assert r.info["parent"] == "gen-0001" and r.info["init"] == "warm"
    assert r.info["classes_added"] == ["giraffe"]
    assert "giraffe" in r.info["classes"] and len(r.info["classes"]) == 8
    assert r.info["transferred_tensors"] > 100


def test_throwaway_run_with_lower_cutoff(trained_ws):
    cfg = TrainConfig(**{**TINY, "epochs": 1}, min_images=35, throwaway=True, init_from="last")
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


def test_interrupted_run_resumes(demo_ws, capsys):
    cfg = TrainConfig(**{**TINY, "epochs": 3, "patience": 5})
    with pytest.raises(_Stop, match="interrupted"):
        train(demo_ws, cfg, progress=False, extra_cbs=[_InterruptAfter(2)])
    state = json.loads((demo_ws.models / INPROGRESS / "state.json").read_text())
    assert state["epochs_done"] == 2 and len(state["history"]) == 2
    assert models.generation_names(demo_ws) == []  # nothing half-saved
    r = train(demo_ws, cfg, progress=False)
    assert "resuming an interrupted run after epoch 2" in capsys.readouterr().out
    assert r.history["epoch"].tolist() == [1, 2, 3]
    assert r.history.iloc[:2].to_dict("records") == state["history"]
    assert not (demo_ws.models / INPROGRESS).exists()


class _ScriptedLoss(Callback):
    """Replace the recorded validation loss with a script, before the trackers read it."""
    order = 55

    def __init__(self, losses):
        self.losses = losses

    def after_epoch(self):
        vals = self.recorder.values[-1]
        vals[self.recorder.metric_names[1:].index("valid_loss")] = self.losses[self.epoch]


def test_plateau_stop_records_the_epoch(demo_ws):
    cfg = TrainConfig(**{**TINY, "epochs": 6, "patience": 2})
    r = train(demo_ws, cfg, progress=False,
              extra_cbs=[_ScriptedLoss([1.0, 0.8, 0.9, 0.95, 0.5, 0.4])])
    assert r.history["valid_loss"].tolist() == [1.0, 0.8, 0.9, 0.95]
    assert r.info["metrics"]["plateau_epoch"] == 2
    assert r.info["metrics"]["epochs_run"] == 4 and r.info["metrics"]["stopped_early"]


def test_best_epoch_weights_are_saved(demo_ws):
    # the scripted best epoch is 1: the saved weights must be epoch 1's, not the last
    saved = {}

    class _Grab(Callback):
        order = 95

        def after_epoch(self):
            saved[self.epoch] = {k: v.clone() for k, v in self.learn.model.state_dict().items()}

    cfg = TrainConfig(**{**TINY, "epochs": 3, "patience": 5})
    r = train(demo_ws, cfg, progress=False, extra_cbs=[_ScriptedLoss([0.1, 0.9, 0.9]), _Grab()])
    model, _ = models.load_generation(demo_ws, r.name)
    assert torch.equal(model.state_dict()["fc.weight"], saved[0]["fc.weight"])
    assert not torch.equal(model.state_dict()["fc.weight"], saved[2]["fc.weight"])


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
    with pytest.raises(ZoolibError, match="cannot warm-start a resnet34 from gen-0001"):
        train(trained_ws, TrainConfig(**{**TINY, "arch": "resnet34"}, init_from="gen-0001"),
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
    with pytest.raises(ZoolibError, match="not a plain folder name: contains control"):
        train(demo_ws, TrainConfig(**TINY), progress=False)
