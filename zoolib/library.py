"""Scan the labelled library into a manifest DataFrame; class counts and cutoffs.

The scan is incremental: a file whose size and modification time match the
cached manifest (`.zoolib/manifest.parquet`, always rebuildable) is not opened
again. New or changed files are described (read, hashed, decoded) in a process
pool when there are enough of them to pay for starting one, a few chunks of
paths in flight at a time, so memory holds the rows, never a backlog of
results. The rows do not depend on the number of workers.
"""
from __future__ import annotations

import multiprocessing
import os
import unicodedata
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .machine import cores
from .images import content_hash, is_candidate, probe, read_file
from .workspace import (Workspace, ZoolibError, class_folders, is_unknown,
                        name_key, name_problems, open_workspace, write_atomic)

SOURCES = ("real", "staged", "synthetic")
MANIFEST_COLUMNS = ["path", "label", "hash", "width", "height", "mode", "format", "bytes",
                    "mtime_ns", "orientation", "phash", "source", "notes", "readable", "error"]
_FILE_COLUMNS = MANIFEST_COLUMNS[:11] + ["readable", "error"]
_FILE_TYPES = {c: "str" for c in _FILE_COLUMNS} | {  # str: Arrow-backed, no object per row
    "bytes": "int64", "mtime_ns": "int64", "width": "int64", "height": "int64",
    "orientation": "int64", "readable": "bool"}

# A pool pays off only past this many files to describe. Measured with
# `bench/library_scan.py --threshold` (32 px images, 2 cores, a fresh process):
# starting the pool (the forkserver importing zoolib, then two workers) takes
# about 0.7 s, and a pool scan first beat the serial one at 4000 files (0.96x
# the time; 1.12x at 2000, 0.69x at 8000).
POOL_MIN_FILES = 4000
CHUNK = 256  # files per task: ~0.1 s of work, so IPC and the bar's updates stay small
IN_FLIGHT = 2  # chunks queued per worker: keeps every worker busy, memory bounded


def _cache_path(ws: Workspace) -> Path:
    return ws.cache / "manifest.parquet"


def _read_file(path: Path) -> bytes:
    """Read a file's bytes (one place, so tests can count what a scan opens)."""
    return read_file(path)


def _describe(library: Path, path: Path, size: int, mtime_ns: int) -> dict:
    """One file's row (_FILE_COLUMNS); never raises for a bad image."""
    rel = path.relative_to(library)
    row = {"path": rel.as_posix(), "label": rel.parts[0],
           "bytes": size, "mtime_ns": mtime_ns}
    if path.is_symlink():  # listed, never read: its target may lie outside the workspace
        row.update(probe(b""), hash="", error=f"symbolic link to {os.readlink(path)}: zoolib "
                   "never follows links; put the file itself in the library")
        return row
    data = _read_file(path)
    row.update(probe(data), hash=content_hash(data))
    return row


def _list_files(ws: Workspace) -> list[str]:
    """Every file and file link under the class folders (absolute POSIX paths,
    sorted); links are never followed. Strings, not Paths: a million Path objects
    would hold several hundred MB while the scan runs.

    Raises:
        ZoolibError: a class folder is itself a symbolic link.
    """
    files = []
    for folder in class_folders(ws):
        if folder.is_symlink():
            raise ZoolibError(f"library/{folder.name} is a symbolic link to "
                              f"{os.readlink(folder)}: zoolib never follows links (its files "
                              "lie outside the workspace); replace it with a real folder")
        for top, dirs, names in os.walk(folder):  # followlinks=False: linked folders not entered
            here = Path(top)
            files.extend(str(here / n) for n in names if is_candidate(here / n))
            files.extend(str(here / d) for d in dirs if (here / d).is_symlink())
    return sorted(files)


def _read_csv(path: Path, holds: str) -> pd.DataFrame:
    """A side table of the library as strings, or an error that names the file and the fix.

    Args:
        path: the CSV file.
        holds: what the file holds and what deleting it would mean, for the message.
    """
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ZoolibError(f"{path} is not a readable CSV ({type(exc).__name__}: {exc}). It "
                          f"holds {holds}. Fix it in a text editor, or restore an earlier copy "
                          "(the journal keeps every edit: curate.history)") from exc
    if "path" not in table.columns:
        raise ZoolibError(f"{path} has no 'path' column (it holds {holds})")
    return table


