"""Writing a run's results in parts and merging them (see `zoolib.bulkid.results`).

Finished rows are flushed every few seconds to `parts/part-NNNNN.parquet` (each
written whole or not at all); at the end of a run, or when it is interrupted by an
exception, that run's parts are merged into one new file of the dataset, which
records the part numbers it holds (`zoolib.parts`), so a stale part is never read.

Only files named exactly `part-NNNNN.parquet` and `seg-NNNNN.parquet` belong to the
dataset: the copies sync tools and file managers make beside them
(`seg-00002 (1).parquet`, `...sync-conflict...`, `part-00002 copy.parquet`) are
left alone, with one warning naming them. A copy under a valid name (`seg-00099.parquet`
beside the `seg-00002.parquet` it copies) repeats an earlier file's part numbers or image
paths: `repeats` finds it, for the readers to leave out and a run to set aside.
"""
from __future__ import annotations

import json
import re
import warnings
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import inference
from ..workspace import write_atomic
from .schema import (_COMPRESSION, _DICT_COLUMNS, _META_KEY, _PARTS_KEY, FLUSH_ROWS, FLUSH_SECONDS,
                     SCHEMA, conform)

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
    return held_in(pq.read_schema(path).metadata)


def held_in(meta: dict | None) -> tuple[int, int] | None:
    """The part numbers recorded in a table file's metadata, or None (an older file)."""
    meta = meta or {}
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


def repeats(paths: list[Path], keys: list | None = None) -> dict[Path, str]:
    """The merged files among `paths` (in the dataset's order) that repeat an earlier
    one: holding part numbers it holds (a copy under a valid name), or, given `keys`
    (each file's image paths, Arrow strings), an image path it has. Parts are never
    counted: `_live_parts` and `_merge` see to them.

    Two files that both record their part numbers, and different ones, are not
    compared path by path: zoolib's merges never write a path twice, so only a
    file without them (an older version's, or one another tool rewrote, dropping
    the metadata) can repeat paths. That keeps a large dataset of this version
    from a hash of every path each time it is opened.

    Returns:
        Each repeating file -> what it repeats (for a warning); the first of two
        files is the one kept.
    """
    merged = [i for i, p in enumerate(paths) if p.parent.name != "parts"]
    held, kept, out = {i: _held_or_none(paths[i]) for i in merged}, [], {}
    for i in merged:
        same = next((j for j in kept if _overlap(held[i], held[j])), None)
        if same is None:
            kept.append(i)
        else:
            out[paths[i]] = f"holds parts {held[i][0]}-{held[i][1]}, as {paths[same].name} does"
    if keys is not None:
        out.update(_repeated_paths([paths[i] for i in kept], [keys[i] for i in kept],
                                   [held[i] for i in kept]))
    return out


def _held_or_none(path: Path) -> tuple[int, int] | None:
    """`_holds`, or None for a file that cannot be read."""
    try:
        return _holds(path)
    except (OSError, pa.ArrowException):  # named by whoever reads it
        return None


def _overlap(a: tuple | None, b: tuple | None) -> bool:
    """Whether two ranges (None: not known) overlap."""
    return bool(a and b and a[0] <= b[1] and b[0] <= a[1])


def _repeated_paths(paths: list[Path], keys: list, held: list) -> dict[Path, str]:
    """`repeats` by image path: the files holding a path an earlier file holds.

    Only files that may share a path with another are hashed: part numbers do not
    vouch for the pair, and their least and greatest paths overlap (min_max is
    twenty times cheaper than a hash). Their paths are then encoded in one pass;
    codes are given in the order first seen, so a file's code under the number of
    codes seen before it is a path of an earlier file.
    """
    bounds = [_bounds(k) for k in keys]
    unsure = [i for i in range(len(paths)) if any(
        j != i and not (held[i] and held[j]) and _overlap(bounds[i], bounds[j])
        for j in range(len(paths)))]
    if not unsure:
        return {}
    chunks = [c for i in unsure for c in _chunks(keys[i])]
    codes = pa.chunked_array(chunks, pa.string()).dictionary_encode()
    codes = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in codes.chunks]
                           or [np.zeros(0, np.int32)])
    first = np.zeros(len(codes), np.int64)  # code -> the file (of unsure) it was first seen in
    out, seen, start = {}, 0, 0
    for n, i in enumerate(unsure):
        mine = codes[start:start + len(keys[i])]
        start += len(keys[i])
        old = mine[mine < seen]
        if len(old):
            out[paths[i]] = (f"repeats {len(old)} image path(s) of "
                             f"{paths[unsure[first[old[0]]]].name}")
        fresh = mine[mine >= seen]
        first[fresh] = n
        seen = max(seen, int(mine.max(initial=-1)) + 1)
    return out


def _chunks(key) -> list[pa.Array]:
    """The arrays of a column, chunked or not."""
    return key.chunks if isinstance(key, pa.ChunkedArray) else [key]


def _bounds(key) -> tuple[str, str] | None:
    """The least and greatest of a file's image paths (None: it has none)."""
    found = pc.min_max(key)
    low, high = found["min"].as_py(), found["max"].as_py()
    return None if low is None else (low, high)


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
                # in SCHEMA's types: a file another tool rewrote (`_migrate`) may differ
                table = conform(pa.Table.from_batches([batch]))
                paths = table.column("path").to_pylist()
                keep = [p not in seen for p in paths]
                seen.update(paths)
                if stored is not None and len(stored):
                    keep = pc.and_(pa.array(keep), pc.invert(pc.is_in(table.column("path"),
                                                                     value_set=stored)))
                out.write_table(table.filter(keep))


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
