"""Smoke tests of the bench scripts (replicate, train_recipe, gpu_check) on a tiny
generated cifar-like folder tree."""
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from zoolib.workspace import ZoolibError

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _script(name: str):
    if str(BENCH) not in sys.path:  # the scripts import their shared bench/cifar.py
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rep():
    return _script("replicate")


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
    data = _fake_cifar(tmp_path / "cifar", n_train=40, n_test=6)
    args = rep.parse_args(["--quick", "--data", str(data), "--out", str(tmp_path / "out"),
                           "--run", "smoke", "--sizes", "12,16,20", "--new-class", "10",
                           "--inbox-per-class", "8", "--test-per-class", "5", "--epochs", "2",
                           "--holdout", "deer", "--workers", "0"])
    m = rep.run(args)
    out = tmp_path / "out" / "smoke"
    for name in ("summary.md", "metrics.json", "curves.png", "inbox.png", "generations.csv",
                 "enrichment.csv", "junk_scores.csv", "inbox_truth.csv"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["run"] == "smoke"
    # inbox: 8 per class of all ten classes, opaque names, never library files
    truth = pd.read_csv(out / "inbox_truth.csv")
    assert len(truth) == 80 and m["inbox"]["images"] == 80 and truth["junk"].sum() == 32
    lib = {p.stat().st_ino for p in (out / "workspace" / "library").rglob("*.jpg")}
    assert len(lib) == 6 * 20  # generation 3's library
    assert not lib & {Path(s).stat().st_ino for s in truth["source"]}  # hard links: by inode
    inbox = list((out / "workspace" / "inbox").iterdir())
    assert not any(p.is_symlink() for p in inbox)  # zoolib never follows links
    assert {p.stat().st_ino for p in inbox} == {Path(s).stat().st_ino for s in truth["source"]}
    # the library grows: five classes, then the held-out one arrives, then more of all
    assert m["library_counts"]["1"] == {c: 12 for c in rep.ANIMALS if c != "deer"}
    assert m["library_counts"]["2"]["deer"] == 10 and m["library_counts"]["2"]["dog"] == 16
    assert set(m["library_counts"]["3"].values()) == {20}
    # every generation after the first: a warm chain and a scratch run on the same splits
    runs = m["runs"]
    assert runs["2"]["warm"]["n_classes"] == runs["3"]["scratch"]["n_classes"] == 6
    assert runs["1"]["scratch"]["n_classes"] == 5
    assert set(m["warm_vs_scratch"]) == {"2", "3"} and set(m["test"]["3"]) == {"warm", "scratch"}
    assert m["test"]["3"]["warm"]["images"] == 30 and m["test"]["1"]["scratch"]["images"] == 25
    assert m["lookalike"]["class"] in {"bird", "cat", "dog", "frog", "horse"}
    assert sum(m["lookalike"]["counts"].values()) == 10 and m["lookalike"]["base_share"] == 0.1
    scores = pd.read_csv(out / "junk_scores.csv")
    assert {"confidence", "margin", "ood", "knn"} <= set(scores["score"])
    assert scores["default"].sum() == 1
    assert set(m["goals"]) == set(rep.GOALS)
    assert all(set(g) >= {"value", "goal", "met"} for g in m["goals"].values())
    assert m["memory"]["peak_rss_mb"] > 100 and m["memory"]["rss_per_epoch_mb"]["gen3-warm"]
    summary = (out / "summary.md").read_text()
    assert "held-out class **deer**" in summary and "## Goals" in summary


def _run(name, history, metrics):
    return SimpleNamespace(history=pd.DataFrame(history), info={"metrics": metrics}, name=name)


def test_warm_vs_scratch_ratio(rep):
    scratch = _run("s", {"epoch": [1, 2, 3, 4, 5, 6, 7, 8],
                         "valid_loss": [2, 1.8, 1.5, 1.3, 1.2, 1.1, 1.0, 1.05],
                         "accuracy": [.3, .4, .5, .6, .65, .7, .72, .71]},
                   {"epochs_run": 8, "plateau_epoch": 6, "valid_accuracy": .71})
    warm = _run("w", {"epoch": [1, 2, 3], "valid_loss": [1.2, 1.0, 0.9],
                      "accuracy": [.6, .73, .74]},
                {"epochs_run": 3, "plateau_epoch": None, "valid_accuracy": .74})
    c = rep.warm_vs_scratch(warm, scratch)
    assert c["scratch_best_accuracy"] == .72 and c["scratch_best_epoch"] == 7
    assert c["warm_epochs_to_scratch_best"] == 2
    assert c["ratio"] == pytest.approx(2 / 7) and c["ratio_vs_epochs"] == pytest.approx(2 / 8)
    assert (c["scratch_plateau_epoch"], c["warm_plateau_epoch"]) == (6, None)
    worse = _run("w", {"epoch": [1, 2], "valid_loss": [1, 1], "accuracy": [.5, .6]},
                 {"epochs_run": 2, "plateau_epoch": None, "valid_accuracy": .6})
    never = rep.warm_vs_scratch(worse, scratch)
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
        "ood": [-3, -3, -6, -7, -4, -6, -1, -2, -1, -5.0],
        "knn": [.3, .3, .2, .1, .3, .2, .9, .8, .7, .4]})
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
    assert scores.loc["knn", "auc"] == pytest.approx(1.0)  # high distance = junk
    assert scores["default"].sum() == 1


