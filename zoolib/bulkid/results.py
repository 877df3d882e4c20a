"""The results of bulk identification: one run folder per name, written in parts, read back.

A run's table is `WORKSPACE/bulkid/<name>/results.parquet`, one row per file,
columns RESULT_COLUMNS (schema SCHEMA).

How it is written and resumed (a partitioned Parquet dataset, appended to):

- Finished rows are flushed every few seconds to `parts/part-NNNNN.parquet`
  (each written to a temporary name and renamed, so a part is whole or absent).
  At the end of a run, or when it is interrupted by an exception, that run's
  parts are merged into one new file of the dataset: `results.parquet` for the
  first run, `segments/seg-NNNNN.parquet` for each later one. Files already
  there are never rewritten, so a run costs what it adds, not the whole table.
  Each merged file records in its metadata the part numbers it holds
  (`zoolib.parts`); a part whose number a merged file holds is stale (a crash
  between writing the merged file and removing the parts) and is never read, so
  no path has two rows.
- Even after a hard kill the dataset is valid: readers take results.parquet,
  the segments and any parts, in the order they were written.
- Re-running with the same name skips every path already in the table. One
  process at a time runs a given name (a lock file, `bulkid/<name>/.lock`); it
  starts by cleaning up after a killed run: temporaries of dead processes are
  removed, parts left over are merged, and a table file that cannot be read is
  renamed `<file>.corrupt-<time>` (never deleted) and its images identified
  again. Each of these is said in a printed line.
- A merged file repeating an earlier one (a copy under a valid name such as
  `seg-00099.parquet`: the same part numbers, or image paths already read) is
  left out by readers with a warning naming it, and set aside by the next run
  (`<file>.duplicate-<time>`, never deleted): the first file is the one kept.
- A file another tool rewrote with other Arrow types of the same values
  (large_string paths, float32 scores) is read cast to SCHEMA's types, and
  rewritten once in them by the next run; one whose columns hold other kinds of
  values is unreadable, named by readers and set aside by a run.
- Embeddings (float16) are stored as one binary value per row (the little-endian
  float16 bytes): pyarrow reads and writes a float16 list value by value, ~10x
  slower, which at 32 px cost as much as decoding the images. `load_results`
  gives them back as float16 arrays.
"""
from __future__ import annotations

import json
import re
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .. import inference
from ..models import remove_dead_temps
from ..workspace import Workspace, ZoolibError, file_lock, open_workspace, write_atomic
from .parts import (_holds, _live_parts, _merge, _merged, _run_of, _sources, consolidate, numbered,
                    repeats)
from .schema import (_META_KEY, EMBEDDING, RESULT_COLUMNS, SCHEMA, conform,  # noqa: F401
                     float16_rows, unreadable, upgrade)

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")
_T = TypeVar("_T")


def run_dir(ws: Workspace, name: str) -> Path:
    """`bulkid/<name>`, created, for a valid run name."""
    if not _RUN_NAME.match(name):
        raise ZoolibError(f"bulk identification run name {name!r} must be letters, digits, "
                          "'.', '_' or '-' (it becomes a folder name)")
    run_dir = ws.bulkid / name
    (run_dir / "parts").mkdir(parents=True, exist_ok=True)
    (run_dir / "segments").mkdir(exist_ok=True)
    return run_dir


@contextmanager
def exclusive(run_dir: Path, name: str):
    """Hold the run's lock (`<run>/.lock`): a second process running the same name is
    refused, so a run's own cleanup never touches the files of a live one.

    The lock file stays (it is hidden): unlinking it on release would let a
    process that opened the old file lock it while a third locks a new one.
    """
    with file_lock(run_dir / ".lock", 0, f"bulk identification run {name!r} is already going "
                   f"on in another process ({run_dir}); wait for it, or choose another name"):
        yield


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


def open_run(run_dir: Path, name: str, loaded: inference.Loaded, embedder: str = "model"
             ) -> None:
    """Create or reopen a run's run.json, refusing to mix generations, predictions
    with and without test-time augmentation, or embedders (`engine.run`) in one table."""
    meta = {"name": name, "generation": loaded.name, "classes": list(loaded.classes),
            "tta": inference.TTA_NAME if loaded.tta else None, "embedder": embedder}
    if (run_dir / "run.json").exists():
        old = _read_run_json(run_dir)
        if old.get("generation") != loaded.name:
            raise ZoolibError(f"bulk identification run {name!r} was made with "
                              f"{old.get('generation')}, not {loaded.name}: pass "
                              f"generation={old.get('generation')!r} to resume it or "
                              "choose another name")
        if bool(old.get("tta")) != loaded.tta:
            raise ZoolibError(f"bulk identification run {name!r} was made with tta="
                              f"{bool(old.get('tta'))}: pass tta={bool(old.get('tta'))} to "
                              "resume it or choose another name")
        if old.get("embedder", "model") != embedder:
            raise ZoolibError(f"bulk identification run {name!r} was made with embedder "
                              f"{old.get('embedder', 'model')!r}, not {embedder!r}: choose "
                              "another name, or resume it with that embedder")
    else:
        write_atomic(run_dir / "run.json", json.dumps(meta, indent=2))


