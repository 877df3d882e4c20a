"""The Parquet files of a run's dataset read lazily, by global row position (the
reader behind `view.open_view`).

Each file is opened once, and read through that handle from then on. A view opened
while a run is going on outlives the files it was opened on: the run merges its
parts into a segment and removes them, rewrites a file of an older layout, sets a
file aside. Through its handles the view still reads the very rows it shows (the
operating system keeps a removed file's data while it is open), so paging and "more
like this" go on over the same rows; a view opened afterwards sees the new files.
"""
from __future__ import annotations

from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import schema
from .parts import held_in

_BATCH = 1 << 16  # rows decoded at a time while scanning: bounds the temporaries


class Files:
    """The Parquet files of a run's dataset, addressed by global row position.

    Attributes:
        paths: the files, in the dataset's order.
        rows_per_file: each file's row count.
        listing: what identifies each file for the index (`index.load_or_build`):
            name, rows, byte size and the part numbers it holds, as opened.
    """

    def __init__(self, paths: list[Path],
                 opened: list[tuple[pq.ParquetFile, int]] | None = None):
        self.paths = list(paths)
        self.opened = opened or [_handle(p) for p in self.paths]  # (reader, byte size)
        self.files = [f for f, _ in self.opened]
        sizes = [[f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)]
                 for f in self.files]
        self.groups = [(fi, gi) for fi, s in enumerate(sizes) for gi in range(len(s))]
        self.starts = np.cumsum([0] + [n for s in sizes for n in s])
        self.rows_per_file = [sum(s) for s in sizes]
        self.listing = [[p.name, int(rows), size, list(held_in(f.schema_arrow.metadata) or [])]
                        for p, (f, size), rows in zip(self.paths, self.opened,
                                                      self.rows_per_file)]

    def without(self, left_out: Collection[Path]) -> Files:
        """These files less `left_out` (paths), through the same handles."""
        keep = [i for i, p in enumerate(self.paths) if p not in left_out]
        return Files([self.paths[i] for i in keep], [self.opened[i] for i in keep])

    def split(self, column: pa.ChunkedArray) -> list[pa.ChunkedArray]:
        """A column of every row (as `scan` gives it) cut into each file's rows."""
        ends = np.cumsum([0, *self.rows_per_file])
        return [column.slice(a, b - a) for a, b in zip(ends[:-1].tolist(), ends[1:].tolist())]

    def locate(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, positions, side="right") - 1

    def read(self, positions: np.ndarray, columns: list[str]) -> pa.Table:
        """Rows at `positions`, in that order, in SCHEMA's types."""
        groups = self.locate(positions)
        pieces, where = [], np.empty(len(positions), np.int64)
        done = 0
        for g in np.unique(groups):
            fi, gi = self.groups[g]
            mine = np.flatnonzero(groups == g)
            table = schema.conform(self.files[fi].read_row_group(gi, columns=columns))
            pieces.append(table.take(pa.array(positions[mine] - self.starts[g])))
            where[mine] = np.arange(done, done + len(mine))
            done += len(mine)
        if not pieces:
            return pa.table({c: pa.array([], schema.SCHEMA.field(c).type) for c in columns})
        return pa.concat_tables(pieces).take(pa.array(where))

    def scan(self, columns: list[str], start: int = 0) -> Iterator[pa.RecordBatch]:
        """Every row's `columns` (those a file has), in SCHEMA's types, batch by batch,
        from file `start` on."""
        for f in self.files[start:]:
            have = [c for c in columns if c in f.schema_arrow.names]
            for batch in f.iter_batches(batch_size=_BATCH, columns=have):
                yield from schema.conform(pa.Table.from_batches([batch])).to_batches()

    def embeddings(self, start: int = 0) -> Iterator[np.ndarray]:
        for batch in self.scan(["embedding"], start):
            yield decode(batch.column(0))


def _handle(path: Path) -> tuple[pq.ParquetFile, int]:
    """A file's reader and the byte size of the file it holds open (not of whatever
    has that name later: the index is keyed on it)."""
    source = pa.OSFile(str(path))
    # pre_buffer=False: with it (pyarrow's default) a reader keeps the raw bytes of
    # what it read until it is closed, 0.6 GB over a scan of nine million rows
    return pq.ParquetFile(source, pre_buffer=False), source.size()


def decode(column: pa.Array) -> np.ndarray:
    """float32 matrix of a binary float16 embedding column (zero rows where null; one
    model wrote the table, so every value has the same length)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = np.frombuffer(column.buffers()[2] or b"", dtype=schema.EMBEDDING)
    ends = np.frombuffer(column.buffers()[1], dtype=np.int32, count=len(column) + 1,
                         offset=4 * column.offset) // schema.EMBEDDING.itemsize
    lengths = np.diff(ends)
    dim = int(lengths.max(initial=0)) or 1
    out = np.zeros((len(column), dim), np.float32)
    full = lengths == dim  # nulls (and empty values) stay zero
    if full.any():
        starts = ends[:-1][full]
        out[full] = values[starts[:, None] + np.arange(dim)]
    return out
