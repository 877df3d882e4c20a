import shutil

import pandas as pd
import pytest
from PIL import Image

from zoolib import curate, library
from zoolib.workspace import ZoolibError


def test_scan_columns_and_counts(demo_ws, truth):
    m = library.scan(demo_ws, progress=False)
    assert set(library.MANIFEST_COLUMNS) <= set(m.columns)
    n_files = sum(1 for p in demo_ws.library.rglob("*") if p.is_file()) - 1  # minus _meta.csv
    assert len(m) == n_files
    bad = set(m.loc[~m["readable"], "path"])
    assert bad == set(truth["unreadable"])
    assert m.loc[m["path"] == "penguin/penguin_empty.jpg", "error"].item().startswith("empty")
    ok = m[m["readable"]]
    assert (ok["width"] > 0).all() and (ok["format"] == "JPEG").all()
    assert m["hash"].str.len().eq(32).all()


def test_meta_sources_joined(demo_ws, truth):
    m = library.scan(demo_ws, progress=False)
    assert (m["source"] == "staged").sum() == truth["meta"]["staged"]
    assert (m["source"] == "synthetic").sum() == truth["meta"]["synthetic"]
    assert set(m["source"]) == {"real", "staged", "synthetic"}


def test_bad_meta_source_names_row(demo_ws):
    demo_ws.meta_csv.write_text("path,source,notes\nlion/lion_0000.jpg,fake,\n")
    with pytest.raises(ZoolibError, match="'fake'.*lion_0000"):
        library.scan(demo_ws, progress=False)


def test_incremental_scan_opens_only_new_files(demo_ws, monkeypatch):
    first = library.scan(demo_ws, progress=False)
    opened = []
    real = library._read_file
    monkeypatch.setattr(library, "_read_file", lambda p: opened.append(p) or real(p))
    again = library.scan(demo_ws, progress=False)
    assert opened == []
    pd.testing.assert_frame_equal(first, again)
    new = demo_ws.library / "lion" / "new_one.png"
    Image.new("RGB", (20, 10), "red").save(new)
    changed = demo_ws.library / "zebra" / "zebra_0001.jpg"
    Image.new("RGB", (30, 30), "blue").save(changed, "JPEG")
    third = library.scan(demo_ws, progress=False)
    assert sorted(p.name for p in opened) == ["new_one.png", "zebra_0001.jpg"]
    row = third.set_index("path").loc["lion/new_one.png"]
    assert (row["width"], row["height"], row["format"], row["label"]) == (20, 10, "PNG", "lion")
    assert third.set_index("path").loc["zebra/zebra_0001.jpg", "width"] == 30
    assert len(third) == len(first) + 1


def test_removed_file_leaves_manifest(demo_ws):
    library.scan(demo_ws, progress=False)
    (demo_ws.library / "lion" / "lion_0000.jpg").unlink()
    m = library.scan(demo_ws, progress=False)
    assert "lion/lion_0000.jpg" not in set(m["path"])


def test_cutoff_table(demo_ws, truth):
    m = library.scan(demo_ws, progress=False)
    t = library.cutoff_table(m, 40).set_index("label")
    assert t.loc["okapi", "readable"] == truth["counts"]["okapi"] == 37
    assert not t.loc["okapi", "included"] and t.loc["okapi", "short_by"] == 3
    assert t.loc["okapi", "reason"] == "below cutoff"
    assert not t.loc["Unknown", "included"] and "reserved" in t.loc["Unknown", "reason"]
    # the zebra folder holds one broken file that must not count
    assert t.loc["zebra", "files"] == t.loc["zebra", "readable"] + 1
    assert t.loc["zebra", "included"] and t.loc["zebra", "short_by"] == 0
    t35 = library.cutoff_table(m, 35).set_index("label")
    assert t35.loc["okapi", "included"]
    assert library.training_classes(m, 40) == sorted(
        c for c, n in truth["counts"].items() if n >= 40)
    assert "okapi" in library.training_classes(m, 35)


def test_cutoff_counts_unique_readable_non_discarded_images(demo_ws):
    okapi = sorted((demo_ws.library / "okapi").glob("*.jpg"))
    for k in range(3):  # 37 + 3 copies: 40 files, still 37 contents
        shutil.copyfile(okapi[k], okapi[k].with_name(f"copy_{k}.jpg"))
    m = library.scan(demo_ws, progress=False)
    t = library.cutoff_table(m, 40).set_index("label")
    assert t.loc["okapi", "readable"] == 40 and t.loc["okapi", "eligible"] == 37
    assert not t.loc["okapi", "included"] and t.loc["okapi", "short_by"] == 3
    assert "okapi" not in library.training_classes(m, 40)
    penguin = sorted(m.loc[(m["label"] == "penguin") & m["readable"], "path"])[:20]
    curate.discard(demo_ws, penguin, "too blurry")
    gone = library.discarded_paths(demo_ws)
    assert gone == set(penguin)
    t = library.cutoff_table(m, 40, gone).set_index("label")
    assert t.loc["penguin", "eligible"] == t.loc["penguin", "unique"] - 20
    assert "penguin" not in library.training_classes(m, 40, gone)
    assert "penguin" in library.training_classes(m, 40)


