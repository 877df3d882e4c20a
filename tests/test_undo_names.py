"""Undo of an older relabel refused whole while a later event holds its files; library
file names at the file system's limit (255 bytes) added whole or refused whole."""
import os

import pandas as pd
import pytest

from zoolib import actions, curate, journal, library
from zoolib.workspace import ZoolibError


def _files(ws) -> dict[str, bytes]:
    """Every workspace file's bytes (user files, side tables, trash), the journal's
    database and the lock folder aside: the journal is compared by its rows."""
    return {p.relative_to(ws.root).as_posix(): p.read_bytes() for p in sorted(ws.root.rglob("*"))
            if p.is_file() and not p.name.startswith("zoo.sqlite")
            and ws.cache not in p.parents}


def _state(ws) -> tuple[dict[str, bytes], pd.DataFrame]:
    return _files(ws), journal.read(ws)


def _meta(ws) -> dict[str, str]:
    return dict(zip(*library.read_meta(ws)[["path", "source"]].T.values))


# ----------------------------------------------------------------------------- undo order

@pytest.mark.parametrize("again", ["lion", "leopard"])  # back where it was, or elsewhere
def test_undo_of_an_older_relabel_is_refused_whole_naming_the_later_event(demo_ws, again):
    a, b = "lion/lion_0000.jpg", "lion/lion_0001.jpg"
    curate.set_source(demo_ws, [a, b], "synthetic")
    curate.pin(demo_ws, [b], "train")
    first = curate.relabel(demo_ws, [a, b], "zebra")
    second = curate.relabel(demo_ws, ["zebra/lion_0001.jpg"], again)
    before = _state(demo_ws)

    with pytest.raises(ZoolibError, match=rf"event {second} \(relabel\) first"):
        curate.undo(demo_ws, first)
    after = _state(demo_ws)
    assert after[0] == before[0]  # files and side tables, byte for byte
    pd.testing.assert_frame_equal(after[1], before[1])  # no row written, none undone
    with pytest.raises(ZoolibError, match=rf"event {second} \(relabel\) first"):
        curate.undo(demo_ws, first)  # still refused, not "already undone"

    curate.undo(demo_ws, second)
    curate.undo(demo_ws, first)
    assert (demo_ws.library / a).exists() and (demo_ws.library / b).exists()
    assert not list((demo_ws.library / "zebra").glob("lion_*"))
    meta = _meta(demo_ws)
    assert meta[a] == meta[b] == "synthetic"
    assert not [p for p in meta if p.startswith("zebra/lion_")]  # no orphan rows
    flags = library.read_flags(demo_ws).set_index("path")
    assert flags.loc[b, "pin"] == "train" and not flags.index.str.startswith("zebra/").any()
    assert curate.history(demo_ws).set_index("id").loc[[first, second], "undone"].all()


# ----------------------------------------------------------------------------- long names

LIMIT = 255


def _inbox_file(ws, folder: str, name: str, data: bytes):
    path = ws.inbox / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_a_255_byte_name_and_its_namesake_are_both_added(demo_ws):
    name = "é" * 125 + "x.jpg"  # 2-byte characters: cut at a character boundary
    assert len(name.encode()) == LIMIT
    first = _inbox_file(demo_ws, "camera0", "aaa_first.jpg", b"first")
    one = _inbox_file(demo_ws, "camera0", name, b"one")
    two = _inbox_file(demo_ws, "camera1", name, b"two")

    events = actions.add_to_library(demo_ws, [first, one, two], "tapir")

    assert len(events) == 3
    added = {p.read_bytes(): p.name for p in (demo_ws.library / "tapir").iterdir()}
    assert added[b"first"] == "aaa_first.jpg" and added[b"one"] == name
    counted = added[b"two"]
    assert counted.endswith("~1.jpg") and len(os.fsencode(counted)) <= LIMIT
    assert counted == "é" * 124 + "~1.jpg"  # the stem cut whole characters only
    assert not [p for p in demo_ws.library.rglob(".*")]  # no temporary left
    assert set(library.scan(demo_ws, progress=False).query("label == 'tapir'")["path"]) == {
        f"tapir/{n}" for n in added.values()}


def test_a_name_that_cannot_fit_is_refused_naming_it_with_nothing_added(demo_ws):
    name = "a." + "b" * (LIMIT - 2)  # a suffix too long to leave room for "~1"
    first = _inbox_file(demo_ws, "camera0", "aaa_first.jpg", b"first")
    one = _inbox_file(demo_ws, "camera0", name, b"one")
    two = _inbox_file(demo_ws, "camera1", name, b"two")
    before = _state(demo_ws)

    with pytest.raises(ZoolibError, match=name):
        actions.add_to_library(demo_ws, [first, one, two], "tapir")

    assert not (demo_ws.library / "tapir").exists()
    after = _state(demo_ws)
    assert after[0] == before[0]
    pd.testing.assert_frame_equal(after[1], before[1])


def test_a_name_longer_than_the_library_holds_is_refused(demo_ws, monkeypatch):
    from zoolib import workspace

    monkeypatch.setattr(workspace, "name_limit", lambda folder: 40)  # a stricter file system
    long = _inbox_file(demo_ws, "camera0", "n" * 37 + ".jpg", b"long")  # 41 bytes
    with pytest.raises(ZoolibError, match=r"n{37}\.jpg.* 41 bytes.* 40"):
        actions.add_to_library(demo_ws, [long], "tapir")
    assert not (demo_ws.library / "tapir").exists()
