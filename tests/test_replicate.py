"""Smoke test of bench/replicate.py on a tiny generated cifar-like folder tree."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from zoolib.workspace import ZoolibError

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "replicate.py"


@pytest.fixture(scope="module")
def rep():
    spec = importlib.util.spec_from_file_location("replicate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_cifar(root: Path, n_train: int, n_test: int) -> Path:
    """train/<10 classes>/NNNN.jpg and test/<6 animals>/NNNN.jpg, a colour per class."""
    rng = np.random.default_rng(0)
    classes = ["bird", "cat", "deer", "dog", "frog", "horse",
               "airplane", "automobile", "ship", "truck"]
    for k, cls in enumerate(classes):
        base = np.array([(k * 37) % 256, (k * 91) % 256, (k * 53) % 256], dtype=float)
        for part, n in (("train", n_train), ("test", n_test if k < 6 else 0)):
            folder = root / part / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = np.clip(base + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def test_pipeline_writes_report(rep, tmp_path):
    data = _fake_cifar(tmp_path / "cifar", n_train=30, n_test=6)
    args = rep.parse_args(["--quick", "--data", str(data), "--out", str(tmp_path / "out"),
                           "--run", "smoke", "--per-class", "20", "--inbox-per-class", "8",
                           "--test-per-class", "5", "--epochs-gen1", "1", "--epochs-gen2", "2",
                           "--holdout", "deer", "--workers", "0"])
    m = rep.run(args)
    out = tmp_path / "out" / "smoke"
    for name in ("summary.md", "metrics.json", "curves.png", "inbox.png", "curves.csv",
                 "enrichment.csv", "junk_scores.csv", "inbox_truth.csv"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["run"] == "smoke"
    # inbox: 8 per class of all ten classes, opaque names, never library files
    truth = pd.read_csv(out / "inbox_truth.csv")
    assert len(truth) == 80 and m["inbox"]["images"] == 80
    assert truth["junk"].sum() == 32
    lib = {p.resolve() for p in (out / "workspace" / "library").rglob("*.jpg")}
    assert len(lib) == 6 * 20
    assert not lib & {Path(s).resolve() for s in truth["source"]}
    assert all(p.is_symlink() for p in (out / "workspace" / "inbox").iterdir())
    # generation 1 had five classes, generation 2 six; both gen-2 runs share splits
    assert m["gen1"]["epochs_run"] == 1
    assert m["lookalike"]["class"] in {"bird", "cat", "dog", "frog", "horse"}
    assert sum(m["lookalike"]["counts"].values()) == 20
    assert m["lookalike"]["base_share"] == pytest.approx(0.1)
    assert len(pd.read_csv(out / "curves.csv")) == 2
    assert m["test"]["images"] == 30
    assert 0 <= m["junk_auc"] <= 1
    assert [g["met"] for g in m["goals"]].count(None) == 0 and len(m["goals"]) == 5
    summary = (out / "summary.md").read_text()
    assert "held-out class **deer**" in summary and "## Goals" in summary
    # every missed goal (a 2-epoch smoke run misses some) says what would move it
    missed = [g for g in m["goals"] if not g["met"]]
    assert missed and summary.count("- **") == len(missed)
    assert all(rep.LEVERS[g["key"]][:40] in summary for g in missed)


def test_warm_vs_scratch_ratio(rep):
    scratch = pd.DataFrame({"epoch": [1, 2, 3, 4, 5, 6, 7, 8],
                            "valid_loss": [2, 1.8, 1.5, 1.3, 1.2, 1.1, 1.0, 1.05],
                            "accuracy": [.3, .4, .5, .6, .65, .7, .72, .71]})
    warm = pd.DataFrame({"epoch": [1, 2, 3, 4, 5, 6, 7, 8],
                         "valid_loss": [1.2, 1.0, 0.9, 0.95, 0.9, 0.85, 0.8, 0.8],
                         "accuracy": [.6, .73, .74, .7, .75, .76, .77, .78]})
    c = rep.warm_vs_scratch(warm, scratch)
    assert c["scratch_best_accuracy"] == .72 and c["scratch_best_epoch"] == 7
    assert c["warm_epochs_to_scratch_best"] == 2
    assert c["ratio"] == pytest.approx(2 / 7)
    assert c["ratio_vs_plateau"] == pytest.approx(2 / 7)
    never = rep.warm_vs_scratch(scratch.assign(accuracy=scratch["accuracy"] - .1), scratch)
    assert never["warm_epochs_to_scratch_best"] is None and never["ratio"] is None


def test_enrichment_and_junk_auc(rep):
    paths = [f"/in/{i}.jpg" for i in range(10)]
    labels = ["cat", "cat", "dog", "dog", "dog", "bird", "ship", "ship", "truck", "cat"]
    truth = pd.DataFrame({"path": paths, "label": labels,
                          "junk": [lbl in ("ship", "truck") for lbl in labels]})
    results = pd.DataFrame({
        "path": paths, "rel": [p[1:] for p in paths], "generation": "gen-0001", "error": "",
        "pred": ["dog", "dog", "dog", "dog", "dog", "bird", "bird", "dog", "bird", "bird"],
        "confidence": [.4, .5, .9, .95, .6, .9, .3, .35, .2, .8],
        "margin": [.1, .2, .8, .9, .3, .8, .05, .1, .02, .6],
        "entropy": [1.0, .9, .2, .1, .8, .2, 1.5, 1.4, 1.6, .4],
        "ood": [-3, -3, -6, -7, -4, -6, -1, -2, -1, -5.0]})
    results.attrs["classes"] = ["bird", "dog"]
    e = rep.enrichment(results, truth, "cat", "dog", 0.7)
    # dog below 0.7: paths 0, 1, 4, 7 -> two cats of four; cats are 3 of 10
    assert (e["candidates"], e["holdout_found"]) == (4, 2)
    assert e["enrichment"] == pytest.approx((2 / 4) / 0.3)
    assert e["recall"] == pytest.approx(2 / 3)
    scores = rep.junk_scores(results, truth).set_index("score")
    # the three junk rows have the three lowest confidences (0.2, 0.3, 0.35) and highest energies
    assert scores.loc["confidence", "auc"] == pytest.approx(1.0)
    assert scores.loc["confidence", "junk_in_bottom"] == pytest.approx(1.0)
    assert scores.loc["ood", "auc"] == pytest.approx(1.0)


def test_bad_inputs_name_the_problem(rep, tmp_path):
    with pytest.raises(ZoolibError, match="needed"):
        rep.sample_files(tmp_path, 10, 5, 0)
    args = rep.parse_args(["--holdout", "okapi", "--out", str(tmp_path)])
    with pytest.raises(ZoolibError, match="--holdout"):
        rep.run(args)