def test_cutoff_rejects_nonsense(demo_ws):
    m = library.scan(demo_ws, progress=False)
    with pytest.raises(ZoolibError, match="MIN_IMAGES"):
        library.cutoff_table(m, 0)
    with pytest.raises(ZoolibError, match="no class has at least 1000"):
        library.training_classes(m, 1000)


def test_class_with_no_readable_image_is_named(demo_ws):
    folder = demo_ws.library / "ghost"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"garbage")
    (folder / "b.jpg").write_bytes(b"")
    m = library.scan(demo_ws, progress=False)
    with pytest.raises(ZoolibError, match="'ghost' \\(2 files\\)"):
        library.training_classes(m, 40)


def test_duplicate_counts(demo_ws):
    m = library.scan(demo_ws, progress=False)
    t = library.class_counts(m).set_index("label")
    assert t.loc["lion", "readable"] == t.loc["lion", "unique"] + 1


def _bad_files(ws):
    """An unreadable file of each kind beside the demo's: truncated, garbage, a link."""
    good = (ws.library / "lion" / "lion_0002.jpg").read_bytes()
    (ws.library / "lion" / "cut_short.jpg").write_bytes(good[: len(good) // 2])
    (ws.library / "zebra" / "not_an_image.png").write_bytes(b"\x89PNG but not really")
    (ws.library / "zebra" / "linked.jpg").symlink_to(ws.library / "lion" / "lion_0002.jpg")
    return ["lion/cut_short.jpg", "zebra/not_an_image.png", "zebra/linked.jpg"]


class _CountingPool:
    """A stand-in process pool, run in this process: counts results not yet collected."""

    def __init__(self):
        self.open = self.most = self.tasks = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        self.open, self.tasks = self.open + 1, self.tasks + 1
        self.most = max(self.most, self.open)
        pool = self

        class Pending:
            def result(self):
                pool.open -= 1
                return fn(*args)
        return Pending()


def test_parallel_scan_gives_the_serial_rows_including_unreadable_files(demo_ws, truth,
                                                                        monkeypatch):
    bad = _bad_files(demo_ws)
    pooled = []
    real = library._describe_all
    monkeypatch.setattr(library, "_describe_all", lambda *a: pooled.append(a[2]) or real(*a))
    monkeypatch.setattr(library, "POOL_MIN_FILES", 1)  # the demo is far below the threshold
    serial = library.scan(demo_ws, progress=False, workers=1)
    library._cache_path(demo_ws).unlink()
    parallel = library.scan(demo_ws, progress=False, workers=2)
    assert pooled == [2]  # only the second scan used a pool, of two processes
    pd.testing.assert_frame_equal(serial, parallel)
    rows = parallel.set_index("path").loc[bad + truth["unreadable"]]
    assert not rows["readable"].any() and rows["error"].str.len().gt(0).all()
    assert rows.loc["zebra/linked.jpg", "error"].startswith("symbolic link")
    assert rows.loc["lion/cut_short.jpg", "error"] == serial.set_index("path").loc[
        "lion/cut_short.jpg", "error"]


def test_parallel_scan_keeps_a_bounded_number_of_chunks_in_flight(demo_ws, monkeypatch):
    serial = library.scan(demo_ws, progress=False, workers=1)
    library._cache_path(demo_ws).unlink()
    pool = _CountingPool()
    monkeypatch.setattr(library, "_pool", lambda workers: pool)
    monkeypatch.setattr(library, "CHUNK", 10)
    monkeypatch.setattr(library, "POOL_MIN_FILES", 1)
    pd.testing.assert_frame_equal(library.scan(demo_ws, progress=False, workers=3), serial)
    assert pool.tasks == -(-len(serial) // 10)  # every file went out, in chunks of 10
    assert pool.most == library.IN_FLIGHT * 3  # never more waiting than that, of 42 chunks


def test_small_libraries_are_scanned_without_a_pool(demo_ws, monkeypatch):
    monkeypatch.setattr(library, "_pool", lambda workers: pytest.fail("pool started"))
    assert len(library.scan(demo_ws, progress=False, workers=8)) > 0
    with pytest.raises(ZoolibError, match="workers must be at least 1"):
        library.scan(demo_ws, progress=False, workers=0)


def test_a_worker_that_dies_is_a_message_naming_the_fix(demo_ws, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    class Dead(_CountingPool):
        def submit(self, fn, *args):
            raise BrokenProcessPool("a process terminated abruptly")

    monkeypatch.setattr(library, "_pool", lambda workers: Dead())
    monkeypatch.setattr(library, "POOL_MIN_FILES", 1)
    with pytest.raises(ZoolibError, match="__name__ == \"__main__\".*workers=1"):
        library.scan(demo_ws, progress=False, workers=2)


def test_a_read_only_workspace_scans_with_a_warning(demo_ws, monkeypatch):
    import errno

    first = library.scan(demo_ws, progress=False)

    def refuse(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(library, "write_atomic", refuse)
    (demo_ws.root / ".zoolib" / "manifest.parquet").unlink()  # nothing cached to reuse
    with pytest.warns(UserWarning, match="scan cache .* was not saved"):
        again = library.scan(demo_ws, progress=False)
    pd.testing.assert_frame_equal(again, first)
