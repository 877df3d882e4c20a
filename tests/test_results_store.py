"""The results store of bulk identification read back whatever is found on disk: a
merged file repeated under a valid name, a segment written with other Arrow types, a
cut segment, a view outliving the files it was opened on, a read-only run folder; and
random sequences of runs, interruptions and stray copies ending where an
uninterrupted run ends (Hypothesis)."""
import errno
import itertools
import shutil
import warnings
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoolib import bulkid, demo, models
from zoolib.workspace import ZoolibError

CLASSES = ["cheetah", "elephant", "flamingo", "leopard", "lion", "okapi", "penguin", "zebra"]
NAME = "gen-0001-inbox"
RUN = dict(batch_size=16, num_workers=0, progress=False, knn=False)


class Stop(Exception):
    """Interrupts a run softly (raised from on_batch), as a user would."""


def _stop_after(rows: int):
    def hook(done, total):
        if done >= rows:
            raise Stop
    return hook


def _generation(ws) -> str:
    """A random-weight zoo_cnn_small at 32 px (the store does not care how it was trained)."""
    torch.manual_seed(0)
    info = {"arch": "zoo_cnn_small", "img_size": 32, "mean": list(models.IMAGENET_MEAN),
            "std": list(models.IMAGENET_STD), "classes": CLASSES, "resize": "squish",
            "interpolation": "bilinear"}
    return models.save_generation(ws, models.create_model("zoo_cnn_small", len(CLASSES)), info)


@pytest.fixture
def ws(demo_ws):
    _generation(demo_ws)
    return demo_ws


@pytest.fixture
def segmented(ws):
    """A run interrupted once, then finished: results.parquet (32 rows) and seg-00002."""
    with pytest.raises(Stop):
        bulkid.run(ws, on_batch=_stop_after(32), **RUN)
    bulkid.run(ws, **RUN)
    assert (ws.bulkid / NAME / "segments" / "seg-00002.parquet").exists()
    return ws


def _count(ws) -> int:
    return len(bulkid.list_files(ws.inbox))


def _rerun_adds_nothing(ws) -> pd.DataFrame:
    """Run again over the same inbox: no image identified again, one row per file."""
    calls = []
    out = bulkid.run(ws, on_batch=lambda done, total: calls.append(done), **RUN)
    assert calls == [] and len(out) == _count(ws) and out["path"].is_unique
    return out


# ----------------------------------------------------------------------------- repeated files

def _same_paths_no_parts(seg, copy):
    """A copy another tool wrote (pandas, polars, DuckDB), dropping the metadata and
    the part numbers with it: only its image paths give it away."""
    pq.write_table(pq.read_table(seg).replace_schema_metadata(None), copy)


@pytest.mark.parametrize("make", [shutil.copyfile, _same_paths_no_parts],
                         ids=["same parts", "same paths"])
def test_a_segment_repeated_under_a_valid_name_is_set_aside_not_doubled(segmented, make):
    ws, n = segmented, _count(segmented)
    run_dir = ws.bulkid / NAME
    seg = run_dir / "segments" / "seg-00002.parquet"
    copy = seg.with_name("seg-00099.parquet")
    make(seg, copy)
    with pytest.warns(UserWarning, match="seg-00099.parquet"):
        frame = bulkid.load_results(ws, NAME)
    assert len(frame) == n and frame["path"].is_unique
    with pytest.warns(UserWarning, match="seg-00099.parquet"):
        view = bulkid.open_view(ws, NAME)
    assert len(view) == n and view.rows(range(n))["path"].is_unique
    assert copy.exists()  # a reader leaves it where it is
    data = copy.read_bytes()
    with pytest.warns(UserWarning, match="seg-00099.parquet"):
        _rerun_adds_nothing(ws)
    assert not copy.exists()
    (aside,) = run_dir.glob("seg-00099.parquet.*")  # set aside, never deleted
    assert aside.read_bytes() == data
    assert seg.exists() and len(bulkid.load_results(ws, NAME)) == n
    assert len(bulkid.open_view(ws, NAME)) == n


