"""Nothing lost, nothing escapes: workspace internals, symbolic links, atomic and
concurrent library actions, class names that collide, hostile image files."""
import io
import multiprocessing as mp
import os

import numpy as np
import pytest
from PIL import Image

from zoolib import actions, curate, journal, library
from zoolib.images import load_rgb, probe, squished_pixels
from zoolib.workspace import ZoolibError, check_class_name, create, open_workspace

INTERNALS = ["zoo.sqlite", "models/deployed.json", "library/_meta.csv", "library/_flags.csv",
             "splits/benchmark.csv", ".zoolib/manifest.parquet", "models/gen-0001/model.json"]


@pytest.fixture
def ws_with_internals(demo_ws):
    journal.record(demo_ws, "note", reason="a row that must survive")
    for rel in INTERNALS[1:]:
        path = demo_ws.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text("path\n")
    return demo_ws


def _inbox_files(ws) -> list:
    return sorted(p for p in ws.inbox.rglob("*") if p.is_file())


def _inventory(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith("zoo.sqlite") and p.name != "actions.lock"}


@pytest.mark.parametrize("rel", INTERNALS)
def test_discard_refuses_workspace_internals(ws_with_internals, rel):
    ws = ws_with_internals
    before = _inventory(ws.root)
    with pytest.raises(ZoolibError, match="workspace internal"):
        actions.discard(ws, [_inbox_files(ws)[0], ws.root / rel])
    assert _inventory(ws.root) == before  # checked before the first move: nothing moved
    assert "a row that must survive" in journal.read(ws)["details"].str.cat()


def test_add_and_journal_trash_refuse_internals(ws_with_internals):
    ws = ws_with_internals
    with pytest.raises(ZoolibError, match="workspace internal"):
        actions.add_to_library(ws, [ws.root / "models" / "deployed.json"], "okapi")
    with pytest.raises(ZoolibError, match="workspace internal"):
        journal.trash(ws, "zoo.sqlite")
    with pytest.raises(ZoolibError, match="workspace internal"):
        journal.trash(ws, "library/../splits/benchmark.csv")
    with pytest.raises(ZoolibError, match="not an image in a class folder"):
        curate.discard(ws, ["../zoo.sqlite"], reason="escape")
    assert (ws.root / "zoo.sqlite").exists() and not (ws.root / "_trash").exists()


def test_batch_failing_midway_is_journaled_and_undone_exactly(demo_ws, monkeypatch):
    files = _inbox_files(demo_ws)[:5]
    real_trash, calls = journal.trash, []

    def flaky(ws, key, reason=""):
        calls.append(key)
        if len(calls) == 4:
            raise OSError("disk failed")
        return real_trash(ws, key, reason=reason)

    monkeypatch.setattr(journal, "trash", flaky)
    with pytest.raises(OSError, match="disk failed"):
        actions.discard(demo_ws, files)
    monkeypatch.undo()
    assert sum(not f.exists() for f in files) == 3
    batch = journal.read(demo_ws, actions.BATCH).iloc[-1]
    assert '"complete": false' in batch["details"]
    assert len(actions.undo_last(demo_ws)) == 3
    assert all(f.exists() for f in files)


def test_symlinks_are_never_followed(demo_ws, tmp_path):
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((demo_ws.library / "lion" / "lion_0000.jpg").read_bytes())
    secret = outside.read_bytes()
    inbox_link = demo_ws.inbox / "link.jpg"
    inbox_link.symlink_to(outside)
    lib_link = demo_ws.library / "lion" / "zz_link.jpg"
    lib_link.symlink_to(demo_ws.library / "zebra" / sorted(os.listdir(demo_ws.library /
                                                                      "zebra"))[0])
    zebra_before = _inventory(demo_ws.library / "zebra")
    # the scan lists the link as unreadable, never reads it
    manifest = library.scan(demo_ws, progress=False)
    row = manifest.set_index("path").loc["lion/zz_link.jpg"]
    assert not row["readable"] and "symbolic link" in row["error"]
    # adding a link is refused; discarding moves the link itself
    with pytest.raises(ZoolibError, match="symbolic link"):
        actions.add_to_library(demo_ws, [inbox_link], "lion", move=True)
    actions.discard(demo_ws, [inbox_link])
    assert outside.read_bytes() == secret and not inbox_link.is_symlink()
    trashed = demo_ws.root / actions.marks(demo_ws)["dest"].iloc[0]
    assert trashed.is_symlink()
    actions.undo_last(demo_ws)
    assert inbox_link.is_symlink() and outside.read_bytes() == secret
    # rotating a library link is refused: the other class's image is untouched
    with pytest.raises(ZoolibError, match="symbolic link"):
        curate.rotate(demo_ws, "lion/zz_link.jpg", 90)
    assert _inventory(demo_ws.library / "zebra") == zebra_before


