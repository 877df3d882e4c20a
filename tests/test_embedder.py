"""The curation embedding (zoolib/embedder.py): which backbone, its cache, the choice remembered."""
import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg

from PIL import Image

from zoolib import embedder, library, workspace
from zoolib.workspace import ZoolibError

ARCH = "mobilenetv3_small_050"  # a small timm backbone: 224 px, fast on a CPU


def _weights(path, arch=ARCH, metadata=True, seed=0):
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in timm.create_model(arch).state_dict().items()}
    save_file(state, str(path), metadata={"arch": arch} if metadata else None)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return _weights(tmp_path_factory.mktemp("w") / "small.safetensors")


def _rows(ws, n=6):
    manifest = library.scan(ws, progress=False)
    return manifest[manifest["readable"]].drop_duplicates("hash").head(n).reset_index(drop=True)


def _library_digest(ws):
    return {p.relative_to(ws.library).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ws.library.rglob("*")) if p.is_file()}


def test_a_weights_file_names_its_architecture_or_is_given_one(weights, tmp_path):
    e = embedder.resolve(str(weights))
    assert (e.arch, e.weights) == (ARCH, str(weights.resolve()))
    data = resolve_data_config(pretrained_cfg=get_pretrained_cfg(ARCH).to_dict())
    assert e.info["img_size"] == data["input_size"][-1] == 224
    assert e.info["mean"] == pytest.approx(list(data["mean"]))
    assert e.info["interpolation"] == data["interpolation"]
    assert e.name == f"{ARCH}:small.safetensors"
    bare = _weights(tmp_path / "bare.safetensors", metadata=False)
    with pytest.raises(ZoolibError, match="does not say its architecture.*<timm architecture>:"):
        embedder.resolve(str(bare))
    assert embedder.resolve(f"{ARCH}:{bare}").arch == ARCH
    with pytest.raises(ZoolibError, match="missing.safetensors does not exist"):
        embedder.resolve(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ZoolibError, match="timm knows no pretrained weights"):
        embedder.resolve("resnet18.no_such_tag")


def test_a_file_that_does_not_fit_its_architecture_is_named(weights, demo_ws):
    e = embedder.resolve(f"resnet18:{weights}")
    rows = _rows(demo_ws, 2)
    with pytest.raises(ZoolibError, match="small.safetensors does not fit resnet18"):
        embedder.vectors(demo_ws, e.source, [demo_ws.library / p for p in rows["path"]],
                         rows["hash"], progress=False)


def test_the_cache_is_hit_invalidated_by_a_change_and_rebuilt_when_deleted(weights, demo_ws):
    before = _library_digest(demo_ws)
    rows = _rows(demo_ws)
    files = [demo_ws.library / p for p in rows["path"]]
    e = embedder.resolve(str(weights))
    first = embedder.EmbeddingCache(demo_ws, e)
    v1 = first.get(files, rows["hash"].tolist(), progress=False)
    assert first.computed == len(rows) and v1.shape == (len(rows), 2 * 288)  # means and maxima of its 288 channels
    assert np.allclose(np.linalg.norm(v1, axis=1), 1, atol=1e-2)
    again = embedder.EmbeddingCache(demo_ws, e)
    assert np.array_equal(again.get(files, rows["hash"].tolist(), progress=False), v1)
    assert again.computed == 0  # every vector read back, no forward pass
    # a changed image is another content hash: only it is embedded again
    changed = rows["hash"].tolist()
    changed[0] = "f" * 40
    third = embedder.EmbeddingCache(demo_ws, e)
    third.get(files, changed, progress=False)
    assert third.computed == 1
    # a damaged record (right length, wrong bytes) is computed again, never used
    record = third.entries().path(rows["hash"][1])
    raw = bytearray(record.read_bytes())
    raw[-1] ^= 0xFF
    record.write_bytes(bytes(raw))
    fourth = embedder.EmbeddingCache(demo_ws, e)
    # alone in its batch, BLAS may round its last float16 bit otherwise
    assert np.allclose(fourth.get(files, rows["hash"].tolist(), progress=False), v1, atol=2e-3)
    assert fourth.computed == 1
    shutil.rmtree(demo_ws.cache / "embeddings")
    rebuilt = embedder.EmbeddingCache(demo_ws, e)
    assert np.allclose(rebuilt.get(files, rows["hash"].tolist(), progress=False), v1, atol=2e-3)
    assert rebuilt.computed == len(rows)
    assert _library_digest(demo_ws) == before  # the library is only read


