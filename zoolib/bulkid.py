"""Bulk identification: streaming batch inference over an inbox into a results table.

`run(workspace, generation, inbox)` predicts every file under a folder (any depth)
and writes `WORKSPACE/bulkid/<name>/results.parquet`, one row per file. The
filters below are plain pandas functions over that table; each returns a subset
with the same columns, so they combine by nesting calls.

How a run streams and resumes:

- A torch DataLoader over the file list reads, hashes, decodes and resizes in
  worker processes while the main process runs the model, so memory holds a few
  batches whatever the inbox size. (On a small CPU-only machine the default is
  to decode in the main process, a few batches at a time: there no core is
  idle to overlap with.) Plain JPEGs are decoded by simplejpeg, the rest by
  Pillow, to the same pixels (`images.squished_pixels`). Workers hand over
  uint8 pixels (4x less to copy than floats); normalisation happens per batch,
  on the model's device, with the same float32 operations as
  `inference.to_tensor` (bit for bit), into channels-last memory, which the
  model runs faster on.
- Finished rows are flushed every few seconds to `parts/part-NNNNN.parquet`
  (each written to a temporary name and renamed, so a part is whole or absent).
  At the end, or when the run is interrupted by an exception, results.parquet
  and the parts are merged into a new results.parquet (atomic rename) and the
  parts removed. Even after a hard kill the table is valid: `load_results` reads
  results.parquet plus any parts, and every merge keeps one row per path.
- Re-running with the same name skips every path already in the table. One
  process at a time runs a given name (a lock file, `bulkid/<name>/.lock`); it
  starts by cleaning up after a killed run: temporaries of dead processes are
  removed, parts left over are merged, and a table that cannot be read is
  renamed `results.parquet.corrupt-<time>` (never deleted) and its images
  identified again. Each of these is said in a printed line.

What is identified: every file under the inbox, any depth, except hidden ones
(names starting with "."; hidden folders are not entered). Symbolic links are
never followed: a link (to a file or a folder) gets a row with the error "is a
symbolic link; zoolib does not follow links", and so does a pipe, socket or
device, which is never opened; nothing is skipped silently. An inbox that is,
holds or lies inside the workspace's own files (its root, library, models,
splits, bulkid, _trash, .zoolib or zoo.sqlite) is refused: discarding its error
rows would move the workspace's files to the trash.

Scores:

- confidence: the top softmax probability; margin: top-1 minus top-2
  probability; entropy: of the softmax, in nats (0 = certain, log(classes) = flat).
- ood: the energy score of Liu et al. 2020, ``-logsumexp(logits)``. Higher means
  more out-of-distribution. Unlike ``1 - confidence`` it keeps the logits' scale,
  which falls for inputs unlike anything seen in training (junk, new species),
  even when the softmax happens to be peaked.
- knn: 1 - cosine similarity to the 10th nearest training image of the generation,
  in the pooled features of the network's stage before the last (Sun et al.
  2022; see zoolib/neighbours.py for why that stage). Higher means farther from
  everything the model was trained on; NaN in runs made with `knn=False`.
- embedding: the pre-logit features (float16), for "more like this". The parquet
  file stores each row's as one binary value (the little-endian float16 bytes):
  pyarrow reads and writes a float16 list value by value, ~10x slower, which
  at 32 px cost as much as decoding the images. `load_results` gives them back
  as float16 arrays.
"""
from __future__ import annotations

import json
import os
import re
import stat
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from . import inference, neighbours
from .images import RESAMPLE, content_hash, read_file, squished_pixels
from .library import class_counts
from .models import remove_dead_temps, resolve_generation
from .workspace import UNKNOWN, Workspace, ZoolibError, open_workspace, write_atomic

RESULT_COLUMNS = ["path", "rel", "hash", "pred", "confidence", "top5", "top5_prob", "margin",
                  "entropy", "ood", "knn", "embedding", "generation", "error"]
SCHEMA = pa.schema([
    ("path", pa.string()), ("rel", pa.string()), ("hash", pa.string()), ("pred", pa.string()),
    ("confidence", pa.float64()), ("top5", pa.list_(pa.string())),
    ("top5_prob", pa.list_(pa.float32())), ("margin", pa.float64()),
    ("entropy", pa.float64()), ("ood", pa.float64()), ("knn", pa.float64()),
    ("embedding", pa.binary()),
    ("generation", pa.string()), ("error", pa.string()),
])
_META_KEY = b"zoolib.bulkid"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")
FLUSH_SECONDS = 10.0  # at most this much finished work is lost by a hard kill
FLUSH_ROWS = 4096  # ... or this many rows, whichever comes first
_READ_BATCHES = 4  # model batches decoded in a row when decoding in this process ...
_READ_BYTES = 64 << 20  # ... while their pixels take at most this much (or one batch)
_EMBEDDING = np.dtype("<f2")  # float16, little-endian whatever the machine
# Dictionary-encode only repetitive strings: trying it on embeddings doubles write time.
_DICT_COLUMNS = ["pred", "generation", "error"]
# Snappy saves ~30 % on embeddings but makes writing them 2.5x slower; the rest is small.
_COMPRESSION = {c: "none" if c == "embedding" else "snappy" for c in RESULT_COLUMNS}
LINK_ERROR = "is a symbolic link; zoolib does not follow links"
SPECIAL_ERROR = "is not a regular file (a pipe, socket or device); zoolib does not open it"


# ----------------------------------------------------------------------------- reading files

