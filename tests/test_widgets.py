"""The bulk-identification widget without a browser: its pure functions, and the
widget driven through its controls (values set, buttons clicked) as a user would."""
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from zoolib import actions, bulkid, journal, library, widgets
from zoolib.widgets import ANY_CLASS, BulkView, ViewState
from zoolib.widgets.bulk import STATUS_NAMES

from .test_actions import fake_results


@pytest.fixture
def results(demo_ws):
    return fake_results(demo_ws)


@pytest.fixture
def manifest(demo_ws):
    return library.scan(demo_ws, progress=False)


@pytest.fixture
def masks(results, manifest):
    return widgets.filter_sets(results, manifest, max_count=49,
                               min_share=0.4, lookalike_class="leopard", max_confidence=0.8,
                               lowest_n=10)


def _status(results, value=""):
    return pd.Series([value] * len(results))


def test_filter_sets_are_aligned_masks(results, masks, manifest):
    ok = results["error"] == ""
    assert list(masks) == ["all", "low_count", "synthetic_reliant", "lookalikes", "lowest",
                           "unreadable"]
    assert all(len(m) == len(results) and m.dtype == bool for m in masks.values())
    assert masks["all"].equals(ok) and masks["unreadable"].sum() == 2
    # penguin (48 readable) is the only predicted class with at most 49 library images
    assert set(results.loc[masks["low_count"], "pred"]) == {"penguin"}
    assert masks["low_count"].sum() == (results["pred"] == "penguin").sum()
    counts = library.class_counts(manifest).set_index("label")
    share = (counts["staged"] + counts["synthetic"]) / counts["readable"]
    assert set(results.loc[masks["synthetic_reliant"], "pred"]) == \
        set(share.index[share >= 0.4]) & set(results["pred"].dropna())
    assert "flamingo" in set(share.index[share >= 0.4])  # 80% staged in the demo
    look = results[masks["lookalikes"]]
    assert set(look["pred"]) == {"leopard"} and (look["confidence"] < 0.8).all()
    assert masks["lowest"].sum() == 10
    assert results.loc[masks["lowest"], "confidence"].max() <= \
        results.loc[ok & ~masks["lowest"], "confidence"].min()


def test_filter_sets_unknown_only_when_the_table_has_such_rows(results, manifest, masks):
    assert "unknown" not in masks
    filed = results[results["error"] == ""].head(3).copy()
    filed["path"] = [f"/u/{i}.jpg" for i in range(3)]
    filed["rel"] = [f"library/Unknown/{i}.jpg" for i in range(3)]
    both = bulkid.combine(results, filed)
    sets = widgets.filter_sets(both, manifest)
    assert sets["unknown"].tolist() == [False] * len(results) + [True] * 3
    assert list(sets) == ["all", "low_count", "synthetic_reliant", "unknown", "lowest",
                          "unreadable"]


def test_filter_sets_bad_lookalike_class(demo_ws, results):
    from zoolib.workspace import ZoolibError

    with pytest.raises(ZoolibError, match="'tiger' is not a class"):
        widgets.filter_sets(results, library.scan(demo_ws, progress=False),
                            lookalike_class="tiger")


def test_select_rows_filters_and_sorts(results, masks):
    state = ViewState(pred="zebra", conf=(0.5, 1.0), sort="confidence, high first")
    rows = widgets.select_rows(results, state, masks, _status(results))
    want = results[(results["pred"] == "zebra") & (results["confidence"] >= 0.5)]
    assert sorted(rows) == sorted(want.index)
    conf = results["confidence"].to_numpy()[rows]
    assert (np.diff(conf) <= 0).all() and len(rows) > 0


def test_select_rows_status_and_text_sort(results, masks):
    status = _status(results)
    status.iloc[[0, 1, 2]] = ["added", "discarded", "added"]
    state = ViewState(status="added", sort="path")
    assert widgets.select_rows(results, state, masks, status).tolist() == [0, 2]
    opened = widgets.select_rows(results, ViewState(sort="predicted class"), masks, status)
    assert not set(opened) & {0, 1, 2}
    preds = results["pred"].to_numpy()[opened]
    assert list(preds) == sorted(preds)
    everything = widgets.select_rows(results, ViewState(filter="unreadable", status="all"),
                                     masks, status)
    assert sorted(results.loc[everything, "rel"]) == ["inbox/camera1/truncated.jpg",
                                                      "inbox/camera2/notes.txt"]


