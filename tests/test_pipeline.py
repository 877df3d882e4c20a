"""The notebooks run by papermill: with parameters, and with their defaults on a
workspace that is not the demo."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from zoolib import models, pipeline, workspace


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


def test_pipeline_demo_command_runs_the_demo_job_as_make_demo_does(monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "run_demo", lambda ws, reports: calls.append((ws, reports)))
    pipeline.main(["demo", "--workspace", "w", "--reports", "r"])
    pipeline.main(["demo"])
    assert calls == [("w", "r"), ("build/demo-workspace", "reports/demo")]
    makefile = (Path(pipeline.__file__).parent.parent / "Makefile").read_text()
    assert "-m zoolib.pipeline demo --workspace build/demo-workspace" in makefile


def _plain_workspace(root):
    """Three classes of 45 noisy colour tiles and an inbox of 12: no Unknown folder, no
    provenance file, no duplicates planted; nothing the demo has."""
    ws = workspace.create(root)
    rng = np.random.default_rng(1)
    colours = {"ibis": (200, 60, 60), "kudu": (60, 160, 60), "tapir": (60, 60, 200)}
    for name, base in colours.items():
        (ws.library / name).mkdir()
        for i in range(45):
            px = np.clip(np.array(base) + rng.normal(0, 40, (40, 56, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(ws.library / name / f"{i:03d}.jpg")
    for i in range(12):
        base = list(colours.values())[i % 3]
        px = np.clip(np.array(base) + rng.normal(0, 40, (40, 56, 3)), 0, 255)
        Image.fromarray(px.astype(np.uint8)).save(ws.inbox / f"in_{i:02d}.jpg")
    return ws


def test_every_notebook_runs_with_its_defaults_on_a_plain_workspace(tmp_path):
    ws = _plain_workspace(tmp_path / "zoo")
    done = {}
    for name in ("01_curate", "02_train", "03_evaluate", "04_bulk_identify", "05_report"):
        done[name] = pipeline.run_notebook(name, tmp_path / "reports" / name,
                                           {"WORKSPACE": str(ws.root)})
    assert done["02_train"]["generation"] == "gen-0001"
    assert done["02_train"]["classes"] == ["ibis", "kudu", "tapir"]
    assert done["03_evaluate"]["deployed"] is None  # PROMOTE is off by default
    assert models.read_deployed(ws) is None


def test_01_curate_with_its_defaults_puts_near_duplicates_in_one_split(demo_ws, tmp_path):
    from zoolib import curate, library

    m = library.scan(demo_ws, progress=False)
    pairs = curate.near_duplicate_pairs(m, 4)  # NEAR_DISTANCE's default
    assert curate.leakage(demo_ws, m, pairs)["train_leak"].any()  # the demo plants some
    metrics = pipeline.run_notebook("01_curate", tmp_path / "c", {"WORKSPACE": str(demo_ws.root)})
    assert metrics["train_leaks"] > 0  # found, then pinned (PIN_LEAKS is on by default)
    assert not curate.leakage(demo_ws, m, pairs)["train_leak"].any()