class ImageFiles(torch.utils.data.Dataset):
    """Files -> (uint8 HWC pixels or zeros, content hash, error) for a DataLoader.

    Every failure (unreadable, truncated, not an image, decompression bomb) is
    returned as an error string, so one bad file never stops a run.

    Args:
        paths: the files, in the order rows are produced.
        size: the square input size from model.json.
        interpolation: the resize filter from model.json.
        decode: the decode mode from model.json ("full" when it has none).
        refused: path -> error for files that must not be opened (links, pipes:
            see `_not_regular`); they get that error without being read.
    """

    def __init__(self, paths: list[str | Path], size: int, interpolation: str = "bilinear",
                 refused: dict[str, str] | None = None, decode: str = "full"):
        self.paths, self.size = [str(p) for p in paths], int(size)
        self.interpolation, self.refused, self.decode = interpolation, refused or {}, decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        if self.refused and self.paths[i] in self.refused:
            return self._blank(), "", self.refused[self.paths[i]]
        try:
            data = read_file(self.paths[i])
        except OSError as exc:
            return self._blank(), "", f"{type(exc).__name__}: {exc}"
        digest = content_hash(data)
        if not data:
            return self._blank(), digest, "empty file (0 bytes)"
        try:
            # Decoded like training (EXIF upright, RGB) and squish-resized: the pixels
            # of inference.to_tensor before the float conversion.
            pixels = squished_pixels(data, self.size, self.interpolation, self.decode)
            return torch.from_numpy(pixels), digest, ""
        except Exception as exc:  # noqa: BLE001 - any decoder failure becomes a row's error
            return self._blank(), digest, f"{type(exc).__name__}: {exc}"

    def _blank(self) -> torch.Tensor:
        """Zero pixels standing in for an unreadable file (its row gets no prediction)."""
        return torch.zeros((self.size, self.size, 3), dtype=torch.uint8)


