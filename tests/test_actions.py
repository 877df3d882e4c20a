"""Journaled actions behind the bulk-identification widget (no widget, no model)."""
import json
import os

import numpy as np
import pandas as pd
import pytest

from zoolib import actions, journal
from zoolib.images import content_hash
from zoolib.workspace import ZoolibError

CLASSES = ["cheetah", "elephant", "flamingo", "leopard", "lion", "penguin", "zebra"]


def fake_results(ws, seed: int = 0) -> pd.DataFrame:
    """A results table with bulkid's columns over the demo inbox, without a model:
    the prediction is the true species when the library knows it, else "lion"."""
    truth = json.loads((ws.root / "demo_truth.json").read_text())["inbox"]
    rng = np.random.default_rng(seed)
    rows = []
    for rel, species in sorted(truth.items()):
        path = ws.inbox / rel
        bad = species == "unreadable"
        pred = None if bad else species if species in CLASSES else "lion"
        conf = np.nan if bad else float(rng.uniform(0.3, 1.0))
        rest = [c for c in CLASSES if c != pred][:4]
        rows.append({
            "path": str(path), "rel": path.relative_to(ws.root).as_posix(),
            "hash": content_hash(path.read_bytes()), "pred": pred, "confidence": conf,
            "top5": [] if bad else [pred, *rest], "top5_prob": [] if bad else
            [conf, *[(1 - conf) / 4] * 4], "margin": np.nan if bad else conf - (1 - conf) / 4,
            "entropy": np.nan if bad else float(rng.uniform(0, 2)),
            "ood": np.nan if bad else float(rng.uniform(0, 1)),
            "embedding": rng.normal(size=8).astype(np.float16), "generation": "gen-0001",
            "error": "OSError: cannot identify image" if bad else ""})
    frame = pd.DataFrame(rows)
    frame.attrs.update(name="fake", generation="gen-0001", classes=CLASSES)
    return frame


@pytest.fixture
def results(demo_ws):
    return fake_results(demo_ws)


def _pick(results, species_rel_prefix="inbox/camera0", n=3):
    ok = results[(results["error"] == "") & results["rel"].str.startswith(species_rel_prefix)]
    return ok["path"].head(n).tolist()


def test_add_copies_into_class_and_marks(demo_ws, results):
    paths = _pick(results)
    events = actions.add_to_library(demo_ws, paths, "okapi", run="r1")
    assert len(events) == 3
    for p in paths:  # copied: the inbox keeps its file
        assert (demo_ws.library / "okapi" / p.rsplit("/", 1)[1]).read_bytes() == \
            open(p, "rb").read()
    m = actions.marks(demo_ws)
    assert sorted(m["path"]) == sorted(paths)
    assert set(m["status"]) == {"added"} and set(m["label"]) == {"okapi"}
    rows = journal.read(demo_ws)
    assert list(rows["action"]) == [actions.ADD] * 3 + [actions.BATCH]
    assert json.loads(rows["details"].iloc[-1])["events"] == events


def test_add_twice_same_class_is_skipped_other_class_refused(demo_ws, results):
    paths = _pick(results, n=2)
    actions.add_to_library(demo_ws, paths, "okapi")
    assert actions.add_to_library(demo_ws, paths, "okapi") == []
    assert len(list((demo_ws.library / "okapi").glob("img_*"))) == 2
    with pytest.raises(ZoolibError, match="already added to okapi"):
        actions.add_to_library(demo_ws, paths[:1], "lion")


def test_add_move_leaves_inbox_and_undo_puts_back(demo_ws, results):
    path = _pick(results, n=1)[0]
    before = open(path, "rb").read()
    actions.add_to_library(demo_ws, [path], "giraffe", move=True)
    assert not os.path.exists(path)
    assert actions.undo_last(demo_ws)
    assert open(path, "rb").read() == before
    assert not list((demo_ws.library / "giraffe").glob("*"))
    assert actions.marks(demo_ws).empty


@pytest.mark.parametrize("name", ["../escape", "a/b", "", " lion", "_trash", "x\ny"])
def test_add_rejects_names_that_are_not_plain(demo_ws, results, name):
    before = sorted(p.name for p in demo_ws.library.iterdir())
    with pytest.raises(ZoolibError, match="class name"):
        actions.add_to_library(demo_ws, _pick(results, n=1), name)
    assert sorted(p.name for p in demo_ws.library.iterdir()) == before
    assert journal.read(demo_ws).empty


def test_nothing_selected_and_missing_file(demo_ws, results):
    with pytest.raises(ZoolibError, match="no image selected"):
        actions.discard(demo_ws, [])
    with pytest.raises(ZoolibError, match="is not a file"):
        actions.add_to_library(demo_ws, [demo_ws.inbox / "nope.jpg"], "lion")


