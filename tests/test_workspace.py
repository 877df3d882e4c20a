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
