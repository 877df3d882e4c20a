"""Bulk identification: the streaming engine, resuming, odd files, and the filters."""
import io
import math
import os
import shutil
import struct
import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from filelock import FileLock
from PIL import Image

from zoolib import bulkid, inference, library, models
from zoolib.images import content_hash, load_rgb
from zoolib.workspace import ZoolibError

from .test_models import dead_pid

CLASSES = ["cheetah", "elephant", "flamingo", "leopard", "lion", "okapi", "penguin", "zebra"]


def _generation(ws, size=40, classes=CLASSES, seed=0):
    """Save a random-weight resnet18 generation (the engine does not care how it was trained)."""
    torch.manual_seed(seed)
    info = {"arch": "resnet18", "img_size": size, "mean": list(models.IMAGENET_MEAN),
            "std": list(models.IMAGENET_STD), "classes": classes, "resize": "squish",
            "interpolation": "bilinear"}
    return models.save_generation(ws, models.create_model("resnet18", len(classes)), info)


def _inbox_files(ws):
    return bulkid.list_files(ws.inbox)


@pytest.fixture
def ws(demo_ws):
    _generation(demo_ws)
    return demo_ws


# ----------------------------------------------------------------------------- the engine

def test_run_writes_one_row_per_inbox_file(ws, truth):
    out = bulkid.run(ws, num_workers=0, progress=False)
    files = _inbox_files(ws)
    assert list(out.columns) == bulkid.RESULT_COLUMNS
    assert len(out) == len(files) == len(truth["inbox"]) and out["path"].is_unique
    assert set(out["path"]) == {str(f) for f in files}
    assert (ws.bulkid / "gen-0001-inbox" / "results.parquet").exists()
    assert not list((ws.bulkid / "gen-0001-inbox" / "parts").iterdir())
    assert out.attrs["generation"] == "gen-0001" and out.attrs["classes"] == CLASSES

    bad = out[out["error"] != ""]
    assert sorted(bad["rel"]) == ["inbox/camera1/truncated.jpg", "inbox/camera2/notes.txt"]
    assert bad["pred"].isna().all() and bad["confidence"].isna().all()
    assert all(len(e) == 0 for e in bad["top5"]) and bad["embedding"].isna().all()

    ok = out[out["error"] == ""]
    assert ok["pred"].isin(CLASSES).all() and (ok["generation"] == "gen-0001").all()
    for row in ok.itertuples():
        assert len(row.top5) == 5 and row.top5[0] == row.pred and len(set(row.top5)) == 5
        assert list(row.top5_prob) == sorted(row.top5_prob, reverse=True)
        assert row.confidence == pytest.approx(row.top5_prob[0], abs=1e-6)
        assert row.margin == pytest.approx(row.top5_prob[0] - row.top5_prob[1], abs=1e-6)
        assert 0 <= row.entropy <= math.log(len(CLASSES)) + 1e-6
        assert row.embedding.dtype == np.float16 and row.embedding.shape == (512,)
    first = ok.iloc[0]
    assert first["hash"] == content_hash((ws.root / first["rel"]).read_bytes())
    assert first["rel"] == (ws.root / first["rel"]).relative_to(ws.root).as_posix()


def test_scores_equal_the_inference_module(ws):
    """Same pixels as inference.to_tensor (bit for bit) and the same probabilities."""
    loaded = inference.load(ws, "gen-0001", device="cpu")
    files = _inbox_files(ws)[:6]
    ds = bulkid.ImageFiles(files, loaded.info["img_size"])
    ours = bulkid.normalise(torch.stack([ds[i][0] for i in range(len(ds))]), loaded.info)
    ref = torch.stack([inference.to_tensor(load_rgb(f), loaded.info) for f in files])
    assert ours.shape == (6, 3, 40, 40) and torch.equal(ours, ref)
    assert ours.is_contiguous(memory_format=torch.channels_last)  # oneDNN's faster layout

    out = bulkid.run(ws, files=files, num_workers=0, progress=False).set_index("path")
    probs, feats = inference.forward(loaded, ref)
    for i, f in enumerate(files):
        row = out.loc[str(f)]
        assert row["confidence"] == pytest.approx(float(probs[i].max()), abs=1e-5)
        assert row["pred"] == CLASSES[int(probs[i].argmax())]
        assert np.allclose(row["embedding"].astype(np.float32), feats[i].numpy(), atol=1e-2)
        with torch.inference_mode():
            logits = loaded.model.get_classifier()(feats[i:i + 1])
        assert row["ood"] == pytest.approx(float(-torch.logsumexp(logits, 1)), abs=1e-4)


