import random

import pandas as pd
import pytest
from PIL import Image

from zoolib import curate, library, splits
from zoolib.workspace import ZoolibError


def _hashes(n, seed=0):
    rng = random.Random(seed)
    return pd.Series([f"{rng.getrandbits(128):032x}" for _ in range(n)])


def test_assign_fractions_roughly_right():
    s = splits.assign(_hashes(20000))
    share = s.value_counts(normalize=True)
    for name, frac in splits.DEFAULT_FRACTIONS.items():
        assert abs(share[name] - frac) < 0.015


def test_assign_is_pure_function_of_hash():
    h = _hashes(500)
    a = splits.assign(h)
    b = splits.assign(h.sample(frac=1, random_state=1)).sort_index()
    assert a.equals(b)


def test_bad_fractions():
    with pytest.raises(ZoolibError, match="add up to 1"):
        splits.assign(_hashes(3), {"train": .5, "valid": .1, "test": .1, "benchmark": .1})
    with pytest.raises(ZoolibError, match="non-negative"):
        splits.assign(_hashes(3), {"train": 1.0})


def _add_images(folder, n, seed):
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        colour = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", (16, 16), colour).save(folder / f"added_{seed}_{i}.png")


def test_adding_100_images_moves_no_old_image(demo_ws):
    classes = ["lion", "zebra", "elephant"]
    splits.freeze_benchmark(demo_ws, library.scan(demo_ws, progress=False), classes)
    before = splits.split_manifest(demo_ws, library.scan(demo_ws, progress=False), classes)
    for k, cls in enumerate(classes):
        _add_images(demo_ws.library / cls, 34 if k else 32, seed=k)
    after = splits.split_manifest(demo_ws, library.scan(demo_ws, progress=False), classes)
    assert len(after) == len(before) + 100
    merged = before.merge(after, on="path", suffixes=("_old", "_new"))
    assert len(merged) == len(before)
    assert (merged["split_old"] == merged["split_new"]).all()
    assert set(after["split"]) == {"train", "valid", "test", "benchmark"}


def test_duplicates_share_a_split(demo_ws):
    m = library.scan(demo_ws, progress=False)
    data = splits.split_manifest(demo_ws, m, sorted(set(m["label"])))
    per_hash = data.groupby("hash")["split"].nunique()
    assert per_hash.max() == 1
    assert (data.groupby("hash").size() > 1).sum() >= 1  # the demo's same-class copy


def test_a_content_filed_under_two_classes_is_left_out(demo_ws):
    m = library.scan(demo_ws, progress=False)
    classes = sorted(set(m["label"]) - {"Unknown"})
    both = {"cheetah/cheetah_0005.jpg", "leopard/cheetah_0005.jpg"}  # the demo's planted pair
    conflicts = splits.conflicting_labels(demo_ws, m, classes)
    assert set(conflicts["path"]) == both and conflicts["hash"].nunique() == 1
    rows = splits.split_manifest(demo_ws, m, classes)
    assert not set(rows["path"]) & both
    assert "lion/lion_0003_copy.jpg" in set(rows["path"])  # a same-class copy stays
    # one copy left out of the class list: no conflict, the other copy trains
    rows = splits.split_manifest(demo_ws, m, [c for c in classes if c != "leopard"])
    assert "cheetah/cheetah_0005.jpg" in set(rows["path"])


def test_benchmark_frozen_and_extended_only_for_new_classes(demo_ws):
    m = library.scan(demo_ws, progress=False)
    assert splits.read_benchmark(demo_ws).empty and not demo_ws.benchmark_csv.exists()
    first = splits.freeze_benchmark(demo_ws, m, ["lion", "zebra"])
    assert demo_ws.benchmark_csv.exists() and set(first["label"]) == {"lion", "zebra"}
    # new lion images that fall in the benchmark bucket do not join the frozen set
    _add_images(demo_ws.library / "lion", 60, seed=9)
    _add_images(demo_ws.library / "newcls", 50, seed=10)
    m2 = library.scan(demo_ws, progress=False)
    second = splits.freeze_benchmark(demo_ws, m2, ["lion", "zebra", "newcls"])
    old = second[second["label"] != "newcls"].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, first.astype(old.dtypes.to_dict()))
    assert (second["label"] == "newcls").sum() > 0
    data = splits.split_manifest(demo_ws, m2, ["lion", "newcls"])
    late = data[(data["label"] == "lion") & data["path"].str.contains("added_9")]
    assert "benchmark" not in set(late["split"])
    assert set(data.loc[data["split"] == "benchmark", "hash"]) <= set(second["hash"])


def test_reading_splits_freezes_nothing_and_discards_are_honoured(demo_ws):
    m = library.scan(demo_ws, progress=False)
    classes = sorted(set(m["label"]) - {"Unknown"})
    data = splits.split_manifest(demo_ws, m, classes)  # what 01_curate does
    assert not demo_ws.benchmark_csv.exists() and "benchmark" not in set(data["split"])
    bucket = data[splits.assign(data["hash"]) == "benchmark"]
    assert set(data.loc[bucket.index, "split"]) == {"test"}  # until the class is frozen
    gone = bucket["path"].iloc[0]
    curate.discard(demo_ws, [gone], "blurred")
    frozen = splits.freeze_benchmark(demo_ws, m, classes)
    assert gone not in set(frozen["path"])
    assert set(bucket.loc[bucket["path"] != gone, "hash"]) <= set(frozen["hash"])