def test_other_weights_are_another_cache(weights, demo_ws, tmp_path):
    rows = _rows(demo_ws, 3)
    files = [demo_ws.library / p for p in rows["path"]]
    other = _weights(tmp_path / "other.safetensors", seed=1)
    a = embedder.vectors(demo_ws, str(weights), files, rows["hash"], progress=False)
    b = embedder.vectors(demo_ws, str(other), files, rows["hash"], progress=False)
    assert not np.allclose(a, b)
    assert len(list((demo_ws.cache / "embeddings").iterdir())) == 2


def test_the_workspace_remembers_the_last_embedder(weights, demo_ws):
    assert embedder.choose(demo_ws, "") == embedder.MODEL  # nothing configured yet
    assert embedder.choose(demo_ws, str(weights)) == str(weights)
    assert embedder.choose(demo_ws, None) == str(weights)
    assert json.loads(demo_ws.settings.read_text())["embedder"] == str(weights)
    assert embedder.choose(demo_ws, "model") == "model"
    assert embedder.choose(demo_ws, "") == "model"
    demo_ws.settings.write_text("[1, 2]")
    with pytest.raises(ZoolibError, match="settings.json is not a JSON object"):
        embedder.choose(demo_ws, "")


def test_model_without_a_generation_says_how_to_configure_a_backbone(demo_ws):
    with pytest.raises(ZoolibError, match="needs a trained generation.*EMBEDDER.*tf_efficientnet_lite0"):
        embedder.library_vectors(demo_ws, "model", _rows(demo_ws, 2))


def test_a_hub_name_asks_timm_for_those_weights(monkeypatch, demo_ws):
    asked = []

    def fake_load(model, pretrained_cfg=None, **kwargs):
        asked.append(pretrained_cfg["architecture"] + "." + pretrained_cfg["tag"])

    monkeypatch.setattr(timm.models._builder, "load_pretrained", fake_load)
    rows = _rows(demo_ws, 2)
    name = f"{ARCH}.{get_pretrained_cfg(ARCH).tag}"
    out = embedder.vectors(demo_ws, ARCH, [demo_ws.library / p for p in rows["path"]],
                           rows["hash"], progress=False)
    assert asked == [name] and out.shape[0] == 2
    assert embedder.resolve(ARCH).name == name


# --------------------------------------------------------------------------- cleaning with it