def _bomb_png() -> bytes:
    """A 100-byte PNG claiming 30000 x 30000 pixels (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


def test_odd_files_modes_orientation_and_bombs(ws):
    folder = ws.root / "odd"
    folder.mkdir()
    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    upright.save(folder / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": stored turned the other way
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "turned.png", exif=exif)
    upright.convert("L").save(folder / "gray.png")
    upright.convert("CMYK").save(folder / "cmyk.jpg")
    upright.convert("P").save(folder / "palette.png")
    upright.convert("RGBA").save(folder / "alpha.png")
    Image.fromarray((rng.integers(0, 65535, (30, 50))).astype(np.uint16)).save(folder / "deep.png")
    (folder / "bomb.png").write_bytes(_bomb_png())
    (folder / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    upright.save(buf, "JPEG")
    (folder / "cut.jpg").write_bytes(buf.getvalue()[:200])
    (folder / "readme.txt").write_text("not an image")

    out = bulkid.run(ws, inbox=folder, name="odd", num_workers=0, progress=False)
    by = out.set_index(out["rel"].str.removeprefix("odd/"))
    assert len(out) == 11
    errors = by.loc[by["error"] != "", "error"]
    assert sorted(errors.index) == ["bomb.png", "cut.jpg", "empty.jpg", "readme.txt"]
    assert "DecompressionBomb" in errors["bomb.png"] and "empty" in errors["empty.jpg"]
    for name in ("gray.png", "cmyk.jpg", "palette.png", "alpha.png", "deep.png"):
        assert by.loc[name, "pred"] in CLASSES and by.loc[name, "error"] == ""
    # EXIF orientation honoured: the turned file gives exactly the upright file's embedding.
    assert np.array_equal(by.loc["turned.png", "embedding"], by.loc["upright.png", "embedding"])
    assert by.loc["turned.png", "hash"] != by.loc["upright.png", "hash"]


def test_workers_give_the_same_rows(ws):
    files = _inbox_files(ws)[:40]
    a = bulkid.run(ws, files=files, name="w0", num_workers=0, batch_size=16, progress=False)
    b = bulkid.run(ws, files=files, name="w2", num_workers=2, batch_size=16, progress=False)
    assert a["path"].tolist() == b["path"].tolist() and a["hash"].tolist() == b["hash"].tolist()
    assert np.allclose(a["confidence"], b["confidence"], equal_nan=True, atol=1e-5)


def test_rows_of_a_read_line_up_with_their_batches(ws):
    """Scores of several batches (one all unreadable) land on the right rows."""
    loaded = inference.load(ws, "gen-0001", device="cpu")

    def scored(conf, top):
        k = len(conf)
        return {"ok": np.ones(k, dtype=bool),
                "top_p": np.array([[c, 0.0] for c in conf], np.float32),
                "top_i": np.array([[t, 0] for t in top]), "margin": np.array(conf),
                "entropy": np.zeros(k), "ood": np.zeros(k), "emb": np.full((k, 2), conf[0])}
    mixed = scored([0.7, 0.6], [1, 2])
    mixed["ok"] = np.array([True, False, True])
    batches = [{"ok": np.zeros(2, dtype=bool)}, scored([0.9], [3]), mixed]
    errors = ["bad", "bad", "", "", "bad", ""]
    table = bulkid.engine._rows(ws, loaded, [f"/x/{i}" for i in range(6)], list("abcdef"), errors,
                         batches).to_pandas()
    assert table["pred"].fillna("-").tolist() == ["-", "-", CLASSES[3], CLASSES[1], "-",
                                                  CLASSES[2]]
    assert np.allclose(table["confidence"], [np.nan, np.nan, 0.9, 0.7, np.nan, 0.6],
                       equal_nan=True)
    assert table["embedding"].isna().tolist() == [True, True, False, False, True, False]
    assert [len(t) for t in table["top5"]] == [0, 0, 2, 2, 0, 2]


def test_batches_read_in_a_row_stay_within_the_memory_cap():
    """Decoding in this process reads up to 4 batches at once, never over 64 MiB of pixels."""
    assert bulkid.engine._read_batches(64, 32) == 4 and bulkid.engine._read_batches(64, 224) == 4
    assert bulkid.engine._read_batches(64, 299) == 3  # 3 x 64 x 299 x 299 x 3 bytes = 51 MiB
    assert bulkid.engine._read_batches(64, 512) == 1 and bulkid.engine._read_batches(512, 1024) == 1
    for batch, size in [(64, 32), (64, 299), (16, 600), (256, 224)]:
        n = bulkid.engine._read_batches(batch, size)
        assert n == 1 or n * batch * size * size * 3 <= 64 << 20


def test_parts_are_flushed_while_running(ws, monkeypatch):
    """Rows reach disk every read of a few batches, not only at the end (memory stays flat)."""
    monkeypatch.setattr(bulkid.parts, "FLUSH_ROWS", 16)
    per_read = 8 * bulkid.engine._read_batches(8, 40)  # rows join the table a read at a time
    parts_seen = []
    parts = ws.bulkid / "gen-0001-inbox" / "parts"
    out = bulkid.run(ws, batch_size=8, num_workers=0, progress=False,
                     on_batch=lambda done, total: parts_seen.append(len(list(parts.iterdir()))))
    assert per_read == 32 and max(parts_seen) >= len(out) // per_read - 1 >= 3
    assert not list(parts.iterdir()) and out["path"].is_unique


class Stop(Exception):
    pass


def _stop_after(batches):
    def hook(done, total):
        if done >= batches * 16:
            raise Stop
    return hook


def test_interrupted_run_leaves_a_table_and_resumes(ws):
    n = len(_inbox_files(ws))
    with pytest.raises(Stop):
        bulkid.run(ws, batch_size=16, num_workers=0, progress=False, on_batch=_stop_after(2))
    run_dir = ws.bulkid / "gen-0001-inbox"
    table = pd.read_parquet(run_dir / "results.parquet")  # a valid table on its own
    assert len(table) == 32 and table["path"].is_unique
    assert len(bulkid.load_results(ws, "gen-0001-inbox")) == 32

    calls = []
    out = bulkid.run(ws, batch_size=16, num_workers=0, progress=False,
                     on_batch=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (n - 32, n - 32)  # only the missing files were processed
    assert len(out) == n and out["path"].is_unique
    assert set(table["path"]) <= set(out["path"])


def test_copies_made_by_sync_tools_are_left_alone_with_a_warning(ws):
    """Dropbox, Syncthing and Finder copies beside the parts and segments must not break
    or double a run: only part-NNNNN / seg-NNNNN files belong to the dataset."""
    n = len(_inbox_files(ws))
    with pytest.raises(Stop):
        bulkid.run(ws, batch_size=16, num_workers=0, progress=False, on_batch=_stop_after(2))
    with pytest.raises(Stop):  # a second interrupted run: a segment
        bulkid.run(ws, batch_size=16, num_workers=0, progress=False, on_batch=_stop_after(1))
    run_dir = ws.bulkid / "gen-0001-inbox"
    (seg,) = (run_dir / "segments").glob("seg-*.parquet")
    copies = [seg.with_name(f"{seg.stem} (1).parquet"),
              seg.with_name(f"{seg.stem}.sync-conflict-20261207-1.parquet")]
    for c in copies:
        c.write_bytes(seg.read_bytes())
    (run_dir / "parts").mkdir(exist_ok=True)
    copies.append(run_dir / "parts" / "part-00002 copy.parquet")
    copies[-1].write_bytes(seg.read_bytes())
    with pytest.warns(UserWarning, match="not part of the results"):
        out = bulkid.run(ws, batch_size=16, num_workers=0, progress=False)
    assert len(out) == n and out["path"].is_unique
    assert len(bulkid.load_results(ws, "gen-0001-inbox")) == n
    assert all(c.exists() for c in copies)  # never deleted


def test_resume_reads_only_the_path_column(ws, monkeypatch):
    with pytest.raises(Stop):
        bulkid.run(ws, batch_size=16, num_workers=0, progress=False, on_batch=_stop_after(2))
    asked, real = [], pq.read_table

    def spy(source, *args, **kwargs):
        asked.append(kwargs.get("columns"))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(bulkid.results.pq, "read_table", spy)
    done = bulkid.results.recover(ws.bulkid / "gen-0001-inbox")
    assert len(done) == 32 and asked == [["path"]]  # one file, its path column


def test_hard_kill_keeps_parts_and_never_duplicates(ws, monkeypatch):
    """A killed process never merges: its parts are read as they are, and a crash
    between merging and removing parts leaves no duplicate row."""
    monkeypatch.setattr(bulkid.parts, "FLUSH_ROWS", 16)
    monkeypatch.setattr(bulkid.engine, "_READ_BATCHES", 1)  # rows join the table batch by batch
    monkeypatch.setattr(bulkid.parts, "consolidate", lambda run_dir: None)  # as if killed
    with pytest.raises(Stop):
        bulkid.run(ws, batch_size=16, num_workers=0, progress=False, on_batch=_stop_after(3))
    monkeypatch.undo()
    run_dir = ws.bulkid / "gen-0001-inbox"
    assert not (run_dir / "results.parquet").exists()
    assert len(list((run_dir / "parts").glob("part-*.parquet"))) == 3
    assert len(bulkid.load_results(ws, "gen-0001-inbox")) == 48

    parts = {p: p.read_bytes() for p in (run_dir / "parts").glob("part-*.parquet")}
    bulkid.parts.consolidate(run_dir)
    for p, data in parts.items():  # as if killed after merging, before removing the parts
        p.write_bytes(data)
    assert len(bulkid.load_results(ws, "gen-0001-inbox")) == 48  # held parts: never read
    first = (run_dir / "results.parquet").read_bytes()
    out = bulkid.run(ws, batch_size=16, num_workers=0, progress=False)
    assert len(out) == len(_inbox_files(ws)) and out["path"].is_unique
    # the rest was appended as a segment: the first file is never rewritten
    assert (run_dir / "results.parquet").read_bytes() == first
    (segment,) = (run_dir / "segments").glob("seg-*.parquet")
    assert len(pd.read_parquet(segment)) == len(out) - 48
    assert not list((run_dir / "parts").iterdir())


def test_embeddings_are_stored_as_float16_bytes(ws):
    """The parquet column holds each row's float16 bytes; load_results gives arrays back."""
    files = _inbox_files(ws)
    out = bulkid.run(ws, files=files, num_workers=0, progress=False).set_index("path")
    stored = pq.read_table(ws.bulkid / "gen-0001-files" / "results.parquet")
    assert stored.schema.field("embedding").type == pa.binary()
    for path, blob in zip(stored.column("path").to_pylist(),
                          stored.column("embedding").to_pylist()):
        emb = out.loc[path, "embedding"]
        if out.loc[path, "error"]:
            assert blob is None and emb is None
        else:
            assert len(blob) == 512 * 2 and emb.dtype == np.float16 and emb.shape == (512,)
            assert np.array_equal(np.frombuffer(blob, dtype="<f2"), emb)
    assert out["embedding"].isna().sum() == 2  # the truncated JPEG and the text file