def test_a_copy_of_the_first_table_as_a_segment_is_set_aside(segmented):
    ws, n = segmented, _count(segmented)
    run_dir = ws.bulkid / NAME
    copy = run_dir / "segments" / "seg-00001.parquet"  # sorts before seg-00002
    shutil.copyfile(run_dir / "results.parquet", copy)
    with pytest.warns(UserWarning, match="seg-00001.parquet"):
        assert len(bulkid.load_results(ws, NAME)) == n
    with pytest.warns(UserWarning, match="seg-00001.parquet"):
        _rerun_adds_nothing(ws)
    assert not copy.exists() and (run_dir / "results.parquet").exists()


def test_an_older_table_and_later_segments_are_not_taken_for_repeats(ws):
    """A results.parquet of an older version records no part numbers: the paths of
    the segments added later, in the same folders, are compared, and none repeats."""
    bulkid.run(ws, **RUN)
    main = ws.bulkid / NAME / "results.parquet"
    pq.write_table(pq.read_table(main).replace_schema_metadata(None), main)
    files = bulkid.list_files(ws.inbox)
    for i, src in enumerate(files[:3]):  # new files sorting among the old ones
        shutil.copyfile(src, ws.inbox / "camera1" / f"copy-{i}{src.suffix}")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert len(bulkid.run(ws, **RUN)) == len(files) + 3
        assert len(bulkid.load_results(ws, NAME)) == len(bulkid.open_view(ws, NAME))
    assert len(list((ws.bulkid / NAME / "segments").iterdir())) == 1
    assert not [w for w in said if "repeat" in str(w.message)]


# ----------------------------------------------------------------------------- other Arrow types

OTHER_TYPES = {"path": pa.large_string(), "rel": pa.large_string(), "pred": pa.large_string(),
               "confidence": pa.float32(), "margin": pa.float32(), "entropy": pa.float32(),
               "ood": pa.float32(), "knn": pa.float32(), "embedding": pa.large_binary(),
               "top5": pa.large_list(pa.large_string()), "top5_prob": pa.list_(pa.float64())}


def _rewrite(path, types: dict, values: dict | None = None) -> pa.Table:
    """Rewrite a table file with other Arrow types (and values) for some columns, as
    another tool (polars, DuckDB, pandas) would write it; its metadata kept."""
    table = pq.read_table(path)
    for name, kind in types.items():
        i = table.schema.get_field_index(name)
        column = (values or {}).get(name)
        column = table.column(i).cast(kind) if column is None else pa.array(column, kind)
        table = table.set_column(i, name, column)
    pq.write_table(table, path)
    return table


def test_a_segment_of_other_arrow_types_is_read_in_the_run_schema(segmented):
    ws, n = segmented, _count(segmented)
    seg = segmented.bulkid / NAME / "segments" / "seg-00002.parquet"
    before = bulkid.load_results(ws, NAME)
    _rewrite(seg, OTHER_TYPES)
    assert pq.read_schema(seg).field("path").type == pa.large_string()
    frame = bulkid.load_results(ws, NAME)
    assert len(frame) == n and frame["path"].tolist() == before["path"].tolist()
    pd.testing.assert_frame_equal(frame.drop(columns="embedding"),
                                  before.drop(columns="embedding"), check_exact=False,
                                  rtol=1e-6)
    view = bulkid.open_view(ws, NAME)
    assert len(view) == n and view.rel.to_pylist() == before["rel"].tolist()
    page = view.rows(np.arange(n))
    assert page["path"].tolist() == before["path"].tolist()
    query = before.loc[before["error"] == "", "path"].iloc[-1]  # a row of the segment
    near = bulkid.more_like_this(view, query, k=4)
    assert near["path"].tolist() == bulkid.more_like_this(before, query, k=4)["path"].tolist()
    _rerun_adds_nothing(ws)  # the segment rewritten once in the run's schema
    assert pq.read_schema(seg).remove_metadata().equals(bulkid.SCHEMA)
    assert bulkid.load_results(ws, NAME)["path"].tolist() == before["path"].tolist()