def read_meta(ws: Workspace) -> pd.DataFrame:
    """Read `library/_meta.csv` (path, source, notes), validating the sources.

    Raises:
        ZoolibError: the file lacks a path column or names an unknown source.
    """
    if not ws.meta_csv.exists():
        return pd.DataFrame(columns=["path", "source", "notes"])
    meta = _read_csv(ws.meta_csv, META_HOLDS)
    for col in ("source", "notes"):
        if col not in meta.columns:
            meta[col] = ""
    meta["source"] = meta["source"].str.strip().str.lower().replace("", "real")
    bad = meta[~meta["source"].isin(SOURCES)]
    if len(bad):
        row = bad.iloc[0]
        raise ZoolibError(f"{ws.meta_csv}: source {row['source']!r} for {row['path']!r} "
                          f"is not one of {', '.join(SOURCES)}")
    return meta[["path", "source", "notes"]].drop_duplicates("path", keep="last")


FLAG_COLUMNS = ["discard", "reason", "pin"]
META_HOLDS = ("each image's source (real, staged, synthetic) and notes; without it every "
              "image counts as real")
FLAGS_HOLDS = ("discard flags and split pins; without it discarded images rejoin training and "
               "pinned duplicate groups may leak across splits")


def flags_csv(ws: Workspace) -> Path:
    """`library/_flags.csv`: per-image discard flags and split pins (see curate)."""
    return ws.library / "_flags.csv"


def read_flags(ws: Workspace) -> pd.DataFrame:
    """Read `library/_flags.csv` (written by curate.discard / curate.pin).

    Returns:
        Columns path, discard (bool), reason, pin ("" or a split name); empty
        when the file does not exist.
    """
    path = flags_csv(ws)
    if not path.exists():
        return pd.DataFrame({"path": pd.Series(dtype=str), "discard": pd.Series(dtype=bool),
                             "reason": pd.Series(dtype=str), "pin": pd.Series(dtype=str)})
    flags = _read_csv(path, FLAGS_HOLDS)
    for col in FLAG_COLUMNS:
        if col not in flags.columns:
            flags[col] = ""
    flags["discard"] = flags["discard"].str.strip().isin(["1", "true", "True", "yes"])
    return flags[["path"] + FLAG_COLUMNS].drop_duplicates("path", keep="last")


def default_workers() -> int:
    """The scan's default pool: every core this process may use (`machine.cores`)."""
    return cores()


def _frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a frame of _FILE_COLUMNS with fixed dtypes, whatever rows it holds."""
    return pd.DataFrame(rows, columns=_FILE_COLUMNS).astype(_FILE_TYPES)


def _describe_chunk(library: str, chunk: list[tuple[str, int, int]]) -> pd.DataFrame:
    """Rows of a chunk of (path, size, mtime_ns), in order: the task of a worker (and
    of the serial scan). A frame, not dicts: a dict per file costs ~1 KB."""
    root = Path(library)
    return _frame([_describe(root, Path(p), size, mtime) for p, size, mtime in chunk])


def _pool(workers: int) -> ProcessPoolExecutor:
    """A process pool that is safe to start from a notebook kernel.

    forkserver where the OS has it: a plain fork copies the threads' locks
    mid-use (a kernel runs ipykernel's threads, and every tqdm bar starts a
    monitor thread); the server imports zoolib once, so each worker starts warm.
    Like spawn, it imports the main script in each worker: a script needs an
    `if __name__ == "__main__":` guard (see `_worker_died`).
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return ProcessPoolExecutor(workers)  # Windows: spawn
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # no effect once the server runs
    return ProcessPoolExecutor(workers, mp_context=context)


def _worker_died(exc: BrokenProcessPool) -> ZoolibError:
    return ZoolibError(
        f"a library scan worker stopped ({exc}). Either the script that called scan "
        "has no `if __name__ == \"__main__\":` guard (each worker imports it and ran it "
        "again: put the script's code under that guard), or a worker was killed (for "
        "memory?). scan(..., workers=1) scans in this process only")


def _describe_all(library: Path, todo: list[tuple[str, int, int]], workers: int,
                  bar: tqdm) -> Iterator[pd.DataFrame]:
    """Rows of `todo` in its order, from a pool of `workers` processes.

    At most IN_FLIGHT chunks per worker are submitted ahead of the one being
    collected, so pending results never pile up however many files there are.
    """
    with _pool(workers) as pool:
        pending: deque = deque()
        for chunk in _chunks(todo):
            pending.append(pool.submit(_describe_chunk, str(library), chunk))
            if len(pending) >= IN_FLIGHT * workers:
                yield _collect(pending.popleft(), bar)
        while pending:
            yield _collect(pending.popleft(), bar)


def _chunks(todo: list) -> Iterator[list]:
    """`todo` in slices of CHUNK files: the unit of work, in a pool or here."""
    return (todo[i:i + CHUNK] for i in range(0, len(todo), CHUNK))


def _collect(future, bar: tqdm) -> pd.DataFrame:
    rows = future.result()
    bar.update(len(rows))
    return rows