def test_tables_with_float16_lists_still_load_and_resume(ws):
    """A run written before embeddings were bytes is read, resumed and merged."""
    files = _inbox_files(ws)
    first = bulkid.run(ws, files=files[:20], name="old", num_workers=0, progress=False)
    target = ws.bulkid / "old" / "results.parquet"
    table = pq.read_table(target)
    lists = pa.array([None if e is None else e.tolist() for e in first["embedding"]],
                     type=pa.list_(pa.float16()))
    pq.write_table(table.set_column(table.schema.get_field_index("embedding"), "embedding",
                                    lists), target)
    again = bulkid.load_results(ws, "old")
    assert all(np.array_equal(a, b) for a, b in zip(again["embedding"], first["embedding"])
               if a is not None)
    out = bulkid.run(ws, files=files, name="old", num_workers=0, progress=False)
    assert len(out) == len(files) and out["path"].is_unique
    assert pq.read_schema(target).field("embedding").type == pa.binary()
    by = out.set_index("path")
    for path, emb in zip(first["path"], first["embedding"]):
        assert (emb is None) == (by.loc[path, "embedding"] is None)
        assert emb is None or np.array_equal(by.loc[path, "embedding"], emb)


def test_identify_unknown(ws, truth):
    out = bulkid.identify_unknown(ws, num_workers=0, progress=False)
    assert sorted(out["rel"]) == sorted(f"library/{p}" for p in truth["unknown"])
    assert out.attrs["name"] == "gen-0001-unknown" and (out["error"] == "").all()
    shutil.rmtree(ws.library / "Unknown")
    with pytest.raises(ZoolibError, match="Unknown"):
        bulkid.identify_unknown(ws, progress=False)