def test_select_rows_unknown_values(results, masks):
    from zoolib.workspace import ZoolibError

    with pytest.raises(ZoolibError, match="unknown filter 'nope'"):
        widgets.select_rows(results, ViewState(filter="nope"), masks, _status(results))
    with pytest.raises(ZoolibError, match="unknown sort"):
        widgets.select_rows(results, ViewState(sort="size"), masks, _status(results))


def test_paging():
    rows = np.arange(50)
    assert widgets.n_pages(50, 24) == 3 and widgets.n_pages(0, 24) == 1
    assert widgets.page_of(rows, 2, 24).tolist() == [48, 49]
    assert widgets.page_of(rows, 9, 24).tolist() == [48, 49]  # clamped
    assert widgets.page_of(rows[:0], 0, 24).tolist() == []


def test_thumbnail_small_jpeg_cached_and_placeholder(demo_ws, tmp_path):
    src = str(demo_ws.library / "lion" / "lion_0000.jpg")
    data = widgets.thumbnail(src, 40)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG" and max(img.size) == 40
    hits = widgets.thumbnail.cache_info().hits
    assert widgets.thumbnail(src, 40) is data and widgets.thumbnail.cache_info().hits == hits + 1
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    with Image.open(io.BytesIO(widgets.thumbnail(str(bad), 40))) as img:
        assert img.size == (40, 40) and img.getpixel((5, 5)) == (200, 200, 200)


def _visible(view):
    return [t for t in view.tiles if t.box.layout.display != "none"]


def _view(demo_ws, results, masks, **kw):
    return BulkView(demo_ws, results, masks, run="fake", page_size=12, thumb_size=32, **kw)


def test_view_shows_a_page_and_follows_the_controls(demo_ws, results, masks):
    view = _view(demo_ws, results, masks)
    tiles = _visible(view)
    assert len(tiles) == 12
    assert all(len(t.image.value) > 100 for t in tiles)
    first = [t.toggle.description for t in tiles]
    confs = [float(d.split()[-1]) for d in first]
    assert confs == sorted(confs)  # default sort: least sure first
    assert "page 1 / " in view.page_label.value
    view.pred.value = "zebra"  # the class filter control
    tiles = _visible(view)
    assert len(tiles) == (results["pred"] == "zebra").sum()
    assert all(t.toggle.description.startswith("zebra ") for t in tiles)
    view.pred.value = ANY_CLASS
    view.filter.value = "lookalikes"
    assert {t.toggle.description.split()[0] for t in _visible(view)} == {"leopard"}
    view.filter.value = "all"
    view.next.click()
    assert view.state.page == 1 and "page 2 / " in view.page_label.value
    assert [t.toggle.description for t in _visible(view)] != first


def test_view_add_discard_undo_are_journaled_and_survive_restart(demo_ws, results, masks):
    view = _view(demo_ws, results, masks)
    tiles = _visible(view)
    tiles[0].toggle.value = tiles[1].toggle.value = True  # multi-select by clicking
    chosen = [tiles[0].path, tiles[1].path]
    assert view.selected == set(chosen) and "2 selected" in view.page_label.value
    view.label.value = "okapi"
    view.buttons["add to library"].click()
    assert "2 image(s) copied to library/okapi" in view.message.value
    assert sorted(actions.marks(demo_ws)["path"]) == sorted(chosen)
    assert not {t.path for t in _visible(view)} & set(chosen)  # "open" hides marked ones
    view.status.value = "added"
    assert sorted(t.path for t in _visible(view)) == sorted(chosen)
    assert all(t.toggle.description.startswith("✓ ") and t.toggle.button_style == "success"
               for t in _visible(view))
    view.status.value = "open"
    _visible(view)[0].toggle.value = True
    gone = _visible(view)[0].path
    view.buttons["discard"].click()
    assert (demo_ws.trash / gone.split(str(demo_ws.root) + "/")[1]).is_file()

    restarted = _view(demo_ws, results, masks)  # a new kernel: marks come from the journal
    restarted.status.value = "all"
    restarted.filter.value = "all"
    marked = {t.path: t.toggle.description[:2] for t in _visible(restarted)
              if t.toggle.description[:2] in ("✓ ", "✗ ")}
    assert marked == {**{p: "✓ " for p in chosen}, gone: "✗ "}
    names = pd.Series(restarted.status_col).map(STATUS_NAMES)  # a small int per row
    assert names.value_counts().to_dict() == {"": len(results) - 3, "added": 2,
                                              "discarded": 1}
    restarted.buttons["undo last"].click()  # the discard
    assert "undid 1 action(s)" in restarted.message.value
    assert open(gone, "rb").read()[:2] == b"\xff\xd8"
    assert pd.Series(restarted.status_col).map(STATUS_NAMES).value_counts().to_dict() == {
        "": len(results) - 2, "added": 2}