def scan(workspace, progress: bool = True, workers: int | None = None) -> pd.DataFrame:
    """Scan the library into a manifest, opening only new or changed files.

    Args:
        workspace: a workspace path or Workspace.
        progress: show a progress bar while files are decoded.
        workers: processes that describe new or changed files; default
            `default_workers()`. A pool starts only for at least
            POOL_MIN_FILES files (below that, starting it costs more than it
            saves); 1 always scans in this process. The manifest is the same
            for any number.

    Returns:
        One row per file under a class folder, with columns MANIFEST_COLUMNS,
        sorted by path; unreadable files are kept with `readable=False` and the
        error.

    Raises:
        ZoolibError: `workers` is below 1, a class folder is a symbolic link,
            or `library/_meta.csv` is broken.
    """
    if workers is not None and workers < 1:
        raise ZoolibError(f"workers must be at least 1 (or None for all CPUs), got {workers}")
    ws = open_workspace(workspace)
    reused, todo = _reuse_cached(ws)
    files = pd.concat([reused, *_describe_new(ws.library, todo, workers, progress)],
                      ignore_index=True)
    del reused, todo
    _save_cache(ws, files)
    manifest = files.merge(read_meta(ws), on="path", how="left")
    manifest["source"] = manifest["source"].fillna("real")
    manifest["notes"] = manifest["notes"].fillna("")
    return manifest[MANIFEST_COLUMNS].sort_values("path", ignore_index=True)


def _reuse_cached(ws: Workspace) -> tuple[pd.DataFrame, list[tuple[str, int, int]]]:
    """Cached rows of unchanged files, and (path, size, mtime_ns) of the others."""
    listed = []
    for path in _list_files(ws):
        stat = os.lstat(path)  # a link's own size and time: its target is never read
        listed.append((path, stat.st_size, stat.st_mtime_ns))
    cached = cached_files(ws)
    if cached.empty or not listed:
        return cached.iloc[:0], listed
    cut = len(ws.library.as_posix()) + 1  # listed paths start with it: cheaper than relative_to
    at = pd.Index(cached["path"]).get_indexer([p[cut:] for p, _, _ in listed])
    size, mtime = (np.fromiter((x[k] for x in listed), np.int64, len(listed)) for k in (1, 2))
    hit = at >= 0
    hit[hit] = (cached["bytes"].to_numpy()[at[hit]] == size[hit]) & (
        cached["mtime_ns"].to_numpy()[at[hit]] == mtime[hit])
    return cached.iloc[at[hit]], [listed[i] for i in np.flatnonzero(~hit)]


def _describe_new(library: Path, todo: list[tuple[str, int, int]], workers: int | None,
                  progress: bool) -> list[pd.DataFrame]:
    """Rows of `todo` in order, a frame per chunk: in a pool when there are enough
    files, else here."""
    workers = default_workers() if workers is None else workers
    with tqdm(total=len(todo), desc="scanning new or changed files", unit="img",
              disable=not progress or not todo) as bar:
        if workers > 1 and len(todo) >= POOL_MIN_FILES:
            try:
                return list(_describe_all(library, todo, workers, bar))
            except BrokenProcessPool as exc:
                raise _worker_died(exc) from exc
        frames = []
        for chunk in _chunks(todo):
            frames.append(_describe_chunk(str(library), chunk))
            bar.update(len(chunk))
        return frames


def cached_files(ws: Workspace) -> pd.DataFrame:
    """The last scan's rows, unchecked (none when missing, broken or of another layout)."""
    path = _cache_path(ws)
    if not path.exists():
        return _frame([])
    try:
        frame = pd.read_parquet(path)
    except Exception:  # noqa: BLE001 - a broken cache is rebuilt, never fatal
        return _frame([])
    if list(frame.columns) != _FILE_COLUMNS or frame["path"].duplicated().any():
        return _frame([])
    return frame.astype(_FILE_TYPES)


def _save_cache(ws: Workspace, files: pd.DataFrame) -> None:
    """Keep the scan for next time; on a read-only copy of a workspace, say so and go on."""
    path = _cache_path(ws)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, write=lambda p: files.to_parquet(p, index=False))
    except OSError as exc:  # the scan is right without its cache: the next one is slower
        warnings.warn(f"the scan cache {path} was not saved ({exc}); the next scan reads "
                      "every file again", stacklevel=3)