def test_the_probe_predicts_each_image_with_a_fit_that_held_it_out(weights, demo_ws):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from zoolib import cleaning, probe
    from zoolib.train import TrainConfig

    value = str(weights)
    oof = cleaning.predictions(demo_ws, TrainConfig(), "auto", value, folds=3, progress=False)
    rows, classes = probe.rows_to_clean(demo_ws, None)
    assert oof["path"].tolist() == rows["path"].tolist() and oof.attrs["classes"] == classes
    assert oof.attrs["predicted_by"] == f"linear probe on {ARCH}:small.safetensors"
    probs = np.stack(oof["probs"])
    assert np.allclose(probs.sum(axis=1), 1) and set(oof["fold"]) == {0, 1, 2}
    # fold 1's rows by hand: a probe fitted on the other folds only
    x = embedder.library_vectors(demo_ws, value, rows, progress=False)
    y = rows["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    fit, held = list(StratifiedKFold(3, shuffle=True, random_state=0).split(x, y))[1]
    by_hand = make_pipeline(StandardScaler(), LogisticRegression(C=probe.C, max_iter=2000))
    assert np.allclose(probs[held], by_hand.fit(x[fit], y[fit]).predict_proba(x[held]), atol=1e-6)
    assert (oof["fold"].to_numpy()[held] == 1).all()
    stored = cleaning.load_oof(demo_ws)
    assert stored.attrs["predicted_by"] == oof.attrs["predicted_by"]
    assert np.allclose(np.stack(stored["probs"]), probs, atol=1e-6)
    issues = cleaning.label_issues(demo_ws, stored)
    assert (issues["predicted_by"] == oof.attrs["predicted_by"]).all()


def test_probe_and_both_need_a_pretrained_embedder(demo_ws):
    from zoolib import cleaning
    from zoolib.train import TrainConfig

    for source in ("probe", "both"):
        with pytest.raises(ZoolibError, match=f"OOF_FROM='{source}' needs a pretrained EMBEDDER"):
            cleaning.predictions(demo_ws, TrainConfig(), source, "model")
    with pytest.raises(ZoolibError, match="OOF_FROM must be one of auto, folds, probe, both"):
        cleaning.predictions(demo_ws, TrainConfig(), "fold", "model")


def test_combined_predictions_are_the_mean_of_both(demo_ws):
    from zoolib import cleaning

    def table(probs, by):
        t = pd.DataFrame({"path": ["a.jpg", "b.jpg", "c.jpg"][:len(probs)], "hash": "h",
                          "label": "x", "split": "train", "fold": 0, "generation": by,
                          "probs": [np.array(p) for p in probs]})
        t.attrs.update(classes=["x", "y"], generations=[by], predicted_by=by)
        return t

    both = cleaning.combine_oof(demo_ws, table([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], "folds"),
                                table([[0.5, 0.5], [0.6, 0.4]], "probe"))
    assert both["path"].tolist() == ["a.jpg", "b.jpg"]
    assert np.allclose(np.stack(both["probs"]), [[0.7, 0.3], [0.4, 0.6]])
    assert both.attrs["predicted_by"] == "folds + probe" and both["pred"].tolist() == ["x", "y"]
    # each source's own, for the consensus of label_issues, kept in the stored table too
    for frame in (both, cleaning.load_oof(demo_ws)):
        assert np.allclose(np.stack(frame["probs_a"]), [[0.9, 0.1], [0.2, 0.8]])
        assert np.allclose(np.stack(frame["probs_b"]), [[0.5, 0.5], [0.6, 0.4]])
    wrong = table([[0.5, 0.5]], "probe")
    wrong.attrs["classes"] = ["x", "z"]
    with pytest.raises(ZoolibError, match="cannot combine"):
        cleaning.combine_oof(demo_ws, table([[0.5, 0.5]], "folds"), wrong)


def test_least_like_their_class_and_the_map_say_which_embedder(weights, demo_ws):
    from zoolib import cleaning

    value = str(weights)
    ood = cleaning.out_of_distribution(demo_ws, k=5, progress=False, embedder=value)
    assert len(ood) and (ood["embedder"] == f"{ARCH}:small.safetensors").all()
    assert ood["ood_score"].notna().any()
    points = cleaning.map_frame(demo_ws, embedder=value, progress=False)
    assert points.attrs["embedder"] == f"{ARCH}:small.safetensors"
    assert points["x"].notna().all() and len(points) == len(ood)


# --------------------------------------------------------------------------- bulk identification

def test_bulk_identification_scores_junk_and_neighbours_in_the_embedders_space(weights,
                                                                              trained_ws):
    from zoolib import bulkid, neighbours, probe
    from zoolib.bulkid import embedded
    from zoolib.heads import unit

    value = str(weights)
    results = bulkid.run(trained_ws, "gen-0001", name="emb", embedder=value, progress=False)
    run = json.loads((trained_ws.bulkid / "emb" / "run.json").read_text())
    assert run["embedder"] == f"{ARCH}:small.safetensors"
    ok = results[results["error"] == ""].reset_index(drop=True)
    found = embedder.vectors(trained_ws, value, ok["path"], ok["hash"], progress=False)
    widths = {len(v) for v in ok["embedding"]}
    assert widths == {found.shape[1]} == {576}  # the backbone's vectors, not the model's
    assert np.allclose(np.stack(ok["embedding"]).astype(np.float32), found, atol=1e-3)
    # knn: the distance to the K-th nearest library image in the backbone's space
    rows, _ = probe.rows_to_clean(trained_ws, "gen-0001")
    ref = unit(torch.from_numpy(embedder.vectors(
        trained_ws, value, [trained_ws.library / p for p in rows["path"]], rows["hash"],
        progress=False)))
    expected = neighbours.kth_distance(ref, torch.from_numpy(found), embedded.K).numpy()
    assert np.allclose(ok["knn"].to_numpy(), expected, atol=1e-5)
    assert np.allclose(embedded.reference(trained_ws, "gen-0001", value, progress=False).numpy(),
                       ref.numpy())
    assert len(ref) > len(neighbours.train_rows(trained_ws, "gen-0001", run["classes"]))
    # the model's own run is another space, and a run is never resumed with another embedder
    own = bulkid.run(trained_ws, "gen-0001", name="own", progress=False)
    assert not np.allclose(own.sort_values("path")["knn"].to_numpy(),
                           results.sort_values("path")["knn"].to_numpy(), equal_nan=True)
    with pytest.raises(ZoolibError, match="made with embedder 'model'"):
        bulkid.run(trained_ws, "gen-0001", name="own", embedder=value, progress=False)
    worst = bulkid.lowest_scores(results, n=3, by="knn")
    assert worst["knn"].tolist() == sorted(results["knn"].dropna(), reverse=True)[:3]


def test_bulk_identification_without_knn_still_fills_the_embedders_vectors(weights, trained_ws):
    from zoolib import bulkid

    results = bulkid.run(trained_ws, "gen-0001", name="no-knn", embedder=str(weights),
                         knn=False, progress=False)
    ok = results[results["error"] == ""]
    assert len(ok) and ok["knn"].isna().all()
    assert {len(v) for v in ok["embedding"]} == {576}  # the backbone's vectors


def test_the_speed_benchmark_times_the_bare_pass_and_both_cached_passes(weights, demo_ws, tmp_path):
    from .test_replicate import _script

    parts = _script("embedding_parts")
    files = sorted(demo_ws.library.rglob("*.jpg"))[:10]
    found = parts.speed(demo_ws, str(weights), files)
    assert found["images"] == 10 and found["recomputed_on_second"] == 0
    assert found["bare_per_s"] > 0 and found["cached_second_per_s"] > found["cached_first_per_s"]
    assert found["first_over_bare"] == pytest.approx(
        found["cached_first_per_s"] / found["bare_per_s"], rel=0.02)


def test_small_images_are_embedded_at_a_smaller_size_and_say_so(weights, tmp_path):
    assert [embedder.input_size(224, s) for s in (None, 400, 45, 32, 10)] == [224, 224, 224, 160, 96]
    ws = workspace.create(tmp_path / "ws")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (ws.library / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(ws.library / cls / f"{i}.png")
    rows = _rows(ws)
    assert embedder.typical_side(ws) == 32
    e = embedder.for_workspace(ws, str(weights))
    assert e.info["img_size"] == 160 and e.name.endswith("small.safetensors@160")
    embedder.vectors(ws, str(weights), [ws.library / p for p in rows["path"]], rows["hash"],
                     progress=False)
    assert [p.name for p in (ws.cache / "embeddings").iterdir()][0].endswith("-160-v2")
    assert embedder.display_name(str(weights), ws) == e.name
    assert embedder.resolve(str(weights)).name == f"{ARCH}:small.safetensors"  # its own size
