import pytest

from zoolib.workspace import ZoolibError, check_class_name, create, open_workspace


def test_open_missing_workspace_names_it(tmp_path):
    with pytest.raises(ZoolibError, match="does not exist"):
        open_workspace(tmp_path / "nope")


def test_open_empty_string():
    with pytest.raises(ZoolibError, match="WORKSPACE is empty"):
        open_workspace("")


def test_open_folder_without_library(tmp_path):
    with pytest.raises(ZoolibError, match="no library/ folder"):
        open_workspace(tmp_path)


def test_open_empty_library(tmp_path):
    create(tmp_path / "ws")
    with pytest.raises(ZoolibError, match="is empty"):
        open_workspace(tmp_path / "ws")


def test_open_demo(demo_ws):
    ws = open_workspace(str(demo_ws.root))
    assert ws.library == demo_ws.root / "library"
    assert ws.inbox.is_dir()


@pytest.mark.parametrize("name", ["lion", "Grévy's zebra", "red panda", "Unknown"])
def test_plain_names_pass(name):
    assert check_class_name(name) == name


@pytest.mark.parametrize("name,why", [
    ("a/b", "path separator"), ("..", "reserved"), ("x\\y", "path separator"),
    ("tab\there", "control"), (" lion", "spaces"), ("", "empty"), (".hidden", "dot"),
    ("_trash", "reserved"), ("nul", "reserved"), ("x" * 201, "longer"),
])
def test_bad_names_rejected_with_reason(name, why):
    with pytest.raises(ZoolibError, match=why):
        check_class_name(name)


def test_write_atomic_writes_text_bytes_and_through_a_writer(tmp_path):
    from zoolib.workspace import write_atomic

    write_atomic(tmp_path / "a.txt", "hé")
    write_atomic(tmp_path / "b.bin", b"\x00\x01", fsync=True)
    write_atomic(tmp_path / "c.csv", write=lambda p: p.write_text("x\n1\n"))
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "hé"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.csv").read_text() == "x\n1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.csv"]


def test_write_atomic_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from zoolib.workspace import write_atomic

    target = tmp_path / "t.csv"
    target.write_text("old")

    def broken(p):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, write=broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]  # no temporary left behind


def test_file_lock_refuses_another_holder_is_reentrant_and_keeps_its_file(tmp_path):
    import threading

    from zoolib.workspace import file_lock

    path = tmp_path / "a" / "x.lock"
    seen = []

    def other():
        try:
            with file_lock(path, 0, "busy: x"):
                seen.append("held")
        except ZoolibError as exc:
            seen.append(str(exc))

    with file_lock(path, 0):
        with file_lock(path, 0):  # re-entrant within a thread
            t = threading.Thread(target=other)
            t.start()
            t.join()
    assert seen == ["busy: x"] and path.is_file()  # never unlinked on release
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen[-1] == "held"


def test_write_atomic_writes_a_255_byte_name_through_a_short_hidden_temporary(tmp_path):
    import os

    from zoolib import workspace

    target = tmp_path / ("é" * 125 + "x.jpg")  # 255 bytes: the longest name ext4 holds
    seen = []
    workspace.write_atomic(target, write=lambda p: seen.append(p) or p.write_bytes(b"img"))
    temp_path = workspace.temp_path
    assert target.read_bytes() == b"img" and [p.name for p in tmp_path.iterdir()] == [target.name]
    assert seen == [temp_path(target)] and seen[0].name.startswith("." + "é" * 24 + ".")
    assert len(os.fsencode(seen[0].name)) < 140  # short whatever the name
    assert temp_path(target).name != temp_path(tmp_path / "other.jpg").name
    assert f"{os.getpid()}-" in seen[0].name  # the writer's pid (models.remove_dead_temps)
