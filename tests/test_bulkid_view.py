"""The lazy view of a run: the partitioned dataset read back exactly, the widget's
filters and sorts equal to those over the whole table, "more like this" through the
index kept beside the run."""
import numpy as np
import pandas as pd
import pytest

from zoolib import bulkid, library, widgets
from zoolib.widgets import ViewState
from zoolib.widgets.bulk import lowest_mask

from .test_bulkid import Stop, _generation, _inbox_files, _stop_after

NAME = "gen-0001-inbox"


@pytest.fixture
def ws(demo_ws):
    _generation(demo_ws)
    return demo_ws


@pytest.fixture
def segmented(ws):
    """A run interrupted once, then finished: results.parquet plus a segment."""
    with pytest.raises(Stop):
        bulkid.run(ws, batch_size=16, num_workers=0, progress=False, on_batch=_stop_after(2))
    bulkid.run(ws, batch_size=16, num_workers=0, progress=False)
    assert list((ws.bulkid / NAME / "segments").glob("seg-*.parquet"))
    return ws


def test_the_view_reads_back_every_row_exactly(segmented):
    frame = bulkid.load_results(segmented, NAME)
    view = bulkid.open_view(segmented, NAME)
    assert len(view) == len(frame) == len(_inbox_files(segmented))
    rows = view.rows(np.arange(len(view)))
    pd.testing.assert_frame_equal(rows.reset_index(drop=True),
                                  frame.drop(columns="embedding"), check_dtype=False)
    assert view.rel.to_pylist() == frame["rel"].tolist()
    assert [view.classes[c] if c >= 0 else "" for c in view.pred] == \
        frame["pred"].fillna("").tolist()
    np.testing.assert_array_equal(view.ok, (frame["error"].fillna("") == "").to_numpy())
    np.testing.assert_array_equal(view.scores["confidence"],
                                  frame["confidence"].to_numpy(np.float64, na_value=np.nan))
    shuffled = np.random.default_rng(0).permutation(len(view))[:20]
    assert view.rows(shuffled)["path"].tolist() == frame["path"].iloc[shuffled].tolist()
    for i in np.flatnonzero(view.ok)[:5]:
        np.testing.assert_array_equal(view.embedding(i), frame["embedding"].iloc[i])


def test_filters_sorts_and_pages_equal_the_whole_table(segmented):
    frame = bulkid.load_results(segmented, NAME)
    view = bulkid.open_view(segmented, NAME)
    manifest = library.scan(segmented, progress=False)
    args = dict(max_count=49, min_share=0.4, lookalike_class="leopard", lowest_n=7)
    on_frame = widgets.filter_sets(frame, manifest, **args)
    on_view = widgets.filter_sets(view, manifest, **args)
    assert list(on_frame) == list(on_view)
    for name in on_frame:
        np.testing.assert_array_equal(on_frame[name].to_numpy(), on_view[name], name)
    lowest = bulkid.lowest_scores(frame, n=7)["path"]
    assert set(frame["path"][on_view["lowest"]]) == set(lowest)
    status = np.zeros(len(view), np.int8)
    for sort in widgets.SORTS:
        state = ViewState(sort=sort, status="all", conf=(0.2, 0.9))
        a = widgets.select_rows(frame, state, on_frame, status)
        b = widgets.select_rows(view, state, on_view, status)
        np.testing.assert_array_equal(a, b, sort)
        every = ViewState(sort=sort, status="all")  # enough rows for a partitioned head
        whole = widgets.select_rows(frame, every, on_frame, status)
        assert len(whole) > 5 * bulkid.view.FEW
        head, total = widgets.select_head(view, every, on_view, status, need=5)
        assert total == len(whole) and len(head) >= 5
        np.testing.assert_array_equal(head[:5], whole[:5], sort)