def test_bad_inputs_name_the_problem(rep, tmp_path):
    with pytest.raises(ZoolibError, match="needed"):
        rep.sample_files(tmp_path, [10, 20, 30], 5, 0)
    args = rep.parse_args(["--holdout", "okapi", "--out", str(tmp_path)])
    with pytest.raises(ZoolibError, match="--holdout"):
        rep.run(args)


FAKE_ANCHOR = """
import argparse, json
ap = argparse.ArgumentParser()
for flag in ("--per-class", "--seed", "--data", "--out"):
    ap.add_argument(flag)
a = ap.parse_args()
json.dump({"test_acc": 0.5, "test_acc_tta": 0.6, "per_class_test_acc_tta": {},
           "total_training_minutes": 2.0, "train_images_per_s": 100.0,
           "settings": {"n_test": 24, "precision": "fp32", "channels_last": True,
                        "epochs": 9.9, "batch_size": 1024, "total_train_steps": 3,
                        "per_class": int(a.per_class)}}, open(a.out, "w"))
"""


def test_recipe_benchmark_runs_beside_the_anchor_and_reports_goals(tmp_path):
    recipe = _script("train_recipe")
    data = _fake_cifar(tmp_path / "cifar", n_train=40, n_test=4)
    anchor = tmp_path / "anchor.py"
    anchor.write_text(FAKE_ANCHOR)
    m = recipe.run(recipe.parse_args([
        "--data", str(data), "--out", str(tmp_path / "out"), "--run", "r", "--per-class", "30",
        "--valid-per-class", "10", "--seeds", "0", "--epochs", "2", "--anchor",
        "--anchor-script", str(anchor), "--arch", "zoo_cnn_small", "--num-workers", "0"]))
    (ours,), (peer,) = m["zoolib"], m["anchor"]
    assert ours["test"]["images"] == 24 and 0 <= ours["test"]["accuracy_tta"] <= 1
    assert ours["config"]["arch"] == "zoo_cnn_small" and ours["split_counts"] == {
        "train": 180, "valid": 60}  # the pins: 30 + 10 per class, whatever the hashes say
    assert peer["test"]["accuracy_tta"] == 0.6 and peer["minutes"] == 2.0
    gap = m["goals"]["anchor_gap"]
    assert gap["value"] == pytest.approx(ours["test"]["accuracy_tta"] - 0.6, abs=1e-4)
    assert m["goals"]["minutes_ratio"]["value"] == pytest.approx(ours["minutes"] / 2.0, abs=1e-3)
    assert set(m["goals"]) == {"anchor_gap", "minutes_ratio"}  # no long run asked for
    assert m["cpu"]["cores"] >= 1 and "model" in m["cpu"]
    assert (tmp_path / "out" / "r" / "summary.md").is_file()


def test_recipe_benchmark_reads_back_the_runs_an_earlier_session_kept(tmp_path, monkeypatch):
    recipe = _script("train_recipe")
    data = _fake_cifar(tmp_path / "cifar", n_train=40, n_test=4)
    anchor = tmp_path / "anchor.py"
    anchor.write_text(FAKE_ANCHOR)
    parts = tmp_path / "parts"
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--per-class", "30",
            "--valid-per-class", "10", "--epochs", "1", "--anchor-script", str(anchor),
            "--arch", "zoo_cnn_small", "--num-workers", "0", "--parts", str(parts)]
    first = recipe.run(recipe.parse_args(argv + ["--run", "a", "--seeds", "0"]))
    assert [p.name for p in parts.iterdir()] == ["zoolib-0.json"]
    # from here on, zoolib must not train again
    monkeypatch.setattr(recipe, "run_zoolib", lambda *a, **k: pytest.fail("trained again"))
    both = recipe.run(recipe.parse_args(argv + ["--run", "b", "--seeds", "0", "--anchor"]))
    assert both["complete"] and both["zoolib"][0]["test"] == first["zoolib"][0]["test"]
    assert both["goals"]["anchor_gap"]["value"] == pytest.approx(
        first["zoolib"][0]["test"]["accuracy_tta"] - 0.6, abs=1e-4)
    later = recipe.run(recipe.parse_args(argv + ["--run", "c", "--seeds", "0,1", "--anchor",
                                                 "--max-minutes", "0"]))
    assert not later["complete"] and len(later["zoolib"]) == 1  # seed 1 not started
    part = json.loads((parts / "zoolib-0.json").read_text())
    part["cpu"]["model"] = "another CPU"
    (parts / "zoolib-0.json").write_text(json.dumps(part))
    with pytest.raises(BaseException, match="trained again"):  # never mixed across machines
        recipe.run(recipe.parse_args(argv + ["--run", "d", "--seeds", "0"]))


def test_gpu_check_runs_on_a_cpu_with_a_small_model(tmp_path):
    check = _script("gpu_check")
    data = _fake_cifar(tmp_path / "cifar", n_train=50, n_test=0)
    out = check.run(check.parse_args(["--arch", "zoo_cnn_small", "--size", "32",
                                      "--per-class", "40", "--inbox", "30", "--batch-size", "32",
                                      "--data", str(data), "--out", str(tmp_path / "g")]))
    assert out["loads_on_cpu"] and out["train_images_per_s"] > 0
    assert out["bulkid_images_per_s"] > 0
    assert json.loads((tmp_path / "g" / "gpu_check.json").read_text()) == out