def recover(run_dir: Path) -> pa.Array:
    """Clean up after a killed run of this folder (under its lock); the paths done.

    Temporaries of dead processes are removed; a table file that cannot be read is
    set aside (`_set_aside`), so its images are identified again; parts left by a
    run that never merged are merged into a new file of the dataset. Each is said.

    Returns:
        The paths already in the table, as an Arrow string array (for `pc.is_in`:
        ten million paths as Python strings would cost a gigabyte).
    """
    remove_dead_temps(run_dir)
    for sub in ("parts", "segments"):
        remove_dead_temps(run_dir / sub)
    # the path column alone: a resume never reads the embeddings (most of the bytes)
    stored = _paths(_read_sources(run_dir, _set_aside, ["path"], merged=True,
                                  on_repeat=_set_aside_repeat))
    _migrate(run_dir)
    parts = _live_parts(run_dir)
    stale = set(numbered(run_dir / "parts", "part")) - set(parts)
    for p in stale:  # a crash between merging them and removing them: rows kept elsewhere
        p.unlink()
    if stale:
        print(f"removed {len(stale)} part(s) of {run_dir} already merged by a killed run")
    if not parts:
        return stored
    consolidate(run_dir, stored)
    print(f"merged {len(parts)} part(s) left by an interrupted run into "
          f"{_sources(run_dir)[-1]}")
    return _paths(_read_sources(run_dir, _set_aside, ["path"], on_repeat=_set_aside_repeat))


def _migrate(run_dir: Path) -> None:
    """Rewrite, once, each merged file of an older layout (`upgrade`) in SCHEMA's, so
    that the files of one dataset share a schema and can be read lazily together."""
    for path in _merged(run_dir):
        stored = pq.read_schema(path)
        if stored.remove_metadata().equals(SCHEMA):
            continue
        schema = SCHEMA.with_metadata(stored.metadata)
        write_atomic(path, write=lambda tmp: _merge([path], tmp, schema), fsync=True)
        print(f"rewrote {path} in the current layout of results tables")


def _paths(tables: list[tuple[Path, pa.Table]]) -> pa.Array:
    """The path column of `tables` (file, table), as one Arrow array."""
    chunks = [c for _, t in tables for c in t.column("path").chunks]
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


def _set_aside(path: Path, exc: Exception) -> None:
    """Rename an unreadable table file `<name>.corrupt-<UTC time>` in the run folder
    (never deleted: it may still be recovered by hand), saying so."""
    target = _aside(path, "corrupt")
    print(f"{path} is not a readable results table ({exc}): renamed it {target.name}; "
          "the images it held are identified again")


def _set_aside_repeat(path: Path, why: str) -> None:
    """`on_repeat` for a run: rename a merged file repeating an earlier one
    `<name>.duplicate-<UTC time>` (never deleted), with a warning."""
    target = _aside(path, "duplicate")
    warnings.warn(f"{path} {why}: renamed it {target.name} (kept, not read); its rows are "
                  "read from the first file, any others identified again", stacklevel=2)


def _leave_out(path: Path, why: str) -> None:
    """`on_repeat` for readers: a warning; the file is left where it is (a reader
    changes nothing in the run folder, which may be read-only or in use by a run)."""
    run_dir = _run_of(path)
    warnings.warn(f"{path} {why}: left out, so that no image has two rows; run bulk "
                  f"identification again with name={run_dir.name!r} to set it aside "
                  f"(renamed {path.name}.duplicate-<time>)", stacklevel=3)


def _aside(path: Path, what: str) -> Path:
    """Rename a table file `<name>.<what>-<UTC time>` in its run folder; the new path."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = _run_of(path) / f"{path.name}.{what}-{stamp}"
    path.replace(target)
    return target


def _check(path: Path) -> None:
    """Raise ValueError (saying what is wrong) unless `path` reads as a results table
    whose columns cast to SCHEMA's (`schema.unreadable`); FileNotFoundError if gone."""
    try:
        why = unreadable(pq.read_schema(path))
    except pa.ArrowException as exc:  # ArrowInvalid: "Parquet magic bytes not found", ...
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    if why:
        raise ValueError(why)