def test_a_throwaway_run_does_not_freeze_its_extra_class(demo_ws):
    from zoolib.loaders import prepare_data
    from zoolib.train import TrainConfig

    cfg = TrainConfig(min_images=35, throwaway=True, arch="zoo_cnn_small", img_size=32)
    data, classes = prepare_data(demo_ws, cfg, progress=False)
    assert "okapi" in classes and not demo_ws.benchmark_csv.exists()
    data, classes = prepare_data(demo_ws, TrainConfig(min_images=40), progress=False)
    frozen = splits.read_benchmark(demo_ws)
    assert "okapi" not in set(frozen["label"]) and set(frozen["label"]) <= set(classes)
    assert set(data.loc[data["split"] == "benchmark", "hash"]) == set(frozen["hash"])


def test_a_new_workspace_can_fix_its_split_shares_once(demo_ws):
    shares = {"train": 0.9, "valid": 0.1, "test": 0.0, "benchmark": 0.0}
    splits.set_fractions(demo_ws, shares)
    assert splits.workspace_fractions(demo_ws) == shares
    manifest = library.scan(demo_ws, progress=False)
    data = splits.split_manifest(demo_ws, manifest, sorted(set(manifest["label"])))
    assert set(data["split"]) == {"train", "valid"}
    assert 0.8 < (data["split"] == "train").mean() < 0.97
    assert not demo_ws.benchmark_csv.exists()  # nothing to draw


def test_split_shares_cannot_change_once_in_use(demo_ws):
    manifest = library.scan(demo_ws, progress=False)
    splits.freeze_benchmark(demo_ws, manifest, ["lion"])  # the benchmark is drawn
    with pytest.raises(ZoolibError, match="can no longer change"):
        splits.set_fractions(demo_ws, {"train": 0.9, "valid": 0.1, "test": 0.0, "benchmark": 0.0})
    with pytest.raises(ZoolibError, match="add up to 1"):
        splits.set_fractions(demo_ws, {"train": 0.5, "valid": 0.1, "test": 0.0, "benchmark": 0.0})


GARBAGE = {
    "binary": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe garbage",
    "empty": b"",
    "other table": b"name,size\nlion.jpg,12\n",
    "bad hashes": b"hash,path,label,added\nnot-a-hash,lion/a.jpg,lion,2026\n",
}


@pytest.mark.parametrize("kind", GARBAGE)
def test_a_damaged_benchmark_is_named_with_what_to_do(demo_ws, kind):
    """Garbage in splits/benchmark.csv used to surface as KeyError: 'label'."""
    m = library.scan(demo_ws, progress=False)
    demo_ws.splits.mkdir(parents=True, exist_ok=True)
    demo_ws.benchmark_csv.write_bytes(GARBAGE[kind])
    pattern = (r"splits/benchmark.csv (is not a readable CSV|lacks the column|has 1 row).*"
               r"restore it from a backup.*Deleting it freezes the benchmark again")
    with pytest.raises(ZoolibError, match=pattern):
        splits.read_benchmark(demo_ws)
    with pytest.raises(ZoolibError, match=pattern):  # what training and curation call
        splits.split_manifest(demo_ws, m, ["lion", "zebra"])
    with pytest.raises(ZoolibError, match=pattern):
        splits.freeze_benchmark(demo_ws, m, ["lion", "zebra"])
    assert demo_ws.benchmark_csv.read_bytes() == GARBAGE[kind]  # left for the user to restore


@pytest.mark.parametrize("kind", GARBAGE)
def test_damaged_origins_and_shares_are_named_with_what_to_do(demo_ws, kind):
    demo_ws.splits.mkdir(parents=True, exist_ok=True)
    (demo_ws.splits / "origins.csv").write_bytes(GARBAGE[kind])
    with pytest.raises(ZoolibError, match=r"splits/origins.csv .*Deleting it makes each "
                                          "rotated or rewritten image"):
        splits.split_key(demo_ws, pd.Series(["0" * 32]))
    with pytest.raises(ZoolibError, match="splits/origins.csv"):
        splits.record_rewrite(demo_ws, "0" * 32, "1" * 32, "lion/a.jpg")
    (demo_ws.splits / "fractions.json").write_bytes(GARBAGE[kind])
    with pytest.raises(ZoolibError, match=r"splits/fractions.json does not hold split shares "
                                          r".*Deleting it falls back to the default shares"):
        splits.workspace_fractions(demo_ws)
    for valid_json in ('{"train": 0.9}', '["train"]',
                       '{"train": "a", "valid": "b", "test": "c", "benchmark": "d"}'):
        (demo_ws.splits / "fractions.json").write_text(valid_json)
        with pytest.raises(ZoolibError, match="fractions.json does not hold split shares"):
            splits.workspace_fractions(demo_ws)