def test_a_segment_whose_types_cannot_be_cast_is_named_then_set_aside(segmented, capsys):
    ws, n = segmented, _count(segmented)
    run_dir = segmented.bulkid / NAME
    seg = run_dir / "segments" / "seg-00002.parquet"
    rows = pq.read_metadata(seg).num_rows
    _rewrite(seg, {"confidence": pa.string()}, {"confidence": ["high"] * rows})
    with pytest.raises(ZoolibError, match=r"seg-00002.parquet is not a readable results "
                                          r"table .*confidence"):
        bulkid.load_results(ws, NAME)
    with pytest.raises(ZoolibError, match=r"seg-00002.parquet is not a readable results table"):
        bulkid.open_view(ws, NAME)
    calls = []
    capsys.readouterr()
    out = bulkid.run(ws, on_batch=lambda done, total: calls.append(total), **RUN)
    assert "renamed it seg-00002.parquet.corrupt-" in capsys.readouterr().out
    assert calls[-1] == rows and len(out) == n and out["path"].is_unique
    assert list(run_dir.glob("seg-00002.parquet.corrupt-*"))


def test_a_cut_segment_is_named_by_the_view(segmented):
    seg = segmented.bulkid / NAME / "segments" / "seg-00002.parquet"
    seg.write_bytes(seg.read_bytes()[: seg.stat().st_size // 2])
    with pytest.raises(ZoolibError, match=r"seg-00002.parquet is not a readable results table"):
        bulkid.load_results(segmented, NAME)
    with pytest.raises(ZoolibError, match=r"seg-00002.parquet is not a readable results table"):
        bulkid.open_view(segmented, NAME)


# ----------------------------------------------------------------------------- views

def test_a_view_opened_on_parts_still_finds_more_like_this_once_they_are_merged(ws,
                                                                              monkeypatch):
    monkeypatch.setattr(bulkid.parts, "FLUSH_ROWS", 16)
    monkeypatch.setattr(bulkid.engine, "_READ_BATCHES", 1)  # a part per batch
    monkeypatch.setattr(bulkid.parts, "consolidate", lambda run_dir: None)  # still running
    with pytest.raises(Stop):
        bulkid.run(ws, on_batch=_stop_after(48), **RUN)
    monkeypatch.undo()
    run_dir = ws.bulkid / NAME
    assert (run_dir / "parts" / "part-00001.parquet").exists()
    view = bulkid.open_view(ws, NAME)
    frame = bulkid.load_results(ws, NAME)
    bulkid.run(ws, **RUN)  # the run merges its parts, and goes on
    assert not list((run_dir / "parts").iterdir())
    assert len(view) == len(frame) == 48
    assert view.rows(np.arange(48))["path"].tolist() == frame["path"].tolist()
    query = frame.loc[frame["error"] == "", "path"].iloc[5]
    near = bulkid.more_like_this(view, query, k=5)
    assert near["path"].tolist() == bulkid.more_like_this(frame, query, k=5)["path"].tolist()
    again = bulkid.open_view(ws, NAME)  # a new view sees the whole run
    assert len(again) == _count(ws)
    assert len(bulkid.more_like_this(again, query, k=5)) == 5


def test_more_like_this_works_in_a_read_only_run_folder(segmented, monkeypatch):
    run_dir = segmented.bulkid / NAME
    frame = bulkid.load_results(segmented, NAME)
    for path in [run_dir, *run_dir.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)

    def refused(*args, **kwargs):  # root ignores the permissions: as the file system says
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(bulkid.index, "write_atomic", refused)
    try:
        view = bulkid.open_view(segmented, NAME)
        query = frame.loc[frame["error"] == "", "path"].iloc[3]
        with pytest.warns(UserWarning, match="was not saved"):
            near = bulkid.more_like_this(view, query, k=6)
        assert near["path"].tolist() == bulkid.more_like_this(frame, query, k=6)[
            "path"].tolist()
        assert not (run_dir / "ann" / "index.faiss").exists()
    finally:
        for path in [run_dir, *run_dir.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


# ----------------------------------------------------------------------------- random sequences

@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A workspace with a tiny generation, and the rows an uninterrupted run gives each
    file of its inbox (rel in the inbox -> prediction; None where unreadable)."""
    root = tmp_path_factory.mktemp("store")
    ws = demo.build(root / "ws", seed=0)
    _generation(ws)
    files = bulkid.list_files(ws.inbox)
    # a few readable files of each camera folder and the unreadable ones
    chosen = [f for f in files if f.name in ("truncated.jpg", "notes.txt")]
    chosen += [f for f in files if f not in chosen][::7][:10]
    out = bulkid.run(ws, files=chosen, name="reference", batch_size=1, num_workers=0,
                     progress=False, knn=False)
    rels = [str(Path(p).relative_to(ws.inbox)) for p in out["path"]]
    reference = dict(zip(rels, out["pred"].where(out["error"] == "", None)))
    return ws, reference, itertools.count()


# The first choices are the ones Hypothesis tries first: the interesting ones
STEPS = st.lists(st.one_of(
    st.tuples(st.just("kill"), st.integers(1, 8)),  # killed: parts left, never merged
    st.tuples(st.just("crash"), st.integers(1, 8)),  # killed merging: merged, parts not removed
    st.tuples(st.just("repeat"), st.integers(0, 9)),  # a merged file copied to a valid name
    st.tuples(st.just("stray"), st.integers(0, 9)),  # a sync tool's copy beside the files
    st.tuples(st.just("stop"), st.integers(1, 8)),  # an exception after k images: merged
    st.tuples(st.just("run")),
), min_size=2, max_size=6)


def _inbox(ws, files, number):
    inbox = ws.root.parent / f"inbox-{number}"
    for rel in files:
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ws.inbox / rel, inbox / rel)
    return inbox


def _killed_before_removing_parts(consolidate):
    """`parts.consolidate` killed between writing the merged file and removing the parts."""
    def merge(run_dir):
        parts = {p: p.read_bytes() for p in (run_dir / "parts").glob("part-*.parquet")}
        consolidate(run_dir)
        for path, data in parts.items():
            path.write_bytes(data)
    return merge


def _step(ws, inbox, name, step) -> None:
    """One step of a sequence: a run, an interrupted run, or a file dropped in the run."""
    run_dir = ws.bulkid / name
    kw = dict(inbox=inbox, name=name, batch_size=1, num_workers=0, progress=False, knn=False)
    if step[0] == "run":
        bulkid.run(ws, **kw)
    elif step[0] in ("stop", "kill", "crash"):
        merge = {"stop": bulkid.parts.consolidate, "kill": lambda run_dir: None,
                 "crash": _killed_before_removing_parts(bulkid.parts.consolidate)}[step[0]]
        with ExitStack() as stack:
            stack.enter_context(mock.patch.object(bulkid.parts, "FLUSH_ROWS", 1))
            stack.enter_context(mock.patch.object(bulkid.engine, "_READ_BATCHES", 1))
            stack.enter_context(mock.patch.object(bulkid.parts, "consolidate", merge))
            try:
                bulkid.run(ws, on_batch=_stop_after(step[1]), **kw)
            except Stop:
                pass
    else:
        found = sorted(p for p in run_dir.rglob("*.parquet") if "(" not in p.name) \
            if run_dir.exists() else []
        merged = [p for p in found if p.parent.name != "parts"]
        pick = (found if step[0] == "stray" else merged)
        if not pick:
            return
        src = pick[step[1] % len(pick)]
        if step[0] == "stray":
            target = src.with_name(f"{src.stem} (1).parquet")
        else:
            used = {p.name for p in (run_dir / "segments").iterdir()}
            target = run_dir / "segments" / next(
                f"seg-{k:05d}.parquet" for k in itertools.count(90)
                if f"seg-{k:05d}.parquet" not in used)
        shutil.copyfile(src, target)


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), steps=STEPS)
def test_any_sequence_of_runs_kills_and_copies_ends_as_one_uninterrupted_run(pool, data,
                                                                           steps):
    ws, reference, numbers = pool
    files = data.draw(st.lists(st.sampled_from(sorted(reference)), min_size=2, max_size=7,
                               unique=True), label="files")
    number = next(numbers)
    inbox = _inbox(ws, files, number)
    name = f"r{number}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the copies are warned about: not the point here
        for step in [*steps, ("run",)]:
            _step(ws, inbox, name, step)
        out = bulkid.load_results(ws, name)
        view = bulkid.open_view(ws, name)
    want = {str(inbox / rel): reference[rel] for rel in files}
    assert len(out) == len(files) and out["path"].is_unique, steps
    got = dict(zip(out["path"], out["pred"].where(out["error"] == "", None)))
    assert got == want, steps
    assert len(view) == len(files)
    assert sorted(view.rows(np.arange(len(view)))["path"]) == sorted(want)