def _read_source(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One table file (results.parquet, a segment or a part) in SCHEMA's layout and
    types (`columns` of it only, when given).

    Raises:
        FileNotFoundError: the file is gone (merged by the run meanwhile).
        ValueError: it is not a readable results table (with what is wrong).
    """
    _check(path)
    try:
        return conform(pq.read_table(path, columns=columns))
    except pa.ArrowException as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc


def settled(read: Callable[[], _T], attempts: int = 5) -> _T:
    """`read()`, called again (a few times at most) while a file it lists vanishes: a
    running run merged it meanwhile, so a reader never sees a half set."""
    for _ in range(attempts - 1):
        try:
            return read()
        except FileNotFoundError:
            continue
    return read()


def _read_sources(run_dir: Path, on_corrupt: Callable[[Path, Exception], None],
                  columns: list[str] | None = None, merged: bool = False,
                  on_repeat: Callable[[Path, str], None] = _leave_out,
                  ) -> list[tuple[Path, pa.Table]]:
    """The files of `_sources` (of `_merged` only, if `merged`) and their tables,
    calling `on_corrupt` for each unreadable one and `on_repeat` for each merged file
    repeating an earlier one (`parts.repeats`: they are left out). `columns`, when
    given, must include "path"."""
    def read() -> list[tuple[Path, pa.Table]]:
        files = _merged(run_dir) if merged else _sources(run_dir)
        found = [(p, t) for p in files
                 if (t := _read_or_report(p, on_corrupt, columns)) is not None]
        again = repeats([p for p, _ in found], [t.column("path") for _, t in found])
        for path, why in again.items():
            on_repeat(path, why)
        return [(p, t) for p, t in found if p not in again]

    return settled(read)


def checked_sources(run_dir: Path) -> list[Path]:
    """`_sources` for a reader that reads them lazily (`view.open_view`), each checked
    (`_check`): a ZoolibError names the first that fails (`_refuse_corrupt`). A
    merged file holding the parts of an earlier one is left out with a warning;
    image paths repeated are for the reader to find (`parts.repeats` with keys).
    """
    files = []
    for path in _sources(run_dir):
        try:
            _check(path)
        except ValueError as exc:
            _refuse_corrupt(path, exc)
        files.append(path)
    again = repeats(files)
    for path, why in again.items():
        _leave_out(path, why)
    return [p for p in files if p not in again]


def _read_or_report(path: Path, on_corrupt: Callable[[Path, Exception], None],
                    columns: list[str] | None = None) -> pa.Table | None:
    try:
        return _read_source(path, columns)
    except ValueError as exc:
        on_corrupt(path, exc)
        return None


def _refuse_corrupt(path: Path, exc: Exception) -> None:
    """`on_corrupt` for readers: a ZoolibError naming the file and what to do."""
    run_dir = _run_of(path)
    raise ZoolibError(f"{path} is not a readable results table ({exc}): run bulk "
                      f"identification again with name={run_dir.name!r} to set it aside "
                      f"(renamed {path.name}.corrupt-<time>) and identify its images again, "
                      f"or delete the folder {run_dir} to start the run over") from exc


def read_table(run_dir: Path, on_corrupt: Callable[[Path, Exception], None] = _refuse_corrupt,
               columns: list[str] | None = None) -> pa.Table:
    """Every file of the dataset (`_sources`) as one table, one row per path; only
    `columns` (which must include "path") when given."""
    tables = [t for _, t in _read_sources(run_dir, on_corrupt, columns)]
    if not tables:
        empty = SCHEMA.empty_table()
        return empty.select(columns) if columns else empty
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    if _may_repeat(run_dir):
        _, first = np.unique(np.asarray(table.column("path").to_pylist(), dtype=object),
                             return_index=True)
        if len(first) < table.num_rows:
            table = table.take(np.sort(first))
    return table.replace_schema_metadata(tables[-1].schema.metadata)


def _may_repeat(run_dir: Path) -> bool:
    """Whether two files may hold a row for one path: only parts left beside a
    results.parquet of an older version (which did not record the parts it held)."""
    main = run_dir / "results.parquet"
    try:
        old = main.exists() and _holds(main) is None
    except (OSError, pa.ArrowException):
        return False
    return old and bool(_live_parts(run_dir))


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
    table = read_table(run_dir).select(RESULT_COLUMNS)
    frame = table.drop_columns(["embedding"]).to_pandas()
    frame.insert(RESULT_COLUMNS.index("embedding"), "embedding",
                 float16_rows(table.column("embedding")))
    frame.attrs.update(name=str(name), generation=meta["generation"],
                       classes=list(meta["classes"]))
    return frame
