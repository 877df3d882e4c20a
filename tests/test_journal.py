import pytest

from zoolib import journal
from zoolib.workspace import ZoolibError


def test_trash_and_undo_round_trip(demo_ws):
    src = demo_ws.library / "lion" / "lion_0001.jpg"
    data = src.read_bytes()
    eid = journal.trash(demo_ws, src.relative_to(demo_ws.root), reason="blurry")
    assert not src.exists()
    assert (demo_ws.trash / "library" / "lion" / "lion_0001.jpg").read_bytes() == data
    undo_id = journal.undo(demo_ws, eid)
    assert src.read_bytes() == data
    rows = journal.read(demo_ws)
    assert rows["action"].tolist() == ["trash", "undo"]
    assert rows.set_index("id").loc[eid, "undone"] and rows.set_index("id").loc[undo_id, "undoes"] == eid
    with pytest.raises(ZoolibError, match="already undone"):
        journal.undo(demo_ws, eid)


def test_copy_never_overwrites_and_undo_keeps_the_copy_in_trash(demo_ws):
    src = next(demo_ws.inbox.rglob("*.jpg"))
    folder = demo_ws.library / "lion"
    (folder / src.name).write_bytes(b"existing")
    eid = journal.copy_into(demo_ws, src, folder, label="lion")
    assert (folder / src.name).read_bytes() == b"existing"
    copy = demo_ws.root / journal.read(demo_ws).iloc[-1]["dest"]
    assert copy.read_bytes() == src.read_bytes() and copy.name != src.name
    journal.undo(demo_ws, eid)
    assert not copy.exists() and src.exists()
    assert list(demo_ws.trash.rglob(copy.name))


def test_trash_outside_workspace_refused(demo_ws, tmp_path):
    outside = tmp_path / "x.jpg"
    outside.write_bytes(b"x")
    with pytest.raises(ZoolibError, match="outside the workspace"):
        journal.trash(demo_ws, outside)
    with pytest.raises(ZoolibError, match="no event 99"):
        journal.undo(demo_ws, 99)
