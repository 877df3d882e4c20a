"""Writing a run's results in parts and merging them (see `zoolib.bulkid.results`).

Finished rows are flushed every few seconds to `parts/part-NNNNN.parquet` (each
written whole or not at all); at the end of a run, or when it is interrupted by an
exception, that run's parts are merged into one new file of the dataset, which
records the part numbers it holds (`zoolib.parts`), so a stale part is never read.

Only files named exactly `part-NNNNN.parquet` and `seg-NNNNN.parquet` belong to the
dataset: the copies sync tools and file managers make beside them
(`seg-00002 (1).parquet`, `...sync-conflict...`, `part-00002 copy.parquet`) are
left alone, with one warning naming them.
"""
from __future__ import annotations

import json
import re
import warnings
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import inference
from ..workspace import write_atomic
from .schema import (_COMPRESSION, _DICT_COLUMNS, _META_KEY, _PARTS_KEY, FLUSH_ROWS, FLUSH_SECONDS,
                     SCHEMA, upgrade)

_NAMED = {"part": re.compile(r"^part-\d{5}\.parquet$"), "seg": re.compile(r"^seg-\d{5}\.parquet$")}
_WARNED: set[Path] = set()


def numbered(folder: Path, kind: str) -> list[Path]:
    """The `kind` files ("part" or "seg") of a folder, by number; other files that look
    like them (a sync tool's or file manager's copies) are named in one warning."""
    if not folder.is_dir():
        return []
    mine, stray = [], []
    for path in folder.iterdir():
        if _NAMED[kind].match(path.name):
            mine.append(path)
        elif path.name.startswith(f"{kind}-") and not path.name.startswith("."):
            stray.append(path)
    new = [p for p in stray if p not in _WARNED]
    if new:
        _WARNED.update(new)
        warnings.warn(f"{folder} holds files that are not part of the results and are left "
                      f"alone: {', '.join(p.name for p in sorted(new))} (copies made by a sync "
                      "tool or a file manager?)", stacklevel=2)
    return sorted(mine, key=_number)


def schema(loaded: inference.Loaded) -> pa.Schema:
    """The table schema with the generation and class list in its metadata."""
    meta = {"generation": loaded.name, "classes": list(loaded.classes)}
    return SCHEMA.with_metadata({_META_KEY: json.dumps(meta).encode()})


def _run_of(path: Path) -> Path:
    """The run folder of one of its table files (results.parquet, a segment, a part)."""
    return path.parent.parent if path.parent.name in ("parts", "segments") else path.parent


def _number(path: Path) -> int:
    """The number in `part-NNNNN.parquet` / `seg-NNNNN.parquet`."""
    return int(path.stem.split("-")[1])


def _holds(path: Path) -> tuple[int, int] | None:
    """The part numbers a table file holds (`_PARTS_KEY`), or None for an older file."""
    meta = pq.read_schema(path).metadata or {}
    if _PARTS_KEY not in meta:
        return None
    first, last = json.loads(meta[_PARTS_KEY])
    return int(first), int(last)


def _merged(run_dir: Path) -> list[Path]:
    """results.parquet, then the segments in the order they were written."""
    main = run_dir / "results.parquet"
    segments = numbered(run_dir / "segments", "seg")
    return ([main] if main.exists() else []) + segments


def _held_numbers(merged: list[Path]) -> list[tuple[int, int]]:
    """The part-number ranges the merged files hold (unreadable files skipped: they
    are named by whoever reads them)."""
    ranges = []
    for path in merged:
        try:
            held = _holds(path)
        except (OSError, pa.ArrowException):
            continue
        if held:
            ranges.append(held)
    return ranges


def _live_parts(run_dir: Path) -> list[Path]:
    """The parts no merged file holds, in the order they were written."""
    held = _held_numbers(_merged(run_dir))
    parts = numbered(run_dir / "parts", "part")
    return [p for p in parts if not any(a <= _number(p) <= b for a, b in held)]


def _sources(run_dir: Path) -> list[Path]:
    """Every file of the dataset, in the order its rows were written."""
    return _merged(run_dir) + _live_parts(run_dir)


class PartWriter:
    """Buffers batches and writes them as numbered, atomically renamed part files."""

    def __init__(self, run_dir: Path, schema: pa.Schema):
        self.dir, self.schema = run_dir / "parts", schema
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pending: list[pa.Table] = []
        self.rows, self.last = 0, time.monotonic()
        # numbers never repeat in a run folder: a merged file names the parts it holds
        numbers = [_number(p) for p in numbered(self.dir, "part")]
        numbers += [b for _, b in _held_numbers(_merged(run_dir))]
        self.next = max(numbers, default=0) + 1

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows >= FLUSH_ROWS or time.monotonic() - self.last >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            path = self.dir / f"part-{self.next:05d}.parquet"
            meta = {**self.schema.metadata, _PARTS_KEY: json.dumps([self.next] * 2).encode()}
            table = pa.concat_tables(self.pending).replace_schema_metadata(meta)
            # fsync: a part counts as done for resume, so it must survive a power cut
            write_atomic(path, write=lambda p: pq.write_table(
                table, p, use_dictionary=_DICT_COLUMNS, compression=_COMPRESSION), fsync=True)
            self.next += 1
        self.pending, self.rows, self.last = [], 0, time.monotonic()


def _merge(sources: list[Path], out_path: Path, schema: pa.Schema,
           stored: pa.Array | None = None) -> None:
    """Stream `sources` into one Parquet file, keeping the first row of each path and
    leaving out the paths in `stored` (rows the dataset already has)."""
    seen: set[str] = set()
    with pq.ParquetWriter(out_path, schema, use_dictionary=_DICT_COLUMNS,
                          compression=_COMPRESSION) as out:
        for src in sources:
            # pre_buffer=False: else the reader holds every byte it read until closed
            for batch in pq.ParquetFile(src, pre_buffer=False).iter_batches(
                    batch_size=FLUSH_ROWS):
                paths = batch.column("path").to_pylist()
                keep = [p not in seen for p in paths]
                seen.update(paths)
                if stored is not None and len(stored):
                    keep = pc.and_(pa.array(keep), pc.invert(pc.is_in(batch.column("path"),
                                                                     value_set=stored)))
                out.write_table(upgrade(pa.Table.from_batches([batch]).filter(keep)))


def consolidate(run_dir: Path, stored: pa.Array | None = None) -> None:
    """Merge the run's live parts into one new file of the dataset and remove them.

    The first merge makes results.parquet, later ones `segments/seg-NNNNN.parquet`;
    files already there are left as they are. Streams batch by batch (memory bounded
    by a batch); the parts are removed only after the new file is in place, and a
    crash between the two leaves parts that the new file's metadata marks as held.

    Args:
        run_dir: the run folder.
        stored: paths already in the dataset, left out of the merge (after a crash of
            an older version, whose parts could repeat rows of results.parquet).
    """
    parts = _live_parts(run_dir)
    if not parts:
        return
    first, last = _number(parts[0]), _number(parts[-1])
    main = run_dir / "results.parquet"
    target = run_dir / "segments" / f"seg-{first:05d}.parquet" if main.exists() else main
    target.parent.mkdir(exist_ok=True)
    if len(parts) == 1 and stored is None:  # one part is already a whole file: rename it
        parts[0].replace(target)
        return
    meta = {**(pq.read_schema(parts[-1]).metadata or {}),
            _PARTS_KEY: json.dumps([first, last]).encode()}
    schema = SCHEMA.with_metadata(meta)
    write_atomic(target, write=lambda tmp: _merge(parts, tmp, schema, stored), fsync=True)
    for p in parts:
        p.unlink()