def normalise(batch: torch.Tensor, info: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 NHWC pixels -> normalised NCHW float32, equal to `inference.to_tensor` per image.

    The result is an NCHW view of channels-last memory (the decoders' HWC order):
    on a CPU, oneDNN convolutions run faster on it (resnet18: 1.5x at 224 px,
    1.07x at 32 px; efficientnet_b0 1.7x at 224 px), and the arithmetic is done
    in place on the contiguous batch, the same values as `(x - mean) / std`.
    """
    mean = torch.tensor(info["mean"], device=device)
    std = torch.tensor(info["std"], device=device)
    x = batch.to(device, non_blocking=True).float()
    return x.div_(255.0).sub_(mean).div_(std).permute(0, 3, 1, 2)


def list_files(folder: Path) -> list[Path]:
    """Every non-hidden entry under `folder` that is not a folder, sorted.

    Any depth; hidden names (".") are skipped and hidden folders not entered.
    Symbolic links (to files or folders, or broken) are listed as themselves and
    never followed, and so are pipes, sockets, devices and folders that cannot be
    listed: `run` gives each an error row (see `_scan`) without opening it, so no
    file is ever left out silently.
    """
    return [Path(p) for p in _scan(folder)[0]]


def _scan(folder: str | Path) -> tuple[list[str], dict[str, str]]:
    """The entries `list_files` lists (as strings, sorted) and the error of each that
    is not a regular file (a link, pipe, socket or device), from one directory walk.

    os.scandir tells a link or a folder from the directory entry itself, with no
    system call per file (os.walk plus os.path.isfile costs a stat per file).
    """
    top = os.fspath(folder)
    found, refused, todo = [], {}, [top]
    while todo:
        where = todo.pop()
        try:
            entries = os.scandir(where)
        except OSError as exc:
            if where == top:
                raise ZoolibError(f"cannot list the inbox {top}: {exc}") from exc
            refused[where] = f"{type(exc).__name__}: {exc}; the folder's files were not listed"
            found.append(where)
            continue
        with entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_symlink():
                    refused[entry.path] = LINK_ERROR
                elif entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)
                    continue
                elif not entry.is_file(follow_symlinks=False):
                    refused[entry.path] = SPECIAL_ERROR
                found.append(entry.path)
    return sorted(found), refused


def _not_regular(paths: list[str]) -> dict[str, str]:
    """The error of each given path that is a link, pipe, socket or device (one lstat
    each); missing files are left to the reader, which reports them."""
    refused = {}
    for p in paths:
        try:
            mode = os.lstat(p).st_mode
        except OSError:
            continue
        if stat.S_ISLNK(mode):
            refused[p] = LINK_ERROR
        elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            refused[p] = SPECIAL_ERROR
    return refused


# ----------------------------------------------------------------------------- the run

def run(workspace, generation: str = "last", inbox: str | Path | None = None,
        name: str | None = None, batch_size: int = 64, num_workers: int | None = None,
        progress: bool = True, files: list[Path] | None = None,
        on_batch: Callable[[int, int], None] | None = None, device: str | None = None,
        knn: bool = True, runtime: str | None = None) -> pd.DataFrame:
    """Predict every file under an inbox folder into `bulkid/<name>/results.parquet`.

    Args:
        workspace: a workspace path or Workspace.
        generation: "last" (the newest, throw-away runs included) or a generation name.
        inbox: the folder to identify (any depth); WORKSPACE/inbox when None.
        name: the run's folder under bulkid/; "<generation>-inbox" when None
            ("<generation>-files" when `files` is given).
        batch_size: images per forward pass.
        num_workers: decoding processes; None = all spare cores (at most 16) with a
            GPU, none on a CPU with up to 4 cores, else 2 (see `_default_workers`).
        progress: show a progress bar (images/s).
        files: identify exactly these files instead of listing `inbox`.
        on_batch: called after every batch with (rows done in this call, rows to do);
            a widget can show progress with it (an exception raised there stops the
            run after saving what is done).
        device: "cpu", "cuda", ...; None = a GPU if there is one.
        knn: score each image by its distance to the generation's training images
            (the `knn` column; see zoolib/neighbours.py). The first run of a
            generation embeds its training images once (cached).
        runtime: "torch", "onnx" or "onnx-int8" (`inference.RUNTIMES`); None =
            `inference.default_runtime()`: onnx where installed, else torch
            (torch on a GPU). The ONNX ones run on the CPU and export the
            generation on first use (see zoolib/onnx_export.py).

    Symbolic links, pipes, sockets and devices are never opened: each gets a row
    with an error (`LINK_ERROR`, `SPECIAL_ERROR`), as unreadable files do. Hidden
    files are not listed. See the module docstring for how a killed run is
    cleaned up and resumed.

    Returns:
        The whole results table of the run (rows of earlier calls included), with
        columns RESULT_COLUMNS; `attrs` holds generation, classes and name.

    Raises:
        ZoolibError: missing or empty inbox, an inbox that is, holds or lies inside
            workspace internals, unknown generation, bad name or batch size, a run
            of that name made with another generation or going on in another process.
    """
    ws = open_workspace(workspace)
    if int(batch_size) < 1:
        raise ZoolibError(f"batch_size must be at least 1, got {batch_size}")
    loaded = inference.load(ws, generation, device=device, runtime=runtime)
    _check_preprocessing(loaded)
    paths, refused = _input_files(ws, inbox, files)
    name = name or f"{loaded.name}-{'inbox' if files is None else 'files'}"
    run_dir = _run_dir(ws, name)
    with _exclusive(run_dir, name):
        _open_run(run_dir, name, loaded)
        done = _recover(run_dir)
        todo = [p for p in paths if p not in done]
        if todo:
            ref = neighbours.reference(ws, loaded) if knn else None
            _predict(ws, loaded, run_dir, todo, int(batch_size), num_workers, progress,
                     on_batch, ref, refused)
    return load_results(ws, name)


def identify_unknown(workspace, generation: str = "last", name: str | None = None,
                     **kw) -> pd.DataFrame:
    """Bulk-identify the images filed in the library as Unknown.

    Same engine and table as `run`; the run is named "<generation>-unknown" by default.

    Raises:
        ZoolibError: the library has no Unknown folder or it holds no file.
    """
    ws = open_workspace(workspace)
    folder = ws.library / UNKNOWN
    files = list_files(folder) if folder.is_dir() else []
    if not files:
        raise ZoolibError(f"{folder} holds no file to identify")
    gen = resolve_generation(ws, generation, include_throwaway=True)
    return run(ws, gen, name=name or f"{gen}-unknown", files=files, **kw)


def _check_preprocessing(loaded: inference.Loaded) -> None:
    """Refuse a model.json asking for preprocessing this engine does not do."""
    info = loaded.info
    resize, interp = info.get("resize", "squish"), info["interpolation"]
    if resize != "squish" or interp not in RESAMPLE:
        raise ZoolibError(f"{loaded.name}/model.json asks for resize={resize!r}, "
                          f"interpolation={interp!r}; bulk identification does squish "
                          f"with {', '.join(RESAMPLE)}")


def _input_files(ws: Workspace, inbox: str | Path | None, files: list[Path] | None
                 ) -> tuple[list[str], dict[str, str]]:
    """Absolute file paths as strings (rows are keyed by them), without duplicates, and
    the error of each that must not be opened (links, pipes: see `_scan`)."""
    if files is not None:
        paths = [os.path.abspath(os.path.expanduser(f)) for f in files]
        if not paths:
            raise ZoolibError("files is an empty list: nothing to identify")
        paths = list(dict.fromkeys(paths))  # duplicates would duplicate rows
        return paths, _not_regular(paths)
    folder = Path(inbox).expanduser().resolve() if inbox is not None else ws.inbox
    if not folder.is_dir():
        raise ZoolibError(f"inbox {folder} does not exist or is not a folder")
    _check_inbox(ws, folder)
    paths, refused = _scan(folder)
    if not paths:
        raise ZoolibError(f"inbox {folder} is empty: no file to identify")
    return paths, refused


def _internals(ws: Workspace) -> dict[str, Path]:
    """The workspace's own files and folders, by name, with links resolved."""
    named = {"library/": ws.library, "models/": ws.models, "splits/": ws.splits,
             "bulkid/": ws.bulkid, "_trash/": ws.trash, ".zoolib/": ws.cache,
             "zoo.sqlite": ws.journal_db}
    return {k: Path(os.path.realpath(p)) for k, p in named.items()}


def _check_inbox(ws: Workspace, folder: Path) -> None:
    """Refuse an inbox that is the workspace root, holds it, is or lies inside one of
    its internals, or holds one (linked from elsewhere). The workspace's own inbox/,
    its other folders and folders outside it are fine.

    Every file of an inbox gets a row, and discarding a run's error rows moves the
    files to the trash: an inbox over the workspace would trash its database,
    models and side tables (`library/_meta.csv`, `splits/benchmark.csv`).

    Raises:
        ZoolibError: naming the folder and the workspace files it is, holds or lies in.
    """
    real, root = Path(os.path.realpath(folder)), Path(os.path.realpath(ws.root))
    why = ("bulk identification would list them as inbox files, and discarding their error "
           "rows would move them to _trash/; point the inbox at a folder of new images: "
           f"{ws.inbox} or a folder outside the workspace")
    if real == root or real in root.parents:
        what = "is the workspace root" if real == root else f"contains the workspace {root}"
        raise ZoolibError(f"inbox {folder} {what}, with its library, models, splits and "
                          f"database: {why}")
    internals = _internals(ws)
    for label, path in internals.items():
        if real == path or path in real.parents:
            where = "is" if real == path else "is inside"
            raise ZoolibError(f"inbox {folder} {where} the workspace's {label} ({path}), "
                              f"which holds workspace files, not new images: {why}")
    held = [label for label, path in internals.items() if real in path.parents]
    if held:
        raise ZoolibError(f"inbox {folder} contains the workspace's {', '.join(held)} "
                          f"(linked from {ws.root}): {why}")


def _run_dir(ws: Workspace, name: str) -> Path:
    """`bulkid/<name>`, created, for a valid run name."""
    if not _RUN_NAME.match(name):
        raise ZoolibError(f"bulk identification run name {name!r} must be letters, digits, "
                          "'.', '_' or '-' (it becomes a folder name)")
    run_dir = ws.bulkid / name
    (run_dir / "parts").mkdir(parents=True, exist_ok=True)
    return run_dir


@contextmanager
def _exclusive(run_dir: Path, name: str):
    """Hold the run's lock (`<run>/.lock`): a second process running the same name is
    refused, so a run's own cleanup never touches the files of a live one.

    The lock file stays (it is hidden): unlinking it on release would let a
    process that opened the old file lock it while a third locks a new one.
    """
    lock = FileLock(run_dir / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ZoolibError(f"bulk identification run {name!r} is already going on in another "
                          f"process ({run_dir}); wait for it, or choose another name") from None
    try:
        yield
    finally:
        lock.release()


def _read_run_json(run_dir: Path) -> dict:
    """A run's run.json, or a ZoolibError naming it and what to do."""
    path = run_dir / "run.json"
    try:
        meta = json.loads(path.read_bytes())
        if not isinstance(meta, dict) or "generation" not in meta or "classes" not in meta:
            raise ValueError("no generation and classes in it")
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ZoolibError(f"{path} is unreadable ({exc}): it records which generation the "
                          f"run's table comes from; delete the folder {run_dir} to start the "
                          "run over, or choose another name") from exc
    return meta


def _open_run(run_dir: Path, name: str, loaded: inference.Loaded) -> None:
    """Create or reopen a run's run.json, refusing to mix generations in one table."""
    meta = {"name": name, "generation": loaded.name, "classes": list(loaded.classes)}
    if (run_dir / "run.json").exists():
        old = _read_run_json(run_dir)
        if old.get("generation") != loaded.name:
            raise ZoolibError(f"bulk identification run {name!r} was made with "
                              f"{old.get('generation')}, not {loaded.name}: pass "
                              f"generation={old.get('generation')!r} to resume it or "
                              "choose another name")
    else:
        write_atomic(run_dir / "run.json", json.dumps(meta, indent=2))


def _recover(run_dir: Path) -> set[str]:
    """Clean up after a killed run of this folder (under its lock); the paths done.

    Temporaries of dead processes are removed; a table file that cannot be read is
    set aside (`_set_aside`), so its images are identified again; parts left by a
    run that never merged are merged into results.parquet. Each is said.
    """
    remove_dead_temps(run_dir)
    remove_dead_temps(run_dir / "parts")
    done = set(_read_table(run_dir, on_corrupt=_set_aside).column("path").to_pylist())
    parts = sorted((run_dir / "parts").glob("part-*.parquet"))
    if parts:
        _consolidate(run_dir)
        print(f"merged {len(parts)} part(s) left by an interrupted run into "
              f"{run_dir / 'results.parquet'}")
    return done


def _set_aside(path: Path, exc: Exception) -> None:
    """Rename an unreadable table file `<name>.corrupt-<UTC time>` in the run folder
    (never deleted: it may still be recovered by hand), saying so."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    run_dir = path.parent.parent if path.parent.name == "parts" else path.parent
    target = run_dir / f"{path.name}.corrupt-{stamp}"
    path.replace(target)
    print(f"{path} is not a readable results table ({exc}): renamed it {target.name}; "
          "the images it held are identified again")


def _default_workers(cuda: bool) -> int:
    """Decoding processes for a run.

    On a GPU, every spare core (CPU decoding is the bottleneck there). On a CPU
    the model keeps every core busy, so overlap gains nothing: with up to 4 cores
    decoding stays in the main process (measured on 2 cores at 32 px, decoding
    and model only: 0.81-0.85x of the bare forward with no worker, 0.69-0.76x
    with one, even at the idle scheduling class, as it preempts the model's
    thread team); with more, 2 workers and the model gets the other cores.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    if cuda:
        return max(0, min(cores - 1, 16))
    return 0 if cores <= 4 else 2


def _predict(ws: Workspace, loaded: inference.Loaded, run_dir: Path, todo: list[str],
             batch_size: int, num_workers: int | None, progress: bool,
             on_batch: Callable[[int, int], None] | None,
             ref: torch.Tensor | None, refused: dict[str, str] | None = None) -> None:
    """Stream `todo` through the model, flushing parts; always leaves a merged table."""
    cuda = loaded.device.type == "cuda"
    workers = _default_workers(cuda) if num_workers is None else int(num_workers)
    # Decoding in this process: several model batches per read, so the decoder's
    # code and tables stay in cache from one image to the next instead of being
    # evicted by every forward pass (~4 of ~30 us per 32 px image).
    per_read = batch_size * (_read_batches(batch_size, loaded.info["img_size"])
                             if workers == 0 else 1)
    loader = torch.utils.data.DataLoader(
        ImageFiles(todo, loaded.info["img_size"], loaded.info["interpolation"], refused,
                   loaded.info["decode"]),
        batch_size=per_read, shuffle=False,
        num_workers=workers, pin_memory=cuda, persistent_workers=False)
    writer = _PartWriter(run_dir, _schema(loaded))
    threads = torch.get_num_threads()
    if not cuda and workers and threads > 4:
        # On a CPU the decoders and the model share the cores: give the model the
        # others, as an oversubscribed thread team stalls on every preemption.
        torch.set_num_threads(max(1, threads - workers))
    bar = tqdm(total=len(todo), unit="img", desc=f"identifying with {loaded.name}",
               disable=not progress, smoothing=0.1)
    start, done, scored = 0, 0, []  # rows in the table, rows scored, their scores
    try:
        for pixels, hashes, errors in loader:
            for i in range(0, len(hashes), batch_size):
                batch = slice(i, i + batch_size)
                scored.append(_score_batch(loaded, pixels[batch], errors[batch], ref))
                done += len(hashes[batch])
                bar.update(len(hashes[batch]))
                if on_batch is not None:
                    on_batch(done, len(todo))
            # One table per read, not per model batch: Arrow's cost per call, paid
            # cold after every forward pass, was ~10 us per 32 px image per batch.
            writer.add(_rows(ws, loaded, todo[start:done], hashes, errors, scored))
            start, scored = done, []
    finally:
        if scored:  # batches scored before an interruption keep their rows
            n = done - start
            writer.add(_rows(ws, loaded, todo[start:done], hashes[:n], errors[:n], scored))
        torch.set_num_threads(threads)
        bar.close()
        writer.flush()
        _consolidate(run_dir)


def _read_batches(batch_size: int, size: int) -> int:
    """Model batches to decode in a row: up to _READ_BATCHES within _READ_BYTES of pixels."""
    return max(1, min(_READ_BATCHES, _READ_BYTES // (batch_size * int(size) ** 2 * 3)))


@torch.inference_mode()
def _scores(loaded: inference.Loaded, x: torch.Tensor,
            ref: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Probabilities, top-5, margin, entropy, energy, kNN distance and embeddings of a batch.

    One pass of the loaded runtime (`inference.outputs`), keeping the logits
    (the energy score needs them) and computing every score on the model's
    device, so a batch costs one transfer back and no small CPU operations.
    """
    # With knn, the one pass gives the pooled stage features the score needs too.
    heads = inference.outputs(loaded, x, stage=ref is not None)
    probs, logits, feats = heads["probs"], heads["logits"], heads["embedding"]
    top_p, top_i = probs.topk(min(5, probs.shape[1]), dim=1)
    out = {"top_p": top_p, "top_i": top_i, "margin": top_p[:, 0] - top_p[:, 1],
           "entropy": -(probs * probs.clamp_min(1e-12).log()).sum(dim=1),
           "ood": -torch.logsumexp(logits, dim=1), "emb": feats.to(torch.float16)}
    if ref is not None:
        out["knn"] = neighbours.kth_distance(ref, heads["stage"])
    return {k: v.cpu().numpy() for k, v in out.items()}


def _score_batch(loaded: inference.Loaded, pixels: torch.Tensor, errors: list[str],
                 ref: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """`_scores` of a batch's readable images, with `ok` marking which rows they are."""
    ok = np.array([e == "" for e in errors], dtype=bool)
    if not ok.any():
        return {"ok": ok}
    # Index only when needed: a fresh tensor would lose the pinned memory.
    kept = pixels if ok.all() else pixels[torch.from_numpy(ok)]
    return {"ok": ok, **_scores(loaded, normalise(kept, loaded.info, loaded.device), ref)}


def _rows(ws: Workspace, loaded: inference.Loaded, paths: list[str], hashes: list[str],
          errors: list[str], scored: list[dict[str, np.ndarray]]) -> pa.Table:
    """Consecutive batches' rows as one Arrow table (errors keep their row, no prediction)."""
    ok = np.concatenate([b["ok"] for b in scored])
    found = [b for b in scored if "top_i" in b]
    s = {k: np.concatenate([b[k] for b in found]) for k in found[0]} if found else {}
    n, names = len(paths), pa.array(loaded.classes, type=pa.string())
    conf, margin, entropy, ood, knn = (np.full(n, np.nan) for _ in range(5))
    top_i = s.get("top_i", np.zeros((0, 0), dtype=np.int64))
    best = np.zeros(n, dtype=np.int64)
    if s:
        rows = np.flatnonzero(ok)
        conf[rows], margin[rows] = s["top_p"][:, 0], s["margin"]
        entropy[rows], ood[rows], best[rows] = s["entropy"], s["ood"], top_i[:, 0]
        if "knn" in s:
            knn[rows] = s["knn"]
    root = str(ws.root) + os.sep
    # Class names are taken from the class list by index (Arrow's take), and lists
    # are built from flat arrays and offsets: no Python object per value.
    return pa.table({
        "path": paths, "rel": [p[len(root):] if p.startswith(root) else p for p in paths],
        "hash": list(hashes), "pred": names.take(pa.array(best, mask=~ok)), "confidence": conf,
        "top5": _lists(names.take(pa.array(top_i.ravel())), ok),
        "top5_prob": _lists(pa.array(s.get("top_p", np.zeros(0)).ravel(), type=pa.float32()),
                            ok),
        "margin": margin, "entropy": entropy, "ood": ood, "knn": knn,
        "embedding": _blobs(s.get("emb", np.zeros((0, 0))), ok),
        "generation": pa.repeat(pa.scalar(loaded.name), n), "error": list(errors),
    }, schema=SCHEMA)


def _offsets(ok: np.ndarray, width: int) -> np.ndarray:
    """Arrow offsets giving `width` items to each readable row and none to the others."""
    offsets = np.zeros(len(ok) + 1, dtype=np.int32)
    np.cumsum(np.where(ok, width, 0), out=offsets[1:])
    return offsets


def _lists(values: pa.Array, ok: np.ndarray) -> pa.ListArray:
    """A list column: the values shared evenly by the readable rows, in order; the others
    get []."""
    width = len(values) // max(int(ok.sum()), 1)
    return pa.ListArray.from_arrays(pa.array(_offsets(ok, width)), values)


def _blobs(emb: np.ndarray, ok: np.ndarray) -> pa.BinaryArray:
    """The embedding column: one row of `emb` as float16 bytes per readable row, else null."""
    data = np.ascontiguousarray(emb, dtype=_EMBEDDING)
    offsets = _offsets(ok, data.shape[1] * _EMBEDDING.itemsize if data.size else 0)
    valid = pa.array(ok).buffers()[1]  # Arrow's validity bitmap has the bool array's bits
    return pa.BinaryArray.from_buffers(pa.binary(), len(ok), [
        valid, pa.py_buffer(offsets), pa.py_buffer(data.tobytes())], null_count=int((~ok).sum()))


def _float16_rows(column: pa.ChunkedArray) -> list[np.ndarray | None]:
    """The embedding column read back: a float16 array per row (None where null)."""
    blobs = column.combine_chunks()
    # Slices of one float16 view of the data buffer: no bytes object per row.
    values = np.frombuffer(blobs.buffers()[2] or b"", dtype=_EMBEDDING)
    ends = np.frombuffer(blobs.buffers()[1], dtype=np.int32, count=len(blobs) + 1,
                         offset=4 * blobs.offset) // _EMBEDDING.itemsize
    valid = blobs.is_valid().to_numpy(zero_copy_only=False).tolist()
    return [values[a:b] if ok else None
            for a, b, ok in zip(ends[:-1].tolist(), ends[1:].tolist(), valid)]


def _upgrade(table: pa.Table) -> pa.Table:
    """A table of an older layout brought to SCHEMA: a `knn` column (null) added where
    it is missing; embeddings stored as float16 lists converted to bytes."""
    if "knn" not in table.schema.names:
        at = table.schema.get_field_index("ood") + 1
        table = table.add_column(at, "knn", pa.nulls(table.num_rows, type=pa.float64()))
    i = table.schema.get_field_index("embedding")
    if not pa.types.is_list(table.schema.field(i).type):
        return table
    blobs = [None if v is None else np.asarray(v, dtype=_EMBEDDING).tobytes()
             for v in table.column(i).to_pylist()]
    return table.set_column(i, "embedding", pa.array(blobs, type=pa.binary()))


# ----------------------------------------------------------------------------- storage

def _schema(loaded: inference.Loaded) -> pa.Schema:
    """The table schema with the generation and class list in its metadata."""
    meta = {"generation": loaded.name, "classes": list(loaded.classes)}
    return SCHEMA.with_metadata({_META_KEY: json.dumps(meta).encode()})


class _PartWriter:
    """Buffers batches and writes them as numbered, atomically renamed part files."""

    def __init__(self, run_dir: Path, schema: pa.Schema):
        self.dir, self.schema = run_dir / "parts", schema
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pending: list[pa.Table] = []
        self.rows, self.last = 0, time.monotonic()
        numbers = [int(p.stem.split("-")[1]) for p in self.dir.glob("part-*.parquet")]
        self.next = max(numbers, default=0) + 1

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows >= FLUSH_ROWS or time.monotonic() - self.last >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            path = self.dir / f"part-{self.next:05d}.parquet"
            table = pa.concat_tables(self.pending).replace_schema_metadata(self.schema.metadata)
            # fsync: a part counts as done for resume, so it must survive a power cut
            write_atomic(path, write=lambda p: pq.write_table(
                table, p, use_dictionary=_DICT_COLUMNS, compression=_COMPRESSION), fsync=True)
            self.next += 1
        self.pending, self.rows, self.last = [], 0, time.monotonic()


def _sources(run_dir: Path) -> list[Path]:
    """results.parquet first, then the parts in the order they were written."""
    main = run_dir / "results.parquet"
    parts = sorted((run_dir / "parts").glob("part-*.parquet"))
    return ([main] if main.exists() else []) + parts


def _merge(sources: list[Path], out_path: Path, schema: pa.Schema) -> None:
    """Stream `sources` into one Parquet file, keeping the first row of each path."""
    seen: set[str] = set()
    with pq.ParquetWriter(out_path, schema, use_dictionary=_DICT_COLUMNS,
                          compression=_COMPRESSION) as out:
        for src in sources:
            for batch in pq.ParquetFile(src).iter_batches(batch_size=FLUSH_ROWS):
                paths = batch.column("path").to_pylist()
                keep = [p not in seen for p in paths]
                seen.update(paths)
                out.write_table(_upgrade(pa.Table.from_batches([batch]).filter(pa.array(keep))))


def _consolidate(run_dir: Path) -> None:
    """Merge results.parquet and the parts into a new results.parquet, one row per path.

    Streams batch by batch (memory bounded by a batch, not the table); the
    parts are removed only after the new table is in place, and a crash between
    the two steps only leaves rows that the next merge drops as duplicates.
    """
    sources = _sources(run_dir)
    parts = [p for p in sources if p.parent.name == "parts"]
    if not parts:
        return
    target = run_dir / "results.parquet"
    if sources == parts[:1]:  # a first run that fitted in one part: nothing to merge
        parts[0].replace(target)
        return
    schema = SCHEMA.with_metadata(pq.read_schema(parts[-1]).metadata)
    write_atomic(target, write=lambda tmp: _merge(sources, tmp, schema), fsync=True)
    for p in parts:
        p.unlink()


def _read_source(path: Path) -> pa.Table:
    """One table file (results.parquet or a part) in SCHEMA's layout.

    Raises:
        FileNotFoundError: the file is gone (merged by the run meanwhile).
        ValueError: it is not a readable results table (with what is wrong).
    """
    try:
        table = pq.read_table(path)
    except pa.ArrowException as exc:  # ArrowInvalid: "Parquet magic bytes not found", ...
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    missing = [c for c in RESULT_COLUMNS if c not in table.schema.names and c != "knn"]
    if missing:
        raise ValueError(f"it lacks the column(s) {', '.join(missing)}")
    return _upgrade(table)


def _read_sources(run_dir: Path, on_corrupt: Callable[[Path, Exception], None]
                  ) -> list[pa.Table]:
    """The tables of `_sources`, calling `on_corrupt` for each unreadable one.

    A file that vanishes while being read was merged by the run meanwhile: the
    list is read again (a few times at most), so a reader never sees a half set.
    """
    attempts = 5
    while True:
        try:
            tables = [_read_or_report(p, on_corrupt) for p in _sources(run_dir)]
            return [t for t in tables if t is not None]
        except FileNotFoundError:
            attempts -= 1
            if not attempts:
                raise


def _read_or_report(path: Path, on_corrupt: Callable[[Path, Exception], None]
                    ) -> pa.Table | None:
    try:
        return _read_source(path)
    except ValueError as exc:
        on_corrupt(path, exc)
        return None


def _refuse_corrupt(path: Path, exc: Exception) -> None:
    """`on_corrupt` for readers: a ZoolibError naming the file and what to do."""
    run_dir = path.parent.parent if path.parent.name == "parts" else path.parent
    raise ZoolibError(f"{path} is not a readable results table ({exc}): run bulk "
                      f"identification again with name={run_dir.name!r} to set it aside "
                      f"(renamed {path.name}.corrupt-<time>) and identify its images again, "
                      f"or delete the folder {run_dir} to start the run over") from exc


def _read_table(run_dir: Path, on_corrupt: Callable[[Path, Exception], None] = _refuse_corrupt
                ) -> pa.Table:
    """results.parquet plus any parts (a run interrupted hard), one row per path."""
    tables = _read_sources(run_dir, on_corrupt)
    if not tables:
        return SCHEMA.empty_table()
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    if len(tables) > 1:  # one file alone is a merge's output or one run's part: no repeats
        _, first = np.unique(np.asarray(table.column("path").to_pylist(), dtype=object),
                             return_index=True)
        if len(first) < table.num_rows:
            table = table.take(np.sort(first))
    return table.replace_schema_metadata(tables[-1].schema.metadata)


def runs(workspace) -> list[str]:
    """Names of the bulk identification runs in a workspace, sorted."""
    ws = open_workspace(workspace)
    if not ws.bulkid.is_dir():
        return []
    return sorted(p.name for p in ws.bulkid.iterdir() if (p / "run.json").exists())


def load_results(workspace, name: str) -> pd.DataFrame:
    """Read a run's results table (also while it runs or after an interruption).

    Returns:
        One row per file, columns RESULT_COLUMNS; `attrs` holds name,
        generation and classes (the generation's ordered class list).

    Raises:
        ZoolibError: no run of that name (the existing ones are listed), or a file
            of the run that cannot be read (named, with what to do).
    """
    ws = open_workspace(workspace)
    run_dir = ws.bulkid / str(name)
    if not (run_dir / "run.json").exists():
        have = ", ".join(runs(ws)) or "none"
        raise ZoolibError(f"no bulk identification run {name!r} in {ws.bulkid} (runs: {have})")
    meta = _read_run_json(run_dir)
    table = _read_table(run_dir).select(RESULT_COLUMNS)
    frame = table.drop_columns(["embedding"]).to_pandas()
    frame.insert(RESULT_COLUMNS.index("embedding"), "embedding",
                 _float16_rows(table.column("embedding")))
    frame.attrs.update(name=str(name), generation=meta["generation"],
                       classes=list(meta["classes"]))
    return frame


# ----------------------------------------------------------------------------- filters

def _generations(results: pd.DataFrame) -> list[str]:
    return sorted(set(results["generation"].dropna()))


def check_generation(results: pd.DataFrame, generation: str) -> pd.DataFrame:
    """Return `results` unchanged if every row comes from `generation`.

    Raises:
        ZoolibError: the table (or part of it) comes from another generation.
    """
    other = [g for g in _generations(results) if g != generation]
    if other:
        raise ZoolibError(f"this results table comes from {', '.join(other)}, not "
                          f"{generation}: run bulk identification with {generation} first")
    if results.attrs.get("generation") not in (None, generation):
        raise ZoolibError(f"this results table comes from {results.attrs['generation']}, "
                          f"not {generation}")
    return results


def _class_table(results: pd.DataFrame, generation: str | None) -> pd.DataFrame:
    """Check a table is from one generation (the given one, if any); return it."""
    gens = _generations(results)
    if len(gens) > 1:
        raise ZoolibError(f"this results table mixes generations {', '.join(gens)}: "
                          "filter one generation's table at a time")
    return check_generation(results, generation) if generation else results


def _ok(results: pd.DataFrame) -> pd.DataFrame:
    return results[results["error"].fillna("") == ""]


def _by_confidence(rows: pd.DataFrame, ascending: bool) -> pd.DataFrame:
    return rows.sort_values(["confidence", "rel"], ascending=[ascending, True], kind="stable")


def errors(results: pd.DataFrame) -> pd.DataFrame:
    """Rows of files that could not be read (not images, truncated, bombs), by path."""
    return results[results["error"].fillna("") != ""].sort_values("rel", kind="stable")


def low_count_classes(results: pd.DataFrame, manifest: pd.DataFrame, max_count: int,
                      generation: str | None = None) -> pd.DataFrame:
    """Rows predicted as classes with at most `max_count` readable library images.

    Sorted by confidence, highest first: the likeliest new images for rare classes.

    Args:
        results: a results table.
        manifest: the library manifest (`library.scan`).
        max_count: the largest library count that still counts as low.
        generation: if given, the generation the table must come from.
    """
    if int(max_count) < 0:
        raise ZoolibError(f"max_count must be at least 0, got {max_count}")
    rows = _ok(_class_table(results, generation))
    counts = class_counts(manifest).set_index("label")["readable"]
    low = rows["pred"].map(counts).fillna(0) <= int(max_count)  # unknown to the library: 0
    return _by_confidence(rows[low], ascending=False)


def synthetic_reliant(results: pd.DataFrame, manifest: pd.DataFrame, min_share: float,
                      generation: str | None = None) -> pd.DataFrame:
    """Rows predicted as classes whose readable library images are at least `min_share`
    staged or synthetic (so real photos of them are worth adding).

    Sorted by confidence, highest first.
    """
    if not 0.0 <= float(min_share) <= 1.0:
        raise ZoolibError(f"min_share must be between 0 and 1, got {min_share}")
    rows = _ok(_class_table(results, generation))
    counts = class_counts(manifest).set_index("label")
    share = (counts["staged"] + counts["synthetic"]) / counts["readable"].clip(lower=1)
    reliant = rows["pred"].map(share).fillna(0.0) >= float(min_share)
    return _by_confidence(rows[reliant], ascending=False)


def lookalikes(results: pd.DataFrame, cls: str, max_confidence: float,
               generation: str | None = None) -> pd.DataFrame:
    """Rows predicted as `cls` with confidence below `max_confidence`, least sure first.

    Raises:
        ZoolibError: `cls` is not a class of the table's generation.
    """
    rows = _ok(_class_table(results, generation))
    classes = results.attrs.get("classes") or sorted(set(rows["pred"]))
    if cls not in classes:
        gen = ", ".join(_generations(results)) or "this table's generation"
        raise ZoolibError(f"class {cls!r} is not a class of {gen} "
                          f"(classes: {', '.join(classes)})")
    return _by_confidence(rows[(rows["pred"] == cls)
                               & (rows["confidence"] < float(max_confidence))], ascending=True)


# The scores mass removal can sort by: column -> whether a low value is bad.
MASS_REMOVAL_SCORES = {"confidence": True, "margin": True, "ood": False, "knn": False}
# The best at separating junk from animals in the CIFAR replication (bench/replicate.py);
# tables without it (runs made with knn=False, older layouts) fall back to FALLBACK.
DEFAULT_MASS_REMOVAL_SCORE = "knn"
FALLBACK_MASS_REMOVAL_SCORE = "confidence"


def mass_removal_score(results: pd.DataFrame) -> str:
    """The score `lowest_scores` sorts by when not told: the default where the table
    has it, else the fallback."""
    col = DEFAULT_MASS_REMOVAL_SCORE
    has = col in results.columns and results[col].notna().any()
    return col if has else FALLBACK_MASS_REMOVAL_SCORE


def lowest_scores(results: pd.DataFrame, n: int | None = None, threshold: float | None = None,
                  by: str | None = None) -> pd.DataFrame:
    """The worst-scored rows, worst first, for mass removal.

    Args:
        results: a results table.
        n: keep at most this many rows (the bottom n).
        threshold: keep rows scoring below it (above it for "ood" and "knn").
        by: "confidence", "margin" (low is bad), "ood" or "knn" (high is bad);
            None: `mass_removal_score(results)`, the score that separated junk
            from animals best in the CIFAR replication where the table has it.
            Rows with no value for it come last.

    Raises:
        ZoolibError: neither n nor threshold given, n negative, or an unknown `by`.
    """
    by = mass_removal_score(results) if by is None else by
    if by not in MASS_REMOVAL_SCORES:
        raise ZoolibError(f"by must be one of {', '.join(MASS_REMOVAL_SCORES)}, got {by!r}")
    if n is None and threshold is None:
        raise ZoolibError("lowest_scores needs n (bottom N) or threshold (or both)")
    if n is not None and int(n) < 0:
        raise ZoolibError(f"n must be at least 0, got {n}")
    low_is_bad = MASS_REMOVAL_SCORES[by]
    rows = _ok(results).sort_values([by, "rel"], ascending=[low_is_bad, True], kind="stable")
    if threshold is not None:
        rows = rows[rows[by] < threshold] if low_is_bad else rows[rows[by] > threshold]
    return rows if n is None else rows.head(int(n))


def filed_unknown(results: pd.DataFrame, generation: str | None = None) -> pd.DataFrame:
    """Rows of files filed in the library as Unknown (see `identify_unknown`), most
    confident first: a confident prediction is a candidate label for the file."""
    rows = _ok(_class_table(results, generation))
    under = rows["rel"].fillna("").str.startswith(f"library/{UNKNOWN}/")
    return _by_confidence(rows[under], ascending=False)


def combine(*tables: pd.DataFrame) -> pd.DataFrame:
    """Several results tables of one generation as one, a row per path (first wins).

    For one view over the inbox and the library's Unknown folder, say. `attrs` keeps
    the generation and classes, and joins the names of the runs that have rows with "+".

    Raises:
        ZoolibError: no table given, or the tables come from different generations.
    """
    if not tables:
        raise ZoolibError("combine needs at least one results table")
    gens = {t.attrs.get("generation") for t in tables} | {
        g for t in tables for g in _generations(t)}
    gens.discard(None)
    if len(gens) > 1:
        raise ZoolibError(f"these results tables come from different generations "
                          f"({', '.join(sorted(gens))}): identify all with one generation")
    frame = pd.concat(tables, ignore_index=True).drop_duplicates("path", keep="first")
    frame = frame.reset_index(drop=True)
    first = tables[0].attrs
    names = dict.fromkeys(str(t.attrs.get("name", "")) for t in tables if len(t)) or \
        {str(first.get("name", "")): None}
    frame.attrs.update(name="+".join(names), generation=next(iter(gens), None),
                       classes=list(first.get("classes") or []))
    return frame


def _embeddings(rows: pd.DataFrame) -> np.ndarray:
    """Unit-length float32 embedding matrix of rows (one per row)."""
    emb = np.stack([np.asarray(e, dtype=np.float32) for e in rows["embedding"]])
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def more_like_this(results: pd.DataFrame, path_or_rel: str | Path, k: int = 12) -> pd.DataFrame:
    """The `k` rows nearest to one image by cosine similarity of their embeddings.

    The image itself is left out; a `similarity` column (1 = same direction) is added.

    Args:
        results: a results table.
        path_or_rel: the chosen image, as its absolute path or its `rel`.
        k: how many neighbours.

    Raises:
        ZoolibError: the image is not in the table, or could not be read.
    """
    if int(k) < 1:
        raise ZoolibError(f"k must be at least 1, got {k}")
    key = str(path_or_rel)
    match = results[(results["path"] == key) | (results["rel"] == Path(key).as_posix())]
    if match.empty:
        raise ZoolibError(f"{key} is not in this results table")
    query = match.iloc[0]
    if query["error"]:
        raise ZoolibError(f"{key} could not be read ({query['error']}): it has no embedding")
    rows = _ok(_class_table(results, None))
    rows = rows[rows["path"] != query["path"]]
    if rows.empty:
        return rows.assign(similarity=pd.Series(dtype=float))
    sim = _embeddings(rows) @ _embeddings(match.iloc[:1])[0]
    order = np.argsort(-sim, kind="stable")[: int(k)]
    return rows.iloc[order].assign(similarity=sim[order])