def test_linked_class_folder_is_refused_by_the_scan(demo_ws, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (demo_ws.library / "tapir").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ZoolibError, match="tapir is a symbolic link"):
        library.scan(demo_ws, progress=False)


def _worker(root, action, paths, barrier):
    ws = open_workspace(root)
    barrier.wait()
    try:
        if action == "add":
            actions.add_to_library(ws, paths, "tapir")
        else:
            actions.discard(ws, paths)
    except Exception as exc:  # noqa: BLE001 - the test reports any failure, raw or clear
        return f"{type(exc).__name__}: {exc}"
    return ""


def test_two_processes_add_and_discard_the_same_files_once(demo_ws):
    paths = [str(p) for p in _inbox_files(demo_ws)[:25]]
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        added = pool.starmap(_worker, [(str(demo_ws.root), "add", paths[:20], barrier)] * 2)
        discarded = pool.starmap(_worker, [(str(demo_ws.root), "discard", paths[20:], barrier)]
                                 * 2)
    assert added == ["", ""] and discarded == ["", ""]
    assert len(list((demo_ws.library / "tapir").iterdir())) == 20  # one copy each
    assert len(list((demo_ws.root / "_trash").rglob("*.jpg"))) == 5  # discarded once each
    assert (actions.marks(demo_ws)["status"].value_counts().to_dict()
            == {"added": 20, "discarded": 5})


def test_recover_reverses_a_row_whose_move_never_happened(demo_ws):
    src = _inbox_files(demo_ws)[0]
    # the row a killed process wrote before it could move the file
    journal.record(demo_ws, "trash", src.relative_to(demo_ws.root).as_posix(),
                   "_trash/" + src.relative_to(demo_ws.root).as_posix(), row_first=True)
    assert actions.marks(demo_ws)["status"].tolist() == ["discarded"]
    actions.discard(demo_ws, [src])  # the next action recovers first, then discards for real
    assert not src.exists()
    assert journal.read(demo_ws, "abandoned").shape[0] == 1
    actions.undo_last(demo_ws)
    assert src.exists() and actions.marks(demo_ws).empty


# ---------------------------------------------------------------- class names

@pytest.mark.parametrize("name, why", [
    ("li\u200bon", "invisible"), ("lion\u202e", "bidirectional"), ("unknown", "reserved"),
    ("UNKNOWN", "reserved"), ("\ufefflion", "invisible")])
def test_bad_class_names_refused(name, why):
    with pytest.raises(ZoolibError, match=why):
        check_class_name(name)


def test_class_names_are_nfc_and_collisions_refused(demo_ws):
    assert check_class_name("cafe\u0301") == "caf\u00e9"
    with pytest.raises(ZoolibError, match="only by case"):
        check_class_name("LION", demo_ws)
    with pytest.raises(ZoolibError, match="only by case"):
        actions.add_to_library(demo_ws, sorted(demo_ws.inbox.rglob("*.jpg"))[:1], "Lion")
    assert check_class_name("lion", demo_ws) == "lion"


def _copy_class(ws, src: str, dest: str, n: int = 45) -> None:
    (ws.library / dest).mkdir()
    for p in sorted((ws.library / src).iterdir())[:n]:
        (ws.library / dest / p.name).write_bytes(p.read_bytes()[:-2] + bytes([len(dest), 0xD9]))