def test_more_like_this_on_the_view_keeps_its_index_and_extends_it(segmented, ws):
    frame = bulkid.load_results(segmented, NAME)
    view = bulkid.open_view(segmented, NAME)
    query = frame.loc[frame["error"] == "", "path"].iloc[3]
    near = bulkid.more_like_this(view, query, k=6)
    want = bulkid.more_like_this(frame, query, k=6)
    assert near["path"].tolist() == want["path"].tolist()
    np.testing.assert_allclose(near["similarity"], want["similarity"], atol=1e-5)
    saved = ws.bulkid / NAME / "ann" / "index.faiss"
    assert saved.exists()
    # A later run adds a segment: the saved index is extended, not rebuilt.
    extra = ws.inbox / "later"
    extra.mkdir()
    for i, src in enumerate(_inbox_files(ws)[:3]):
        (extra / f"copy{i}{src.suffix}").write_bytes(src.read_bytes())
    bulkid.run(ws, batch_size=16, num_workers=0, progress=False)
    again = bulkid.open_view(ws, NAME)
    assert len(again) == len(view) + 3
    assert again.index.ntotal == len(again)
    copy = str(extra / f"copy0{_inbox_files(ws)[0].suffix}")
    if again.ok[again.positions([copy])[0]]:
        top = bulkid.more_like_this(again, copy, k=1)
        assert top["similarity"].iloc[0] == pytest.approx(1.0, abs=1e-3)  # its original


def test_a_rewritten_file_of_the_same_name_and_rows_rebuilds_the_index(segmented):
    """A file set aside and identified again keeps its name and perhaps its row count:
    the index is keyed on its size and part numbers too, never reused for other rows."""
    import json

    import pyarrow.parquet as pq

    view = bulkid.open_view(segmented, NAME)
    view.index  # built and saved
    main = segmented.bulkid / NAME / "results.parquet"
    table = pq.read_table(main)
    meta = dict(table.schema.metadata)
    meta[b"zoolib.parts"] = json.dumps([900, 900]).encode()  # new parts, as a re-run makes
    pq.write_table(table.take(np.arange(table.num_rows)[::-1]).replace_schema_metadata(meta), main)
    again = bulkid.open_view(segmented, NAME)
    frame = bulkid.load_results(segmented, NAME)
    query = frame.loc[frame["error"] == "", "path"].iloc[2]
    near = bulkid.more_like_this(again, query, k=5)
    assert near["path"].tolist() == bulkid.more_like_this(frame, query, k=5)["path"].tolist()


def test_a_damaged_index_is_built_again(segmented):
    view = bulkid.open_view(segmented, NAME)
    view.index
    saved = segmented.bulkid / NAME / "ann" / "index.faiss"
    saved.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.warns(UserWarning, match="cannot be read"):
        again = bulkid.open_view(segmented, NAME).index
    assert again.ntotal == len(view)


def test_a_view_of_an_unknown_run_names_the_runs(ws):
    from zoolib.workspace import ZoolibError

    with pytest.raises(ZoolibError, match="no bulk identification run"):
        bulkid.open_view(ws, "nope")


def test_a_lazy_run_returns_the_view(ws):
    view = bulkid.run(ws, batch_size=16, num_workers=0, progress=False, lazy=True)
    assert isinstance(view, bulkid.ResultsView) and len(view) == len(_inbox_files(ws))
    assert sorted(view.rows(range(len(view)))["path"]) == sorted(map(str, _inbox_files(ws)))


def _tied_table(n: int = 480, seed: int = 0) -> pd.DataFrame:
    """A results table with many equal scores, missing ones and unreadable rows."""
    rng = np.random.default_rng(seed)
    names = [f"inbox/{k:04d}.jpg" for k in rng.permutation(n)]

    def score():
        values = np.round(rng.random(n), 1)  # eleven values: ties everywhere
        values[rng.random(n) < 0.1] = np.nan
        return values

    return pd.DataFrame({
        "path": ["/ws/" + r for r in names], "rel": names,
        "pred": rng.choice(np.array(["ant", "bee", "cat", None], object), n),
        "error": np.where(rng.random(n) < 0.1, "OSError: truncated", ""),
        "confidence": score(), "margin": score(), "entropy": score(), "ood": score(),
        "knn": score(), "embedding": [np.zeros(4, np.float16)] * n})


@pytest.mark.parametrize("share", [0.02, 0.5])  # sorted on its own / through the order
def test_a_selection_sorts_as_a_stable_sort_of_the_table(share):
    frame = _tied_table()
    view = bulkid.view.ResultsView.from_frame(frame)
    keep = np.random.default_rng(1).random(len(frame)) < share
    assert (np.count_nonzero(keep) * bulkid.view.FEW < len(view)) == (share < 0.05)
    for column, ascending in {*widgets.SORTS.values()} - {("similarity", False)}:
        want = frame[keep].sort_values(column, ascending=ascending, kind="stable",
                                       na_position="last").index.to_numpy()
        got = view.sorted(keep, column, ascending)
        np.testing.assert_array_equal(got, want, f"{column} ascending={ascending}")


