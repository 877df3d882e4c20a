"""Sweeps over parameter grids and k folds; fold assignment by content hash."""
import math

import pandas as pd
import pytest

from zoolib import models, splits, sweeps
from zoolib.train import TrainConfig
from zoolib.workspace import ZoolibError


def test_grid_and_folds():
    runs = sweeps.grid(LR=[0.001, 0.003], EPOCHS=[2, 4])
    assert runs == [{"LR": 0.001, "EPOCHS": 2}, {"LR": 0.001, "EPOCHS": 4},
                    {"LR": 0.003, "EPOCHS": 2}, {"LR": 0.003, "EPOCHS": 4}]
    assert sweeps.folds(3) == [{"FOLDS": 3, "FOLD": 0}, {"FOLDS": 3, "FOLD": 1},
                               {"FOLDS": 3, "FOLD": 2}]
    assert sweeps.run_name({"ARCH": "resnet18", "LR": 0.003}) == "ARCH=resnet18_LR=0.003"
    with pytest.raises(ZoolibError, match="LR"):
        sweeps.grid(LR=0.003)
    with pytest.raises(ZoolibError, match="2 folds"):
        sweeps.folds(1)


def test_failing_run_does_not_stop_the_others(tmp_path):
    calls = []

    def runner(notebook, out, params):
        calls.append(params)
        if params["LR"] == 0.1:
            raise ZoolibError("LR too high for this test\nsecond line")
        return {"valid_accuracy": params["LR"] * 10, "classes": ["a", "b"], "generation": "g"}

    table = sweeps.run_sweep(sweeps.grid(LR=[0.01, 0.1, 0.03]), tmp_path, base={"EPOCHS": 1},
                             runner=runner)
    assert len(calls) == 3 and all(c["EPOCHS"] == 1 for c in calls)
    assert table["status"].tolist() == ["ok", "failed", "ok"]
    assert table.loc[1, "error"] == "ZoolibError: second line"
    assert math.isnan(table.loc[1, "valid_accuracy"])
    assert "classes" not in table  # lists are not table cells
    assert pd.read_csv(tmp_path / "sweep.csv")["status"].tolist() == table["status"].tolist()
    summary = sweeps.summarize(table, ["valid_accuracy"])
    assert summary.loc[0, "runs"] == 2 and summary.loc[0, "failed"] == 1
    assert summary.loc[0, "valid_accuracy_mean"] == pytest.approx(0.2)
    assert summary.loc[0, "valid_accuracy_std"] == pytest.approx(math.sqrt(2) * 0.1)
    by = sweeps.summarize(table, ["valid_accuracy"], by=["LR"])
    assert by["LR"].tolist() == [0.01, 0.03, 0.1]
    assert by["runs"].tolist() == [1, 1, 0] and by["failed"].tolist() == [0, 0, 1]
    sweeps.plot_sweep(table, "valid_accuracy", tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    with pytest.raises(ZoolibError, match="no column"):
        sweeps.summarize(table, ["test_accuracy"])


def test_papermill_error_message():
    class Fake(Exception):
        ename, evalue = "ZoolibError", "\x1b[0;31munknown architecture 'nope'\x1b[0m"

    assert sweeps.error_message(Fake("traceback...")) == \
        "ZoolibError: unknown architecture 'nope'"


def _data(n=400):
    hashes = pd.Series([f"{i * 2654435761 % 2**32:08x}{i * 40503 % 2**32:08x}" + "0" * 16
                        for i in range(n)])
    return pd.DataFrame({"hash": hashes, "split": splits.assign(hashes)})


def test_fold_of_is_a_function_of_the_hash():
    d = _data()
    f = splits.fold_of(d["hash"], 5)
    assert set(f) == {0, 1, 2, 3, 4}
    assert f.tolist() == splits.fold_of(d["hash"][::-1], 5)[::-1].tolist()
    assert f.value_counts().min() > 40  # roughly even
    with pytest.raises(ZoolibError, match="FOLDS"):
        splits.fold_of(d["hash"], 1)


def test_apply_fold_moves_only_train_and_valid():
    d = _data()
    pool = d["split"].isin(["train", "valid"])
    seen_valid = set()
    for k in range(3):
        out = splits.apply_fold(d, 3, k)
        assert out.loc[~pool, "split"].tolist() == d.loc[~pool, "split"].tolist()
        valid = set(out.index[out["split"] == "valid"])
        assert valid == set(d.index[pool][splits.fold_of(d.loc[pool, "hash"], 3) == k])
        assert not valid & seen_valid  # each pool image is valid in exactly one fold
        seen_valid |= valid
    assert seen_valid == set(d.index[pool])
    with pytest.raises(ZoolibError, match="FOLD must be in 0..2"):
        splits.apply_fold(d, 3, 3)


def test_train_config_checks_folds():
    with pytest.raises(ZoolibError, match="FOLDS=3, FOLD=3"):
        TrainConfig(folds=3, fold=3).check()
    with pytest.raises(ZoolibError, match="FOLDS=1"):
        TrainConfig(folds=1).check()
    TrainConfig(folds=2, fold=1).check()


def test_two_fold_sweep_of_02_train(demo_ws, tmp_path):
    base = {"WORKSPACE": str(demo_ws.root), "IMG_SIZE": 32, "EPOCHS": 1, "BATCH_SIZE": 32,
            "THROWAWAY": True}
    table = sweeps.run_sweep(sweeps.folds(2), tmp_path / "cv", base=base)
    assert len(table) == 2, table
    assert table["status"].tolist() == ["ok", "ok"], table["error"].tolist()
    assert table["FOLD"].tolist() == [0, 1]
    assert table["generation"].tolist() == ["gen-0001", "gen-0002"]
    assert table["throwaway"].tolist() == [True, True]
    for name, fold in zip(table["generation"], (0, 1)):
        assert models.read_info(demo_ws, name)["config"]["fold"] == fold
    # the two folds swap train and valid images: the valid counts add up to the pool
    counts = [models.read_info(demo_ws, g)["split_counts"] for g in table["generation"]]
    assert counts[0]["valid"] + counts[1]["valid"] == counts[0]["train"] + counts[0]["valid"]
    assert counts[0]["test"] == counts[1]["test"]
    summary = sweeps.summarize(table, ["valid_accuracy"])
    assert summary.loc[0, "runs"] == 2
    assert summary.loc[0, "valid_accuracy_mean"] == pytest.approx(table["valid_accuracy"].mean())
    for run in table["run"]:
        assert (tmp_path / "cv" / run / "02_train.ipynb").exists()
