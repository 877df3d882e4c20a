"""02_train run by papermill with parameters, into a temporary folder."""
import json

import pandas as pd

from zoolib import models, pipeline


def test_papermill_02_train_with_parameters(demo_ws, tmp_path):
    out = tmp_path / "report"
    metrics = pipeline.run_notebook("02_train", out, {
        "WORKSPACE": str(demo_ws.root), "IMG_SIZE": 32, "EPOCHS": 2, "BATCH_SIZE": 32,
        "MIN_IMAGES": 35, "THROWAWAY": True, "SEED": 3, "LABEL_SMOOTHING": 0.1})
    assert (out / "02_train.ipynb").exists() and (out / "history.png").stat().st_size > 1000
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["generation"] == "gen-0001" and metrics["init"] == "scratch"
    assert metrics["throwaway"] is True and "okapi" in metrics["classes"]  # the 35 cutoff
    assert metrics["epochs_run"] == 2 and metrics["best_epoch"] == 2  # the annealed last epoch
    assert metrics["plateau_epoch"] is None  # the 2-epoch budget forced the anneal
    info = models.read_info(demo_ws, "gen-0001")
    assert info["img_size"] == 32 and info["config"]["seed"] == 3
    assert info["config"]["label_smoothing"] == 0.1  # every knob reaches TrainConfig
    assert info["metrics"]["valid_accuracy"] == metrics["valid_accuracy"]
    hist = pd.read_csv(demo_ws.models / "gen-0001" / "history.csv")
    assert len(hist) == 2


def test_write_and_read_metrics(tmp_path):
    pipeline.write_metrics(tmp_path / "a", {"x": 1})
    assert pipeline.read_metrics(tmp_path / "a") == {"x": 1}
    assert not list((tmp_path / "a").glob("*.tmp"))