def name_issues(labels) -> dict[str, str]:
    """Class folders whose names cannot train: not plain names, or the same class as
    another folder to a person (differing only by case or Unicode form).

    `unknown` or `UNKNOWN` beside `Unknown` is reported as reserved, not as a
    collision. Merge collisions with `curate.merge_classes`.

    Of names that collide, the one to keep is in NFC form and has the most
    images (then the first in sort order); the others are reported.

    Args:
        labels: one class name per image (a manifest's label column).

    Returns:
        label -> why, for each problem folder (empty when all are fine).
    """
    counts = pd.Series(list(labels), dtype=object).value_counts()
    labels = sorted(counts.index, key=lambda n: (unicodedata.normalize("NFC", n) != n,
                                                 -counts[n], n))
    issues = {}
    for label in labels:
        problems = [] if is_unknown(label) else name_problems(label)  # reserved, not broken
        if problems:
            issues[label] = "is not a plain name: " + ", ".join(problems)
    groups: dict[str, list[str]] = {}
    for label in labels:
        if not is_unknown(label):
            groups.setdefault(name_key(label), []).append(label)
    for names in groups.values():
        for label in names[1:] if len(names) > 1 else []:
            issues.setdefault(label, f"is the same class as {names[0]!r} (differs only by "
                              f"case or accents): merge it with curate.merge_classes(ws, "
                              f"{label!r}, {names[0]!r})")
    return issues


def class_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images per class: all files, readable ones, and unique readable contents.

    Returns:
        Columns label, files, readable, unique, staged, synthetic; sorted by
        readable images, largest first.
    """
    ok = manifest[manifest["readable"]]
    counts = pd.DataFrame({
        "files": manifest.groupby("label").size(),
        "readable": ok.groupby("label").size(),
        "unique": ok.groupby("label")["hash"].nunique(),
        "staged": ok[ok["source"] == "staged"].groupby("label").size(),
        "synthetic": ok[ok["source"] == "synthetic"].groupby("label").size(),
    }).fillna(0).astype(int)
    counts.index.name = "label"
    return counts.reset_index().sort_values(["readable", "label"], ascending=[False, True],
                                            ignore_index=True)


def discarded_paths(ws: Workspace) -> set[str]:
    """Library paths flagged discard in `library/_flags.csv`."""
    flags = read_flags(ws)
    return set(flags.loc[flags["discard"], "path"])


def cutoff_table(manifest: pd.DataFrame, min_images: int = 40,
                 discarded: set[str] | frozenset = frozenset()) -> pd.DataFrame:
    """Which classes take part in training under a `min_images` cutoff.

    A class counts its `eligible` images: readable, not discarded, and each
    content once (an exact duplicate adds nothing for training). The cutoff
    applies to that count, so duplicates and discarded files never lift a class
    over it.

    Args:
        manifest: from `scan`.
        min_images: the least number of eligible images a class needs.
        discarded: library paths flagged discard (`discarded_paths`).

    Returns:
        class_counts plus columns eligible, included (bool), short_by (eligible
        images missing) and reason.
    """
    if min_images < 1:
        raise ZoolibError(f"MIN_IMAGES must be at least 1, got {min_images}")
    table = class_counts(manifest)
    kept = manifest[manifest["readable"] & ~manifest["path"].isin(set(discarded))]
    table["eligible"] = table["label"].map(kept.groupby("label")["hash"].nunique())
    table["eligible"] = table["eligible"].fillna(0).astype(int)
    table["short_by"] = (min_images - table["eligible"]).clip(lower=0)
    reason = pd.Series("", index=table.index)
    reason[table["short_by"] > 0] = "below cutoff"
    reason[table["readable"] == 0] = "no readable image"
    reason[table["label"].map(is_unknown)] = "reserved: Unknown is never a training class"
    for label, why in name_issues(manifest["label"]).items():
        reason[table["label"] == label] = why
    table["reason"] = reason
    table["included"] = reason == ""
    return table[["label", "files", "readable", "unique", "eligible", "staged", "synthetic",
                  "included", "short_by", "reason"]]


def training_classes(manifest: pd.DataFrame, min_images: int = 40,
                     discarded: set[str] | frozenset = frozenset()) -> list[str]:
    """The sorted class list a generation trains on (see `cutoff_table`).

    Raises:
        ZoolibError: a class folder has no readable image (named), or no class
            reaches the cutoff.
    """
    table = cutoff_table(manifest, min_images, discarded)
    empty = table[(table["readable"] == 0) & ~table["label"].map(is_unknown)]
    if len(empty):
        names = ", ".join(f"{r.label!r} ({r.files} files)" for r in empty.itertuples())
        raise ZoolibError(f"class folder(s) with no readable image: {names}; "
                          "fix or remove them (see the curation notebook)")
    issues = name_issues(manifest["label"])
    if issues:
        raise ZoolibError("class folder names to fix before training: " + "; ".join(
            f"{label!r} {why}" for label, why in issues.items()))
    classes = sorted(table.loc[table["included"], "label"])
    if not classes:
        raise ZoolibError(f"no class has at least {min_images} unique, readable, non-discarded "
                          f"images (largest: {table['eligible'].max() if len(table) else 0})")
    return classes