def test_bad_input(ws, tmp_path):
    with pytest.raises(ZoolibError, match="does not exist"):
        bulkid.run(ws, inbox=tmp_path / "nowhere", progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_text("x")
    with pytest.raises(ZoolibError, match="empty"):
        bulkid.run(ws, inbox=tmp_path / "empty", progress=False)
    with pytest.raises(ZoolibError, match="gen-0007.*gen-0001"):
        bulkid.run(ws, generation="gen-0007", progress=False)
    with pytest.raises(ZoolibError, match="run name"):
        bulkid.run(ws, name="../escape", progress=False)
    with pytest.raises(ZoolibError, match="batch_size"):
        bulkid.run(ws, batch_size=0, progress=False)
    with pytest.raises(ZoolibError, match="empty list"):
        bulkid.run(ws, files=[], progress=False)
    with pytest.raises(ZoolibError, match="no bulk identification run 'nope'"):
        bulkid.load_results(ws, "nope")
    bulkid.run(ws, files=_inbox_files(ws)[:2], name="mine", num_workers=0, progress=False)
    _generation(ws, seed=1)
    with pytest.raises(ZoolibError, match="made with gen-0001, not gen-0002"):
        bulkid.run(ws, files=_inbox_files(ws)[:2], name="mine", progress=False)
    models.update_info(ws, "gen-0002", resize="crop")
    with pytest.raises(ZoolibError, match="resize='crop'"):
        bulkid.run(ws, generation="gen-0002", progress=False)


@pytest.mark.parametrize("where,match", [
    ("", "is the workspace root"),
    ("..", "contains the workspace /"),
    ("library", "is the workspace's library/"),
    ("library/lion", "is inside the workspace's library/"),
    ("models", "is the workspace's models/"),
    ("models/gen-0001", "is inside the workspace's models/"),
    ("splits", "is the workspace's splits/"),
    ("bulkid/old-run", "is inside the workspace's bulkid/"),
    ("_trash", "is the workspace's _trash/"),
    (".zoolib", "is the workspace's .zoolib/"),
    ("served/ab", "is inside the workspace's served/"),  # one list of internals (Workspace)
    ("cleaning", "is the workspace's cleaning/"),
])
def test_an_inbox_over_workspace_files_is_refused(ws, where, match):
    """Discarding the error rows of such a run would move the database, models and side
    tables to the trash."""
    for folder in ("splits", "bulkid/old-run", "_trash", ".zoolib", "served/ab", "cleaning"):
        (ws.root / folder).mkdir(parents=True, exist_ok=True)
    (ws.root / "zoo.sqlite").write_bytes(b"")
    folder = (ws.root / where).resolve()
    with pytest.raises(ZoolibError, match=match) as err:
        bulkid.run(ws, inbox=folder, num_workers=0, progress=False, knn=False)
    assert f"inbox {folder} " in str(err.value)
    assert not (ws.bulkid / "gen-0001-inbox").exists()  # refused before anything is written


def test_an_inbox_linked_to_the_workspace_is_refused_and_others_are_fine(ws, tmp_path):
    (tmp_path / "link").symlink_to(ws.root, target_is_directory=True)
    with pytest.raises(ZoolibError, match="is the workspace root"):
        bulkid.run(ws, inbox=tmp_path / "link", progress=False, knn=False)
    (tmp_path / "linked-library").symlink_to(ws.library / "lion", target_is_directory=True)
    with pytest.raises(ZoolibError, match="is inside the workspace's library/"):
        bulkid.run(ws, inbox=tmp_path / "linked-library", progress=False, knn=False)
    store = tmp_path / "store"  # the models kept elsewhere, linked into the workspace
    store.mkdir()
    ws.models.rename(store / "models")
    ws.models.symlink_to(store / "models", target_is_directory=True)
    with pytest.raises(ZoolibError, match=r"inbox .*/store contains the workspace's models/ "
                                          r"\(linked from"):
        bulkid.run(ws, inbox=store, progress=False, knn=False)
    outside = tmp_path / "camera"  # beside the workspace, not holding it: fine
    shutil.copytree(ws.inbox / "camera2", outside)
    out = bulkid.run(ws, inbox=outside, name="outside", num_workers=0, progress=False, knn=False)
    assert len(out) == len(bulkid.list_files(outside)) > 0


def test_links_and_pipes_get_an_error_row_and_are_never_opened(ws, tmp_path):
    inbox = tmp_path / "drop"
    (inbox / "sub").mkdir(parents=True)
    lion = sorted((ws.library / "lion").iterdir())[0]
    shutil.copy(lion, inbox / "real.jpg")
    (inbox / "to_library.jpg").symlink_to(lion)  # a file outside the inbox
    (inbox / "to_database").symlink_to(ws.root / "zoo.sqlite")
    (inbox / "to_folder").symlink_to(ws.library / "zebra", target_is_directory=True)
    (inbox / "sub" / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    os.mkfifo(inbox / "pipe")  # opening it would block the run for ever
    out = bulkid.run(ws, inbox=inbox, name="links", num_workers=0, progress=False, knn=False)
    by = out.set_index(out["path"].map(lambda p: os.path.relpath(p, inbox)))
    assert sorted(by.index) == ["pipe", "real.jpg", "sub/broken.jpg", "to_database",
                                "to_folder", "to_library.jpg"]  # nothing skipped silently
    for name in ("to_library.jpg", "to_database", "to_folder", "sub/broken.jpg"):
        assert by.loc[name, "error"] == bulkid.LINK_ERROR and pd.isna(by.loc[name, "pred"])
        assert by.loc[name, "hash"] == ""  # never read
    assert by.loc["pipe", "error"] == bulkid.SPECIAL_ERROR
    assert by.loc["real.jpg", "error"] == "" and by.loc["real.jpg", "pred"] in CLASSES
    # Given as files, a link is not followed either.
    out = bulkid.run(ws, files=[inbox / "to_library.jpg", inbox / "real.jpg"], name="given",
                     num_workers=0, progress=False, knn=False)
    assert out["error"].tolist() == [bulkid.LINK_ERROR, ""]


def _temp(folder, name, pid):
    """A temporary as write_atomic names it, of process `pid`."""
    path = folder / f".{name}.{pid}-1.tmp"
    path.write_bytes(b"half a file")
    return path


def test_leftovers_of_a_killed_run_are_cleaned_on_the_next_run(ws, monkeypatch, capsys):
    files = _inbox_files(ws)[:20]
    monkeypatch.setattr(bulkid.parts, "FLUSH_ROWS", 4)
    monkeypatch.setattr(bulkid.engine, "_READ_BATCHES", 1)
    monkeypatch.setattr(bulkid.parts, "consolidate", lambda run_dir: None)  # killed: no merge
    bulkid.run(ws, files=files, name="k", batch_size=4, num_workers=0, progress=False,
               knn=False)
    monkeypatch.undo()
    run_dir = ws.bulkid / "k"
    assert len(list((run_dir / "parts").glob("part-*.parquet"))) == 5
    dead = [_temp(run_dir, "results.parquet", dead_pid()),
            _temp(run_dir / "parts", "part-00006.parquet", dead_pid())]
    live = _temp(run_dir, "results.parquet", os.getpid())  # a writer still at work: kept
    capsys.readouterr()
    out = bulkid.run(ws, files=files, name="k", num_workers=0, progress=False, knn=False)
    said = capsys.readouterr().out
    assert "merged 5 part(s) left by an interrupted run" in said
    assert said.count("leftover(s) of a killed process") == 2 and dead[0].name in said
    assert not any(p.exists() for p in dead) and live.exists()
    assert not list((run_dir / "parts").iterdir()) and len(out) == 20
    assert len(pq.read_table(run_dir / "results.parquet")) == 20


def test_a_corrupt_results_table_is_named_then_set_aside_and_redone(ws, capsys):
    files = _inbox_files(ws)[:12]
    bulkid.run(ws, files=files, name="c", num_workers=0, progress=False, knn=False)
    target = ws.bulkid / "c" / "results.parquet"
    target.write_bytes(b"\x89PNG garbage, not parquet" * 10)
    with pytest.raises(ZoolibError, match=r"results.parquet is not a readable results table "
                                          r".*run bulk identification again with name='c'"):
        bulkid.load_results(ws, "c")
    calls = []
    capsys.readouterr()
    out = bulkid.run(ws, files=files, name="c", num_workers=0, progress=False, knn=False,
                     on_batch=lambda done, total: calls.append(total))
    assert "renamed it results.parquet.corrupt-" in capsys.readouterr().out
    (aside,) = (ws.bulkid / "c").glob("results.parquet.corrupt-*")  # kept, never deleted
    assert aside.read_bytes().startswith(b"\x89PNG garbage")
    assert calls[-1] == 12 and len(out) == 12 and out["path"].is_unique


def test_a_corrupt_table_with_parts_is_rebuilt_from_them(ws, monkeypatch):
    files = _inbox_files(ws)[:12]
    bulkid.run(ws, files=files[:4], name="p", num_workers=0, progress=False, knn=False)
    monkeypatch.setattr(bulkid.parts, "consolidate", lambda run_dir: None)  # killed: no merge
    bulkid.run(ws, files=files[:8], name="p", num_workers=0, progress=False, knn=False)
    monkeypatch.undo()
    (ws.bulkid / "p" / "results.parquet").write_bytes(os.urandom(300))
    calls = []
    out = bulkid.run(ws, files=files, name="p", num_workers=0, progress=False, knn=False,
                     on_batch=lambda done, total: calls.append(total))
    assert calls[-1] == 8  # the 4 rows of the part stay; the corrupt file's 4 are redone
    assert sorted(out["path"]) == sorted(map(str, files))


def test_a_run_going_on_elsewhere_is_refused_and_a_damaged_run_json_named(ws):
    files = _inbox_files(ws)[:2]
    bulkid.run(ws, files=files, name="busy", num_workers=0, progress=False, knn=False)
    with FileLock(ws.bulkid / "busy" / ".lock"):  # as if another process were running it
        with pytest.raises(ZoolibError, match="'busy' is already going on in another process"):
            bulkid.run(ws, files=files, name="busy", progress=False, knn=False)
    (ws.bulkid / "busy" / "run.json").write_bytes(b"\x00\xff{")
    with pytest.raises(ZoolibError, match=r"busy/run.json is unreadable .*delete the folder"):
        bulkid.load_results(ws, "busy")
    with pytest.raises(ZoolibError, match=r"busy/run.json is unreadable"):
        bulkid.run(ws, files=files, name="busy", progress=False, knn=False)


# ----------------------------------------------------------------------------- the filters

def _table(rows, generation="gen-0001", classes=CLASSES):
    """A hand-made results table: rows of (rel, pred, confidence, embedding or None)."""
    recs = []
    for rel, pred, conf, emb in rows:
        err = "" if pred else "OSError: broken"
        recs.append({
            "path": f"/ws/{rel}", "rel": rel, "hash": rel, "pred": pred or None,
            "confidence": conf if pred else np.nan,
            "top5": [pred] if pred else [], "top5_prob": [conf] if pred else [],
            "margin": conf / 2 if pred else np.nan, "entropy": 1 - conf if pred else np.nan,
            "ood": -5 * conf if pred else np.nan,
            "embedding": np.asarray(emb, dtype=np.float16) if pred else None,
            "generation": generation, "error": err})
    frame = pd.DataFrame(recs, columns=bulkid.RESULT_COLUMNS)
    frame.attrs.update(generation=generation, classes=classes)
    return frame


@pytest.fixture
def results():
    return _table([
        ("a.jpg", "okapi", 0.9, [1, 0, 0]),
        ("b.jpg", "okapi", 0.4, [0.9, 0.1, 0]),
        ("c.jpg", "leopard", 0.3, [0, 1, 0]),
        ("d.jpg", "leopard", 0.95, [0, 0.9, 0.2]),
        ("e.jpg", "flamingo", 0.6, [0, 0, 1]),
        ("f.jpg", "penguin", 0.2, [0.7, 0.7, 0]),
        ("g.jpg", "lion", 0.8, [-1, 0, 0]),
        ("h.jpg", None, None, None),
    ])


@pytest.fixture
def manifest(demo_ws):
    return library.scan(demo_ws, progress=False)


def test_low_count_classes(results, manifest):
    # Demo library: okapi 37, penguin 48, flamingo 50 readable.
    out = bulkid.low_count_classes(results, manifest, max_count=40)
    assert out["rel"].tolist() == ["a.jpg", "b.jpg"]  # okapi only, most confident first
    out = bulkid.low_count_classes(results, manifest, max_count=50)
    assert out["rel"].tolist() == ["a.jpg", "e.jpg", "b.jpg", "f.jpg"]
    assert list(out.columns) == bulkid.RESULT_COLUMNS
    assert bulkid.low_count_classes(results, manifest, max_count=0).empty


def test_synthetic_reliant(results, manifest):
    # Demo meta: flamingo about 80 % staged, penguin about 50 % synthetic, others ~5 %.
    out = bulkid.synthetic_reliant(results, manifest, min_share=0.6)
    assert out["rel"].tolist() == ["e.jpg"]
    out = bulkid.synthetic_reliant(results, manifest, min_share=0.3)
    assert out["rel"].tolist() == ["e.jpg", "f.jpg"]
    with pytest.raises(ZoolibError, match="min_share"):
        bulkid.synthetic_reliant(results, manifest, min_share=1.5)


def test_lookalikes(results):
    assert bulkid.lookalikes(results, "leopard", 0.5)["rel"].tolist() == ["c.jpg"]
    assert bulkid.lookalikes(results, "leopard", 0.99)["rel"].tolist() == ["c.jpg", "d.jpg"]
    assert bulkid.lookalikes(results, "zebra", 0.99).empty  # a class, none predicted
    with pytest.raises(ZoolibError, match="'jaguar' is not a class of gen-0001"):
        bulkid.lookalikes(results, "jaguar", 0.5)


def test_lowest_scores(results):
    assert bulkid.lowest_scores(results, n=3)["rel"].tolist() == ["f.jpg", "c.jpg", "b.jpg"]
    assert bulkid.lowest_scores(results, threshold=0.35)["rel"].tolist() == ["f.jpg", "c.jpg"]
    assert bulkid.lowest_scores(results, n=1, threshold=0.35)["rel"].tolist() == ["f.jpg"]
    assert bulkid.lowest_scores(results, n=2, by="ood")["rel"].tolist() == ["f.jpg", "c.jpg"]
    assert bulkid.errors(results)["rel"].tolist() == ["h.jpg"]
    with pytest.raises(ZoolibError, match="needs n"):
        bulkid.lowest_scores(results)
    with pytest.raises(ZoolibError, match="by must be"):
        bulkid.lowest_scores(results, n=2, by="pred")


def test_lowest_scores_default_to_knn_where_the_table_has_it(results):
    assert results["knn"].isna().all()  # a table without the score: confidence
    assert bulkid.mass_removal_score(results) == "confidence"
    scored = results.assign(knn=np.linspace(0.9, 0.1, len(results)))
    assert bulkid.mass_removal_score(scored) == "knn"
    ok = scored[scored["error"] == ""]
    assert bulkid.lowest_scores(scored, n=2)["rel"].tolist() == ok["rel"].head(2).tolist()


def test_more_like_this(results):
    out = bulkid.more_like_this(results, "a.jpg", k=3)
    assert out["rel"].tolist() == ["b.jpg", "f.jpg", "c.jpg"]
    assert out["similarity"].iloc[0] == pytest.approx(0.9 / math.hypot(0.9, 0.1), abs=1e-3)
    assert bulkid.more_like_this(results, "/ws/a.jpg", k=12)["rel"].tolist()[-1] == "g.jpg"
    with pytest.raises(ZoolibError, match="not in this results table"):
        bulkid.more_like_this(results, "zzz.jpg")
    with pytest.raises(ZoolibError, match="could not be read"):
        bulkid.more_like_this(results, "h.jpg")


def test_filters_combine(results, manifest):
    rare = bulkid.low_count_classes(results, manifest, max_count=50)
    out = bulkid.lookalikes(rare, "okapi", 0.5)
    assert out["rel"].tolist() == ["b.jpg"]
    assert bulkid.lowest_scores(rare, n=1)["rel"].tolist() == ["f.jpg"]


def test_filed_unknown_and_combine(results):
    unknown = _table([("library/Unknown/u1.jpg", "okapi", 0.5, [1, 0, 0]),
                      ("library/Unknown/u2.jpg", "lion", 0.9, [0, 1, 0]),
                      ("library/Unknown/u3.png", None, None, None)])
    unknown.attrs["name"] = "gen-0001-unknown"
    results.attrs["name"] = "gen-0001-inbox"
    both = bulkid.combine(results, unknown, unknown.iloc[:1])  # a repeated path counts once
    assert len(both) == len(results) + 3 and both["path"].is_unique
    assert both.attrs == {"name": "gen-0001-inbox+gen-0001-unknown",
                          "generation": "gen-0001", "classes": CLASSES}
    assert bulkid.combine(results, unknown.iloc[:0]).attrs["name"] == "gen-0001-inbox"
    # Readable Unknown rows only, the likeliest label first; the inbox rows are not.
    assert bulkid.filed_unknown(both)["rel"].tolist() == ["library/Unknown/u2.jpg",
                                                          "library/Unknown/u1.jpg"]
    assert bulkid.filed_unknown(results).empty
    other = _table([("library/Unknown/u9.jpg", "lion", 0.5, [1, 1, 1])], "gen-0002")
    with pytest.raises(ZoolibError, match="different generations \\(gen-0001, gen-0002\\)"):
        bulkid.combine(results, other)
    with pytest.raises(ZoolibError, match="at least one"):
        bulkid.combine()


def test_filters_refuse_another_generation(results, manifest):
    assert bulkid.check_generation(results, "gen-0001") is results
    with pytest.raises(ZoolibError, match="comes from gen-0001, not gen-0002"):
        bulkid.check_generation(results, "gen-0002")
    with pytest.raises(ZoolibError, match="not gen-0002"):
        bulkid.low_count_classes(results, manifest, 40, generation="gen-0002")
    with pytest.raises(ZoolibError, match="not gen-0002"):
        bulkid.synthetic_reliant(results, manifest, 0.5, generation="gen-0002")
    with pytest.raises(ZoolibError, match="not gen-0002"):
        bulkid.lookalikes(results, "okapi", 0.5, generation="gen-0002")
    mixed = pd.concat([results, _table([("z.jpg", "lion", 0.5, [1, 1, 1])], "gen-0002")])
    with pytest.raises(ZoolibError, match="mixes generations gen-0001, gen-0002"):
        bulkid.lookalikes(mixed, "lion", 0.9)
    with pytest.raises(ZoolibError, match="mixes generations"):
        bulkid.more_like_this(mixed, "a.jpg")


def test_filters_on_a_real_run(ws, manifest):
    out = bulkid.run(ws, num_workers=0, progress=False)
    top = out.loc[out["error"] == "", "pred"].value_counts().index[0]
    lows = bulkid.lookalikes(out, top, 1.01, generation="gen-0001")
    assert len(lows) == (out["pred"] == top).sum() and lows["confidence"].is_monotonic_increasing
    near = bulkid.more_like_this(out, lows["rel"].iloc[0], k=5)
    assert len(near) == 5 and near["similarity"].is_monotonic_decreasing
    assert near["similarity"].between(-1.001, 1.001).all()