def test_colliding_folders_stop_training_until_merged(demo_ws):
    _copy_class(demo_ws, "lion", "Lion")
    _copy_class(demo_ws, "zebra", "unknown")
    _copy_class(demo_ws, "zebra", "ze\u200bbra")
    manifest = library.scan(demo_ws, progress=False)
    table = library.cutoff_table(manifest, 5).set_index("label")
    assert "same class as 'lion'" in table.loc["Lion", "reason"]
    assert table.loc["unknown", "reason"].startswith("reserved")
    assert "invisible" in table.loc["ze\u200bbra", "reason"]
    assert not table.loc[["Lion", "unknown", "ze\u200bbra"], "included"].any()
    with pytest.raises(ZoolibError, match="merge_classes"):
        library.training_classes(manifest, 5)
    n_lion = len(list((demo_ws.library / "lion").iterdir()))
    curate.discard(demo_ws, ["Lion/" + sorted(os.listdir(demo_ws.library / "Lion"))[0]], "blur")
    event = curate.merge_classes(demo_ws, "Lion", "lion")
    assert not (demo_ws.library / "Lion").exists()
    assert len(list((demo_ws.library / "lion").iterdir())) == n_lion + 45
    flags = library.read_flags(demo_ws)
    assert flags.loc[flags["discard"], "path"].str.startswith("lion/").all()  # flag moved
    curate.undo(demo_ws, event)
    assert len(list((demo_ws.library / "Lion").iterdir())) == 45
    assert library.read_flags(demo_ws).loc[lambda f: f["discard"], "path"].str.startswith(
        "Lion/").all()


# ---------------------------------------------------------------- hostile files

def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG" if img.mode != "I;16B" else "TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGBA", "LA", "I", "F", "I;16", "I;16B",
                                  "CMYK", "YCbCr", "LAB"])
def test_every_mode_the_scan_calls_readable_decodes_for_training(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16B":
        img = Image.frombytes(mode, (20, 16), rng.integers(0, 65535, (16, 20)).astype(">u2")
                              .tobytes())
    else:
        img = Image.new(mode, (20, 16))
    buf = io.BytesIO()
    img.save(buf, "TIFF")
    data = buf.getvalue()
    info = probe(data)
    assert info["readable"], info["error"]
    assert load_rgb(io.BytesIO(data)).mode == "RGB"
    assert squished_pixels(data, 8).shape == (8, 8, 3)


def test_big_endian_16_bit_tiff_trains_and_scales(tmp_path):
    values = np.array([[0, 255, 256, 65535]], dtype=">u2")
    data = io.BytesIO()
    Image.frombytes("I;16B", (4, 1), values.tobytes()).save(data, "TIFF")
    pixels = np.asarray(load_rgb(io.BytesIO(data.getvalue())))[0, :, 0]
    assert pixels.tolist() == [0, 0, 1, 255]


@pytest.mark.parametrize("data, said", [
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(40), "HEIC"),
    (b"%PDF-1.7\n" + bytes(40), "PDF"), (b"<svg xmlns='x'></svg>", "SVG"),
    (b"\x00\x00\x00\x20ftypqt  " + bytes(40), "QuickTime")])
def test_non_images_say_what_they_are(data, said):
    assert said in probe(data)["error"]
    with pytest.raises(ValueError, match=said):
        load_rgb(io.BytesIO(data))


def test_corrupt_side_tables_name_the_file(demo_ws):
    demo_ws.meta_csv.write_bytes(b"\xff\xfe\x00garbage\x81\n\"unclosed")
    with pytest.raises(ZoolibError, match="_meta.csv is not a readable CSV"):
        library.scan(demo_ws, progress=False)
    demo_ws.meta_csv.unlink()
    library.flags_csv(demo_ws).write_bytes(b"path,discard\n\"a,1\n\x80\x81")
    with pytest.raises(ZoolibError, match="_flags.csv is not a readable CSV"):
        library.read_flags(demo_ws)
    with pytest.raises(ZoolibError, match="_flags.csv"):
        curate.discard(demo_ws, ["lion/lion_0000.jpg"], "blur")


def test_workspace_that_is_a_file_says_so(tmp_path):
    (tmp_path / "ws").write_text("x")
    with pytest.raises(ZoolibError, match="is a file, not a folder"):
        open_workspace(tmp_path / "ws")
    with pytest.raises(ZoolibError, match="is a file, not a folder"):
        create(tmp_path / "ws")


def test_training_decode_error_names_the_file(tmp_path):
    from zoolib.loaders import _SquishLoader

    bad = tmp_path / "lion" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(ZoolibError, match=r"cannot decode training image .*broken\.jpg"):
        _SquishLoader(8)({"file": str(bad)})