def test_discard_moves_to_trash_and_undo_restores(demo_ws, results):
    paths = _pick(results, n=2)
    data = [open(p, "rb").read() for p in paths]
    actions.discard(demo_ws, paths)
    for p in paths:
        rel = p.split(str(demo_ws.root) + "/", 1)[1]
        assert (demo_ws.trash / rel).is_file() and not os.path.exists(p)
    assert actions.discard(demo_ws, paths) == []  # already discarded: skipped
    status = actions.status_of(results["path"], actions.marks(demo_ws))
    assert sorted(results.loc[status == "discarded", "path"]) == sorted(paths)
    assert (status == "").sum() == len(results) - 2
    undone = actions.undo_last(demo_ws)
    assert len(undone) == 2
    assert [open(p, "rb").read() for p in paths] == data
    assert actions.marks(demo_ws).empty
    assert actions.undo_last(demo_ws) == []


def test_undo_last_takes_one_click_at_a_time(demo_ws, results):
    a, b = _pick(results, n=2)
    actions.add_to_library(demo_ws, [a], "okapi")
    actions.discard(demo_ws, [b])
    actions.undo_last(demo_ws)  # the discard
    m = actions.marks(demo_ws)
    assert m["path"].tolist() == [a] and m["status"].tolist() == ["added"]
    actions.undo_last(demo_ws)  # the add: the copy goes to the trash, not deleted
    assert actions.marks(demo_ws).empty
    assert not list((demo_ws.library / "okapi").glob("img_*"))
    assert [p.name for p in (demo_ws.trash / "library" / "okapi").glob("*")] == [a.rsplit("/")[-1]]


def test_latest_live_mark_wins_and_undo_files(demo_ws, results):
    path = _pick(results, n=1)[0]
    actions.add_to_library(demo_ws, [path], "okapi")  # copy, inbox keeps the file
    actions.discard(demo_ws, [path])
    assert actions.marks(demo_ws)["status"].tolist() == ["discarded"]
    actions.undo_files(demo_ws, [path])
    m = actions.marks(demo_ws)
    assert m["status"].tolist() == ["added"] and m["label"].tolist() == ["okapi"]


def test_marks_survive_a_new_session(demo_ws, results):
    """Marks come from the journal file only: a fresh workspace object sees them."""
    from zoolib.workspace import open_workspace

    paths = _pick(results, n=3)
    actions.add_to_library(demo_ws, paths[:2], "okapi")
    actions.discard(demo_ws, paths[2:])
    again = open_workspace(str(demo_ws.root))
    status = actions.status_of(results["path"], actions.marks(again))
    assert status.value_counts().to_dict() == {"": len(results) - 3, "added": 2, "discarded": 1}


def test_external_inbox_discard_and_undo(demo_ws, tmp_path):
    outside = tmp_path / "elsewhere" / "cam" / "x.jpg"
    outside.parent.mkdir(parents=True)
    outside.write_bytes(b"\xff\xd8fake")
    actions.discard(demo_ws, [outside])
    assert not outside.exists()
    m = actions.marks(demo_ws)
    assert m["path"].tolist() == [str(outside)] and m["status"].tolist() == ["discarded"]
    assert (demo_ws.root / m["dest"].iloc[0]).read_bytes() == b"\xff\xd8fake"
    actions.undo_last(demo_ws)
    assert outside.read_bytes() == b"\xff\xd8fake"


def test_export_selection_writes_rows_with_marks_and_journals(demo_ws, results):
    paths = _pick(results, n=3)
    actions.add_to_library(demo_ws, paths[:1], "okapi")
    out = actions.export_selection(demo_ws, results, paths, "bulkid/r1/sel.csv", run="r1")
    assert out == demo_ws.root / "bulkid" / "r1" / "sel.csv"
    table = pd.read_csv(out, keep_default_na=False)
    assert sorted(table["path"]) == sorted(paths)
    assert "embedding" not in table.columns
    assert table.set_index("path").loc[paths[0], ["status", "label"]].tolist() == ["added",
                                                                                 "okapi"]
    assert table["top5"].str.count(r"\|").eq(4).all()
    last = journal.read(demo_ws).iloc[-1]
    assert last["action"] == actions.EXPORT and last["dest"] == "bulkid/r1/sel.csv"
    with pytest.raises(ZoolibError, match="not in the results"):
        actions.export_selection(demo_ws, results, [demo_ws.library / "lion" / "lion_0000.jpg"],
                                 "x.csv")


def test_export_filters_one_csv_each(tmp_path, demo_ws, results):
    masks = {"all": results["error"] == "", "zebra": results["pred"] == "zebra",
             "none": results["pred"] == "nothing"}
    counts = actions.export_filters(results, masks, tmp_path / "rep")
    assert counts == {"all": int((results["error"] == "").sum()),
                      "zebra": int((results["pred"] == "zebra").sum()), "none": 0}
    for name, n in counts.items():
        assert len(pd.read_csv(tmp_path / "rep" / f"{name}.csv")) == n
