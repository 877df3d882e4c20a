import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from zoolib import models
from zoolib.workspace import ZoolibError


def dead_pid() -> int:
    """The id of a process that has finished (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


INFO = {"arch": "resnet18", "img_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
        "classes": ["a", "b", "c"]}


def test_unknown_architecture_suggests_close_names():
    with pytest.raises(ZoolibError, match="unknown architecture 'resnt18'.*resnet18"):
        models.create_model("resnt18", 3)


def test_inception_v4_builds_with_its_head_named():
    m = models.create_model("inception_v4", 5)
    assert models.classifier_keys(m) == ["last_linear.weight", "last_linear.bias"]
    assert m.get_classifier().out_features == 5


def test_save_load_round_trip(demo_ws):
    m = models.create_model("resnet18", 3)
    hist = pd.DataFrame({"epoch": [1, 2], "valid_loss": [1.0, 0.5]})
    name = models.save_generation(demo_ws, m, INFO, hist)
    assert name == "gen-0001"
    folder = demo_ws.models / name
    assert sorted(p.name for p in folder.iterdir()) == ["history.csv", "model.json",
                                                         "weights.safetensors"]
    loaded, info = models.load_generation(demo_ws, name)
    assert info["classes"] == ["a", "b", "c"] and info["name"] == name
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # built on the meta device, then given the saved tensors
        assert torch.equal(loaded(x), m.eval()(x))
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    assert pd.read_csv(folder / "history.csv")["valid_loss"].tolist() == [1.0, 0.5]
    assert models.next_generation_name(demo_ws) == "gen-0002"


def test_load_refuses_weights_that_do_not_fit(demo_ws):
    name = models.save_generation(demo_ws, models.create_model("resnet18", 3), INFO)
    models.update_info(demo_ws, name, classes=["a", "b", "c", "d"])
    with pytest.raises(ZoolibError, match=r"weights.safetensors does not hold a resnet18 "
                                          r"with 4 classes"):
        models.load_generation(demo_ws, name)


def test_save_is_atomic_under_a_crash(demo_ws, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)  # the last file written
    with pytest.raises(RuntimeError, match="disk full"):
        models.save_generation(demo_ws, models.create_model("resnet18", 3), INFO, pd.DataFrame())
    assert list(demo_ws.models.iterdir()) == []
    assert models.generation_names(demo_ws) == []


def test_save_refuses_incomplete_info(demo_ws):
    with pytest.raises(ZoolibError, match="lacks.*classes"):
        models.save_generation(demo_ws, models.create_model("resnet18", 3),
                               {k: v for k, v in INFO.items() if k != "classes"})


def test_resolve_last_skips_throwaway_and_missing(demo_ws):
    with pytest.raises(ZoolibError, match="no generation yet"):
        models.resolve_generation(demo_ws, "last")
    m = models.create_model("resnet18", 3)
    models.save_generation(demo_ws, m, INFO)
    models.save_generation(demo_ws, m, {**INFO, "throwaway": True})
    assert models.resolve_generation(demo_ws, "last") == "gen-0001"
    assert models.resolve_generation(demo_ws, "last", include_throwaway=True) == "gen-0002"
    with pytest.raises(ZoolibError, match="'gen-0009' does not exist.*gen-0001, gen-0002"):
        models.resolve_generation(demo_ws, "gen-0009")


def test_deployed_refuses_throwaway(demo_ws):
    m = models.create_model("resnet18", 3)
    models.save_generation(demo_ws, m, INFO)
    models.save_generation(demo_ws, m, {**INFO, "throwaway": True})
    assert models.read_deployed(demo_ws) is None
    models.write_deployed(demo_ws, "gen-0001")
    assert json.loads(demo_ws.deployed_json.read_text())["generation"] == "gen-0001"
    with pytest.raises(ZoolibError, match="throw-away"):
        models.write_deployed(demo_ws, "gen-0002")
    assert models.read_deployed(demo_ws)["generation"] == "gen-0001"


def test_pretrained_models_take_their_timm_data_config():
    m = models.create_model("inception_v4", 3)  # random weights; the config is the same
    prep = models.preprocessing(m, pretrained=True)
    assert prep == {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                    "decode": "reduced"}
    scratch = models.preprocessing(m, pretrained=False)
    assert scratch["mean"] == list(models.IMAGENET_MEAN) and scratch["interpolation"] == "bilinear"


def test_a_killed_saves_temporary_folder_is_removed_by_the_next_save(demo_ws, monkeypatch,
                                                                     capsys):
    demo_ws.models.mkdir(exist_ok=True)
    seen = []
    real = models.save_file
    monkeypatch.setattr(models, "save_file", lambda state, path: (seen.append(path.parent),
                                                                  real(state, path)))
    m = models.create_model("resnet18", 3)
    models.save_generation(demo_ws, m, INFO)
    assert seen[0].name.startswith(f".gen-0001.{os.getpid()}-") and seen[0].name.endswith(".tmp")
    dead = demo_ws.models / f".gen-0002.{dead_pid()}-x1y2z3.tmp"  # as a killed save leaves it
    live = demo_ws.models / f".gen-0002.{os.getpid()}-a1b2c3.tmp"  # a save still going on
    old = demo_ws.models / ".gen-0002.k3j4h5g6"  # an older zoolib's, a day old
    recent = demo_ws.models / ".gen-0003.q1w2e3r4"  # an older zoolib's, maybe still at work
    for folder in (dead, live, old, recent):
        folder.mkdir()
        (folder / "weights.safetensors").write_bytes(b"half")
    os.utime(old, (time.time() - 86400,) * 2)
    capsys.readouterr()
    assert models.save_generation(demo_ws, m, INFO) == "gen-0002"
    said = capsys.readouterr().out
    assert dead.name in said and str(old) in said
    assert not dead.exists() and not old.exists() and live.exists() and recent.exists()
    assert models.generation_names(demo_ws) == ["gen-0001", "gen-0002"]


def test_only_dead_writers_temporaries_are_removed(tmp_path):
    dead, live = dead_pid(), os.getpid()
    names = [f".results.parquet.{dead}-140.tmp", f".results.parquet.{live}-140.tmp",
             f"results.parquet.{dead}-140.tmp", f".results.parquet.{dead}.tmp", "part-1.parquet"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    assert models.process_alive(live) and not models.process_alive(dead)
    assert models.remove_dead_temps(tmp_path) == [tmp_path / names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
    assert models.remove_dead_temps(tmp_path / "nowhere") == []


@pytest.mark.parametrize("garbage", [b"\x89PNG\r\n\x1a\n\x00\x00garbage", b"", b"[1, 2]"])
def test_damaged_side_files_of_a_generation_are_named(demo_ws, garbage):
    name = models.save_generation(demo_ws, models.create_model("resnet18", 3), INFO,
                                  splits=pd.DataFrame({"hash": ["a"], "path": ["x"],
                                                       "label": ["a"], "split": ["train"]}))
    folder = demo_ws.models / name
    (folder / "weights.safetensors").write_bytes(garbage)
    with pytest.raises(ZoolibError, match=r"gen-0001/weights.safetensors is unreadable .*"
                                          "restore gen-0001's folder from a backup"):
        models.load_generation(demo_ws, name)
    (folder / models.SPLITS_FILE).write_bytes(garbage)
    with pytest.raises(ZoolibError, match=r"splits.parquet is not a readable Parquet table.*"
                                          "restore it from a backup"):
        models.read_splits(demo_ws, name)
    (folder / "model.json").write_bytes(garbage)
    with pytest.raises(ZoolibError, match=r"gen-0001/model.json (is not valid JSON|holds a "
                                          r"JSON list).*restore the generation's folder"):
        models.read_info(demo_ws, name)
    demo_ws.deployed_json.write_bytes(garbage)
    with pytest.raises(ZoolibError, match=r"models/deployed.json .*delete it and deploy"):
        models.read_deployed(demo_ws)


@pytest.mark.parametrize("key,value,match", [
    ("img_size", 0, "'img_size' must be a whole number"),
    ("img_size", "32", "'img_size' must be a whole number"),
    ("decode", "fast", "'decode' must be one of full, reduced"),
    ("std", [0, 0, 0], "'std' must be three positive numbers"),
    ("mean", [0.5], "'mean' must be three numbers"),
    ("interpolation", "lanczos9", "'interpolation' must be one of"),
    ("classes", ["lion", "lion"], "'classes' must be a list of distinct class names"),
])
def test_a_hand_edited_model_json_is_refused_naming_the_key(trained_ws, key, value, match):
    """Every reader takes model.json from models.read_info: nonsense there is a clear
    error, not a ZeroDivisionError, NaN confidences or a whole inbox 'unreadable'."""
    import json

    path = trained_ws.models / "gen-0001" / "model.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(ZoolibError, match=match) as err:
        models.read_info(trained_ws, "gen-0001")
    assert str(path) in str(err.value)
