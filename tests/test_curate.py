import io
import random

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from zoolib import curate, journal, library, splits
from zoolib.images import content_hash, probe
from zoolib.workspace import ZoolibError


def _scan(ws):
    return library.scan(ws, progress=False)


# ---------------------------------------------------------------- existing checks

def test_unreadable_lists_broken_and_empty_with_reasons(demo_ws, truth):
    bad = curate.unreadable(_scan(demo_ws)).set_index("path")
    assert set(bad.index) == set(truth["unreadable"])
    assert bad.loc["penguin/penguin_empty.jpg", "error"].startswith("empty file")
    assert bad.loc["penguin/penguin_empty.jpg", "bytes"] == 0
    assert "Error" in bad.loc["zebra/zebra_broken.jpg", "error"]
    assert list(bad.columns) == ["label", "bytes", "error"]


def test_exact_duplicate_groups(demo_ws, truth):
    groups = curate.exact_duplicates(_scan(demo_ws))
    assert sorted(sorted(p) for p in groups["paths"]) == sorted(
        sorted(g) for g in truth["exact_duplicates"])
    cross = groups[groups["conflict"]]
    assert len(cross) == 1 and cross["labels"].item() == ["cheetah", "leopard"]


# ---------------------------------------------------------------- near duplicates

def _distinct_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Distinct textured scenes: random shapes in random colours."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (96, 96), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(img)
        for _ in range(12):
            x, y = rng.randrange(96), rng.randrange(96)
            w, h = rng.randrange(8, 50), rng.randrange(8, 50)
            fill = tuple(rng.randrange(256) for _ in range(3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)([x, y, x + w, y + h], fill=fill)
        out.append(img)
    return out


def _variants(img: Image.Image) -> dict[str, Image.Image]:
    w, h = img.size
    c = round(w * 0.02)  # 2 pixels a side of 96
    return {"resized": img.resize((w // 2, h // 2), Image.BILINEAR),
            "reencoded": img, "cropped": img.crop((c, c, w - c, h - c)),
            "brighter": ImageEnhance.Brightness(img).enhance(1.15)}


def _save(img, path, quality=90):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=quality)


def test_near_duplicate_recall_and_no_false_groups(demo_ws):
    lib = demo_ws.library
    originals = _distinct_images(40)
    for k, img in enumerate(originals):
        _save(img, lib / "lion" / f"scene_{k:02d}.jpg", quality=95)  # the best copy
        for name, var in _variants(img).items():
            _save(var, lib / "zebra" / f"scene_{k:02d}_{name}.jpg",
                  quality=35 if name == "reencoded" else 90)
    m = _scan(demo_ws)
    scenes = m[m["path"].str.contains("scene_")]
    groups = curate.near_duplicates(scenes)
    members = groups["paths"].explode()
    origin = members.str.extract(r"scene_(\d\d)")[0]
    # no false groups: every group holds variants of one scene only
    assert origin.groupby(level=0).nunique().eq(1).all()
    # recall: every variant is grouped with its original
    found = {p for p in members if "_" in p.split("scene_")[1][2:]}
    assert len(found) == 4 * len(originals)
    assert set(groups["keeper"]) == {f"lion/scene_{k:02d}.jpg" for k in range(40)}
    assert (groups["kind"] == "near").all() and groups["conflict"].all()


def test_demo_planted_near_duplicate_found(demo_ws, truth):
    m = _scan(demo_ws)
    pairs = curate.near_duplicate_pairs(m, max_distance=4)
    near = {(a, b) for a, b in zip(pairs["path_a"], pairs["path_b"])}
    assert tuple(sorted(truth["near_duplicates"][0])) in near
    groups = curate.near_duplicates(m, pairs)
    elephant = groups[groups["paths"].map(lambda p: "elephant/elephant_0007.jpg" in p)]
    assert elephant["keeper"].item() == "elephant/elephant_0007.jpg"  # 64 px beats 48 px
    exact = groups[groups["kind"] == "exact"]
    assert sorted(sorted(p) for p in exact["paths"]) == sorted(
        sorted(g) for g in truth["exact_duplicates"])


def test_hamming_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=300, dtype=np.int64).astype(np.uint64)
    flips = np.array([sum(1 << int(b) for b in rng.choice(64, k, replace=False))
                      for k in rng.integers(0, 14, size=300)], dtype=np.uint64)
    codes = np.concatenate([base, base ^ flips])
    for d in (0, 3, 7, 12):
        i, j, dist = curate.hamming_pairs(codes, d)
        full = np.bitwise_count(codes[:, None] ^ codes[None, :])
        bi, bj = np.nonzero(np.triu(full <= d, k=1))
        assert set(zip(i.tolist(), j.tolist())) == set(zip(bi.tolist(), bj.tolist()))
        assert (dist <= d).all() and len(i) >= (d > 0)
    with pytest.raises(ZoolibError, match="max_distance"):
        curate.hamming_pairs(codes, 16)


def test_phash_matches_imagehash_bits():
    import imagehash

    img = _distinct_images(1, seed=3)[0]
    buf = io.BytesIO()
    img.save(buf, "PNG")
    mine = probe(buf.getvalue())["phash"]
    assert len(mine) == 16
    assert imagehash.hex_to_hash(mine) - imagehash.phash(img) <= 4


# ---------------------------------------------------------------- leakage and pins

def _near_copy_in_other_split(ws, src: str) -> str:
    """Write re-encoded copies of `src` until one's content hash lands outside its split."""
    with Image.open(ws.library / src) as im:
        img = im.convert("RGB")
    home = splits.assign(pd.Series([_scan(ws).set_index("path").loc[src, "hash"]])).item()
    for quality in range(40, 96):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        if splits.assign(pd.Series([content_hash(buf.getvalue())])).item() not in (home,
                                                                                "benchmark"):
            dest = ws.library / src.replace(".jpg", "_copy_q.jpg")
            dest.write_bytes(buf.getvalue())
            return dest.relative_to(ws.library).as_posix()
    raise AssertionError("no quality put the copy in another split")


def test_leakage_across_splits_and_pin(demo_ws):
    m = _scan(demo_ws)
    split = curate.current_splits(demo_ws, m)
    a = split[split == "train"].index[0]
    b = _near_copy_in_other_split(demo_ws, a)
    m = _scan(demo_ws)
    pairs = curate.near_duplicate_pairs(m, max_distance=4)
    leaks = curate.leakage(demo_ws, m, pairs)
    assert (leaks["split_a"] != leaks["split_b"]).all()
    ours = leaks[(leaks["path_a"] == min(a, b)) & (leaks["path_b"] == max(a, b))]
    assert len(ours) == 1 and ours["train_leak"].item()
    other = curate.current_splits(demo_ws, m)[b]
    assert ours["suggested_pin"].item() == other
    event = curate.pin_leaking_groups(demo_ws, m, pairs)
    assert curate.leakage(demo_ws, m, pairs)["train_leak"].sum() == 0
    assert curate.current_splits(demo_ws, m)[a] == other
    curate.undo(demo_ws, event)
    assert len(curate.leakage(demo_ws, m, pairs)) == len(leaks)


def test_pin_moves_group_and_refuses_benchmark(demo_ws):
    m = _scan(demo_ws)
    split = curate.current_splits(demo_ws, m)
    train = list(split[split == "train"].index[:3])
    curate.pin(demo_ws, train, "test")
    after = curate.current_splits(demo_ws, m)
    assert (after.loc[train] == "test").all()
    flags = library.read_flags(demo_ws).set_index("path")
    assert (flags.loc[train, "pin"] == "test").all()
    with pytest.raises(ZoolibError, match="benchmark"):
        curate.pin(demo_ws, train, "benchmark")
    with pytest.raises(ZoolibError, match="nope.jpg"):
        curate.pin(demo_ws, ["lion/nope.jpg"], "test")
    curate.unpin(demo_ws, train)
    assert (curate.current_splits(demo_ws, m).loc[train] == "train").all()


# ---------------------------------------------------------------- discard

def test_discard_excludes_from_splits_without_deleting(demo_ws):
    m = _scan(demo_ws)
    classes = library.training_classes(m, 40)
    before = splits.split_manifest(demo_ws, m, classes)
    gone = ["lion/lion_0001.jpg", "zebra/zebra_0002.jpg"]
    event = curate.discard(demo_ws, gone, reason="subject too small to zoom")
    after = splits.split_manifest(demo_ws, m, classes)
    assert len(after) == len(before) - 2 and not after["path"].isin(gone).any()
    assert all((demo_ws.library / p).is_file() for p in gone)
    # everyone else keeps their split
    kept = before[~before["path"].isin(gone)].set_index("path")["split"]
    pd.testing.assert_series_equal(kept, after.set_index("path")["split"])
    row = journal.read(demo_ws).set_index("id").loc[event]
    assert row["action"] == "discard" and "too small" in row["details"]
    curate.undo(demo_ws, event)
    assert len(splits.split_manifest(demo_ws, m, classes)) == len(before)
    with pytest.raises(ZoolibError, match="already undone"):
        curate.undo(demo_ws, event)
    with pytest.raises(ZoolibError, match="reason"):
        curate.discard(demo_ws, gone, reason=" ")


# ---------------------------------------------------------------- provenance

def test_set_source_and_per_class_reliance(demo_ws, truth):
    m = _scan(demo_ws)
    table = curate.provenance(m).set_index("label")
    assert table["staged"].sum() == truth["meta"]["staged"]
    assert table["synthetic"].sum() == truth["meta"]["synthetic"]
    assert table.index[0] == "flamingo"  # mostly staged in the demo
    lions = ["lion/lion_0010.jpg", "lion/lion_0011.jpg"]
    event = curate.set_source(demo_ws, lions, "synthetic")
    m2 = _scan(demo_ws).set_index("path")
    assert (m2.loc[lions, "source"] == "synthetic").all()
    assert curate.provenance(m2.reset_index()).set_index("label").loc["lion", "synthetic"] == 2
    curate.undo(demo_ws, event)
    m3 = _scan(demo_ws)
    pd.testing.assert_frame_equal(m3, m)
    with pytest.raises(ZoolibError, match="'fake'"):
        curate.set_source(demo_ws, lions, "fake")


# ---------------------------------------------------------------- orientation

def test_rotation_round_trip_with_undo(demo_ws, truth):
    path = truth["rotated"][0]
    file = demo_ws.library / path
    original = file.read_bytes()
    with Image.open(file) as im:
        size, pixels = im.size, np.asarray(im.convert("L"), dtype=int)
    event = curate.rotate(demo_ws, path, 270)
    with Image.open(file) as im:
        turned = np.asarray(im.convert("L"), dtype=int)
    assert turned.shape == pixels.shape[::-1]
    assert np.abs(np.rot90(pixels, 1) - turned).mean() < 6  # 270 clockwise = 90 counter
    trashed = list(demo_ws.trash.rglob("*.jpg"))
    assert [p.read_bytes() for p in trashed] == [original]
    assert curate.history(demo_ws)["action"].iloc[0] == "rotate"
    curate.undo(demo_ws, event)
    assert file.read_bytes() == original
    assert len(list(demo_ws.trash.rglob("*.jpg"))) == 1  # the rotated copy, kept
    assert journal.read(demo_ws).set_index("id").loc[event, "undone"]
    with pytest.raises(ZoolibError, match="90, 180 or 270"):
        curate.rotate(demo_ws, path, 45)


def test_a_rotated_image_keeps_its_split_and_its_benchmark_place(demo_ws):
    m = _scan(demo_ws)
    classes = library.training_classes(m, 40)
    splits.freeze_benchmark(demo_ws, m, classes)
    before = splits.split_manifest(demo_ws, m, classes).set_index("path")["split"]
    bench = before[before == "benchmark"].index[:3].tolist()
    turned = bench + before[before != "benchmark"].index[:17].tolist()
    for path in turned:  # 20 rewrites, one of them twice
        curate.rotate(demo_ws, path, 90)
    curate.strip_orientation(demo_ws, turned[0])
    m2 = _scan(demo_ws)
    assert not set(m2.set_index("path").loc[turned, "hash"]) & set(m["hash"])  # new bytes
    after = splits.split_manifest(demo_ws, m2, classes).set_index("path")["split"]
    pd.testing.assert_series_equal(after.loc[before.index], before)
    assert set(bench) <= set(splits.benchmark_rows(demo_ws, m2)["path"])


def _exif_jpeg(path, size, orientation, shot):
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).rectangle([0, 0, size[0] // 3, size[1] // 3], fill="black")
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif.get_ifd(0x8769).update({0xA002: shot[0], 0xA003: shot[1]})
    img.save(path, "JPEG", exif=exif)


def test_exif_orientation_disagreement_flagged(demo_ws):
    lib = demo_ws.library / "lion"
    _exif_jpeg(lib / "turned_twice.jpg", (48, 64), 6, (64, 48))  # pixels already turned
    _exif_jpeg(lib / "camera_ok.jpg", (64, 48), 6, (64, 48))  # the tag is right
    m = _scan(demo_ws)
    flagged = curate.exif_disagreements(demo_ws, m)
    assert flagged["path"].tolist() == ["lion/turned_twice.jpg"]
    assert "already turned" in flagged["problem"].item()
    event = curate.strip_orientation(demo_ws, "lion/turned_twice.jpg")
    assert curate.exif_disagreements(demo_ws, _scan(demo_ws)).empty
    curate.undo(demo_ws, event)
    assert len(curate.exif_disagreements(demo_ws, _scan(demo_ws))) == 1


def test_widget_actions_are_journaled_and_undoable(demo_ws, truth):
    from zoolib.widgets import CurationWidget

    m = _scan(demo_ws)
    groups = curate.near_duplicates(m, curate.near_duplicate_pairs(m, 2))
    w = CurationWidget(demo_ws, {"near duplicates": groups, "unreadable": curate.unreadable(m)})
    assert len(w.grid.items) == len(w.current()) == min(groups["count"].iloc[0], 12)
    assert w.selected == w.current()[1:]  # non-keepers preselected
    w.reason.value = "blurred"
    discard = next(b for b in w.buttons if b.description == "discard")
    discard.click()
    flags = library.read_flags(demo_ws)
    assert set(flags.loc[flags["discard"], "path"]) == set(w.current()[1:])
    next(b for b in w.buttons if b.description == "undo last").click()
    assert not library.read_flags(demo_ws)["discard"].any()
    assert curate.history(demo_ws)["undone"].all()
    w.which.value = "unreadable"
    assert w.current() == [curate.unreadable(m)["path"].iloc[0]]