def test_the_lowest_filter_is_lowest_scores_whatever_the_ties():
    frame = _tied_table()
    view = bulkid.view.ResultsView.from_frame(frame)
    for n in (0, 1, 7, 40, 200, 431, 1000):  # 431: past the rows with a score
        mask = lowest_mask(view, n)
        want = bulkid.lowest_scores(frame, n=n)
        assert set(frame["path"][mask]) == set(want["path"]), n
    frame["knn"] = np.nan  # no knn: the fallback score, confidence
    mask = lowest_mask(bulkid.view.ResultsView.from_frame(frame), 25)
    assert set(frame["path"][mask]) == set(bulkid.lowest_scores(frame, n=25)["path"])


def test_a_page_of_a_new_sort_is_the_head_of_the_whole_order():
    frame = _tied_table(n=2000, seed=3)
    view = bulkid.view.ResultsView.from_frame(frame)
    keep = ~np.isnan(frame["ood"].to_numpy()) | (np.arange(len(frame)) % 3 == 0)
    for column, ascending in [("confidence", True), ("confidence", False), ("ood", False),
                              ("margin", True)]:
        for need in (1, 24, 48, 110):  # 110 x FEW < rows kept: partitioned
            head = view.sorted(keep, column, ascending, need)
            assert (column, ascending) not in view._orders  # no order of every row
            whole = view.sorted(keep, column, ascending)  # computes (or waits for) the order
            np.testing.assert_array_equal(head[:need], whole[:need], f"{column} {need}")
            np.testing.assert_array_equal(view.order(column, ascending), view._argsort(
                column, ascending))
            view._orders.clear()
    state = ViewState(sort="out-of-distribution, high first", status="all")
    masks = {"all": keep}
    rows, total = widgets.select_head(view, state, masks, np.zeros(len(view), np.int8), need=24)
    assert total == keep.sum() and len(rows) >= 24
    np.testing.assert_array_equal(rows[:24], widgets.select_rows(view, state, masks,
                                                                 np.zeros(len(view), np.int8))[:24])


def test_the_widget_pages_a_partitioned_sort_as_the_whole_order(demo_ws):
    frame = _tied_table(n=2000, seed=5)
    frame["path"] = [str(demo_ws.root / r) for r in frame["rel"]]  # thumbnails: missing files
    masks = {"all": (frame["error"] == "").to_numpy(), "unreadable": (frame["error"] != "")
             .to_numpy()}
    w = widgets.BulkView(demo_ws, frame, masks, page_size=24, thumb_size=16)
    whole = widgets.select_rows(frame, w.state, masks, np.zeros(len(frame), np.int8))
    assert len(w.rows) < len(whole) == w.total  # only the first pages were found
    for page in (0, 1, 3, 30, 500):  # 30: past what a partition gives; 500: the last page
        w.go(page)
        want = widgets.page_of(whole, page, 24)
        assert w.page_rows()["path"].tolist() == frame["path"].iloc[want].tolist(), page
    assert f"{len(whole)} images" in w.page_label.value


def test_a_merge_keeps_the_first_row_of_each_path_and_leaves_out_stored_ones(ws, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from zoolib.bulkid import parts as store

    bulkid.run(ws, batch_size=16, num_workers=0, progress=False)
    table = pq.read_table(ws.bulkid / NAME / "results.parquet")
    n = table.num_rows
    again = table.slice(n // 2).set_column(  # a repeat of the second half, other scores
        table.schema.get_field_index("confidence"), "confidence",
        pa.array(np.full(n - n // 2, 0.5)))
    parts = [tmp_path / "part-00001.parquet", tmp_path / "part-00002.parquet"]
    q = 3 * n // 4
    pq.write_table(table.slice(0, q), parts[0])
    pq.write_table(again, parts[1])  # rows n/2..q repeated; q.. only here
    want = pa.concat_tables([table.slice(0, q), again.slice(q - n // 2)]).to_pandas()
    out = tmp_path / "merged.parquet"
    store._merge(parts, out, table.schema)
    pd.testing.assert_frame_equal(pq.read_table(out).to_pandas(), want)  # the firsts, in order
    stored = table.column("path").combine_chunks().slice(0, 5)
    store._merge(parts, out, table.schema, stored)
    pd.testing.assert_frame_equal(pq.read_table(out).to_pandas(),
                                  want.iloc[5:].reset_index(drop=True))