def test_view_bad_class_name_is_a_message_not_a_change(demo_ws, results, masks):
    view = _view(demo_ws, results, masks)
    _visible(view)[0].toggle.value = True
    view.label.value = "../lion"
    view.buttons["add to library"].click()
    assert "not a plain folder name" in view.message.value
    assert journal.read(demo_ws).empty and view.selected
    view.clear_selection()
    view.buttons["discard"].click()
    assert "no image selected" in view.message.value


def test_view_export_and_more_like_this(demo_ws, results, masks):
    view = _view(demo_ws, results, masks)
    view.select_page()
    view.export_path.value = "bulkid/fake/mine.csv"
    view.buttons["export selection"].click()
    table = pd.read_csv(demo_ws.root / "bulkid" / "fake" / "mine.csv")
    assert sorted(table["path"]) == sorted(t.path for t in _visible(view))
    view.clear_selection()
    view.buttons["more like this"].click()
    assert "select exactly one" in view.message.value
    query = results.loc[0, "path"]
    view.select([query])
    view.buttons["more like this"].click()
    assert view.filter.value == "like" and view.masks["like"].sum() == 12
    assert view.sort.value == "similarity, nearest first"
    near = bulkid.more_like_this(results, query, k=11)
    # The chosen image first, then its neighbours nearest first (not by confidence).
    assert [t.path for t in _visible(view)] == [query, *near["path"]]
    assert near["similarity"].is_monotonic_decreasing
    assert not near["confidence"].is_monotonic_increasing  # the default sort would differ


def test_journal_view_pages_newest_first_reading_one_page_at_a_time(demo_ws, monkeypatch):
    from zoolib.widgets.curate import JournalView

    ids = [journal.record(demo_ws, "discard" if i % 3 else "mark", f"library/lion/{i}.jpg")
           for i in range(36)]
    shown = [i for k, i in enumerate(ids) if k % 3][::-1]  # 24 discards, newest first
    reads = []
    real = journal.read
    monkeypatch.setattr(journal, "read", lambda *a, **k: reads.append(k) or real(*a, **k))
    view = JournalView(demo_ws, page_size=10)
    assert view.rows["id"].tolist() == shown[:10] and view.previous.disabled
    view.next.click()
    assert view.page == 1 and view.rows["id"].tolist() == shown[10:20]
    assert view.info.value == "page 2 of 3 (24 events)"
    assert f"library/lion/{shown[10] - 1}.jpg" in view.table.value and "mark" not in \
        view.table.value
    view.next.click()
    assert view.rows["id"].tolist() == shown[20:] and view.next.disabled
    view.next.click()  # past the end: stays on the last page
    view.previous.click()
    assert view.page == 1 and not view.previous.disabled
    assert [(k["limit"], k["offset"], k["newest_first"]) for k in reads] == [
        (10, 0, True), (10, 10, True), (10, 20, True), (10, 20, True), (10, 10, True)]


def test_journal_view_of_the_curation_widget_shows_the_action_just_done(demo_ws, manifest):
    from zoolib import curate

    w = widgets.CurationWidget(demo_ws, {"unreadable": curate.unreadable(manifest)})
    assert w.journal.rows.empty and w.journal.info.value == "page 1 of 1 (0 events)"
    next(b for b in w.buttons if b.description == "discard").click()
    assert w.journal.rows["action"].tolist() == ["discard"]
    next(b for b in w.buttons if b.description == "undo last").click()
    assert w.journal.rows["undone"].tolist() == [True]
