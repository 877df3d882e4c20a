"""A results table opened lazily: what the widget filters and sorts on, as arrays.

`open_view(ws, name)` reads only the small columns (rel, pred, the scores, whether
a file was readable) into numpy and Arrow arrays, a few dozen bytes a row. Whole
rows (for the thumbnails on a page, an export) are read from the Parquet files
by row group when asked for; embeddings only for "more like this", through a
nearest-neighbour index (`zoolib.ann`) built once per run and kept beside the
table (`bulkid/<run>/ann/`), extended when later runs add segments.

`ResultsView.from_frame` wraps a table already in memory (a `load_results` or
`combine` frame) the same way, so the widget and the filters have one code path.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .. import ann
from ..workspace import ZoolibError, open_workspace
from . import parts, schema
from . import results as store
from .index import load_or_build
from .reader import Files, decode

SCORES = ["confidence", "margin", "entropy", "ood", "knn"]
# float64 as stored where a filter cuts at a threshold or ranks (confidence < 0.8,
# the lowest knn) so it cuts where pandas cuts; float32 for the sort-only scores
SCORE_TYPES = {"confidence": np.float64, "knn": np.float64, "margin": np.float32,
               "entropy": np.float32, "ood": np.float32}
ROW_COLUMNS = [c for c in schema.RESULT_COLUMNS if c != "embedding"]
# What a thumbnail's caption and actions need: a page reads these, not the top-5 lists
PAGE_COLUMNS = ["path", "rel", "pred", "confidence", "error"]
_BATCH = 1 << 16  # rows decoded at a time while opening: bounds the temporaries
FEW = 16  # `sorted`: a selection under 1/FEW of the rows is sorted on its own
HEAD_MAX = 1024  # `sorted`: up to this many positions by a partition; deeper, one full order
_INDEX = np.intp  # sort orders: numpy would convert any other index type on every gather


class ResultsView:
    """The arrays a results table is filtered and sorted on; rows read on demand.

    Positions 0..n-1 number the rows (the dataset's order). Build with
    `open_view` or `from_frame`, not directly.

    Attributes:
        rel: the `rel` column (Arrow strings: no Python object per row).
        path: the `path` column for tables in memory; None when opened from disk
            (paths are then matched through `rel` and the workspace root).
        pred: class code per row (-1: none); `classes[code]` is the name.
        classes: the predicted class names, sorted.
        scores: column -> float array (NaN where missing), for SCORES (SCORE_TYPES).
        ok: whether each file was readable.
        attrs: name, generation and classes, as `load_results` frames carry.
    """

    def __init__(self, rel: pa.Array, pred: np.ndarray, classes: list[str],
                 scores: dict[str, np.ndarray], ok: np.ndarray, attrs: dict,
                 fetch: Callable[[np.ndarray, list[str]], pd.DataFrame],
                 embeddings: Callable[[], Iterator[np.ndarray]],
                 embedding_at: Callable[[int], np.ndarray], files: Files | None = None,
                 index_dir: Path | None = None, path: pa.Array | None = None):
        self.rel, self.path, self.pred, self.classes = rel, path, pred, classes
        self.scores, self.ok, self.attrs = scores, ok, attrs
        self._fetch, self._embeddings, self._embedding_at = fetch, embeddings, embedding_at
        self._files, self._index_dir = files, index_dir
        self._orders: dict[tuple[str, bool], np.ndarray] = {}
        self._buffer: np.ndarray | None = None  # `head`'s scratch
        self._index: ann.Index | None = None

    def __len__(self) -> int:
        return len(self.ok)

    # ---- building ---------------------------------------------------------------------
    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> ResultsView:
        """A view over a results table in memory (positions = its row order)."""
        frame = frame.reset_index(drop=True)
        codes, classes = pd.factorize(frame["pred"], sort=True)
        scores = {c: frame[c].to_numpy(SCORE_TYPES[c], na_value=np.nan) if c in frame
                  else np.full(len(frame), np.nan, SCORE_TYPES[c]) for c in SCORES}
        ok = (frame["error"].fillna("") == "").to_numpy(bool)

        def fetch(positions: np.ndarray, columns: list[str]) -> pd.DataFrame:
            return frame[[c for c in columns if c in frame]].iloc[positions]  # older: no knn

        def embeddings() -> Iterator[np.ndarray]:
            yield _stack(frame["embedding"])

        def embedding_at(position: int) -> np.ndarray:
            return _stack(frame["embedding"].iloc[position:position + 1])[0]

        return cls(pa.array(frame["rel"].fillna("").astype(str), pa.string()),
                   codes.astype(np.int32), list(classes), scores, ok, dict(frame.attrs),
                   fetch, embeddings, embedding_at,
                   path=pa.array(frame["path"].fillna("").astype(str), pa.string()))

    # ---- what filters and sorts read ------------------------------------------------
    def code(self, cls: str) -> int:
        """The code of a class name (-1 if no row predicts it)."""
        return self.classes.index(cls) if cls in self.classes else -1

    def is_pred(self, labels) -> np.ndarray:
        """Rows predicted as one of `labels`."""
        codes = [self.code(c) for c in labels if c in self.classes]
        return np.isin(self.pred, codes) if codes else np.zeros(len(self), bool)

    def under(self, prefix: str) -> np.ndarray:
        """Rows whose rel starts with `prefix`."""
        return pc.starts_with(self.rel, prefix).to_numpy(zero_copy_only=False)

    def order(self, column: str, ascending: bool) -> np.ndarray:
        """Every position sorted by a column (missing last, ties by position); computed
        once per column and direction, so a filter change is one gather, not a sort."""
        key = (column, ascending)
        if key not in self._orders:
            self._orders[key] = self._argsort(column, ascending)
        return self._orders[key]

    def sorted(self, keep: np.ndarray, column: str, ascending: bool,
               need: int | None = None) -> np.ndarray:
        """The positions where `keep` is true, in `order(column, ascending)`'s order.

        A selection under 1/FEW of the rows (a class, a band) is sorted on its own:
        faster than a gather through every row, and no order of every row is needed.
        With `need` (at most HEAD_MAX), the answer may stop after the first `need`
        positions: a score whose order is not computed yet is then partitioned, not
        sorted (a first page of a new sort in a fraction of a second instead of
        seconds at ten million rows); a page deeper than that computes the order,
        and so does a sort by path (Arrow's string sort, once).
        """
        count = np.count_nonzero(keep)
        if count * FEW < len(self):
            positions = np.flatnonzero(keep)
            return positions[self._argsort(column, ascending, positions)]
        if need is not None and (column, ascending) not in self._orders \
                and column in self.scores and 0 < need <= HEAD_MAX \
                and need * FEW < count:
            return self.head(keep, column, ascending, need)
        order = self.order(column, ascending)
        return order[keep[order]]

    def head(self, keep: np.ndarray, column: str, ascending: bool, need: int) -> np.ndarray:
        """The start of `sorted` (ties by position, missing last) through its need-th
        position and every row tied with it: a partition, then a sort of those few."""
        key = self.scores[column]
        signed = self._scratch(key.dtype)
        np.copyto(signed, key) if ascending else np.negative(key, out=signed)
        np.copyto(signed, np.nan, where=~keep)  # left out: last, as missing values
        signed.partition(need - 1)  # in place
        nth = signed[need - 1]
        near = keep if np.isnan(nth) else keep & ((key <= nth) if ascending else (key >= -nth))
        rows = np.flatnonzero(near)
        return rows[self._argsort(column, ascending, rows)]

    def _scratch(self, dtype) -> np.ndarray:
        """`head`'s reused array of a row per position (fresh pages for 80 MB cost
        more than the partition that fills them)."""
        if self._buffer is None or self._buffer.dtype != dtype:
            self._buffer = np.empty(len(self), dtype)
        return self._buffer

    def _argsort(self, column: str, ascending: bool, positions: np.ndarray | None = None
                 ) -> np.ndarray:
        """A stable argsort of the column (of its rows at `positions`), missing last."""
        if column == "rel":
            rel = self.rel if positions is None else self.rel.take(pa.array(positions))
            return _text_order(rel, ascending)
        values = self.sort_key(column)
        values = values if positions is None else values[positions]
        return np.argsort(values if ascending else -values, kind="stable").astype(_INDEX)

    def sort_key(self, column: str) -> np.ndarray:
        if column == "pred":  # codes follow the sorted names; no class sorts last
            # int16 where it fits: numpy sorts 16-bit integers by radix, ten times faster
            small = np.int16 if len(self.classes) < np.iinfo(np.int16).max else np.int32
            return np.where(self.pred < 0, len(self.classes), self.pred).astype(small)
        return self.scores[column]

    # ---- rows -----------------------------------------------------------------------
    def rows(self, positions, columns: list[str] | None = None) -> pd.DataFrame:
        """Rows at `positions`, in that order, indexed by position: `columns` of them
        (default ROW_COLUMNS: every column but the embedding)."""
        positions = np.asarray(positions, np.int64)
        out = self._fetch(positions, list(columns or ROW_COLUMNS))
        out.index = positions
        return out

    def positions(self, paths) -> np.ndarray:
        """Positions of rows whose path (absolute) or rel is in `paths`, in row order."""
        wanted = [str(p) for p in paths]
        rels = pa.array(sorted(set(wanted) | {self._rel_of(p) for p in wanted}), pa.string())
        hit = pc.is_in(self.rel, value_set=rels)
        if self.path is not None:
            hit = pc.or_(hit, pc.is_in(self.path, value_set=pa.array(wanted, pa.string())))
        return np.flatnonzero(hit.to_numpy(zero_copy_only=False))

    def _rel_of(self, path: str) -> str:
        """The rel of an absolute path, as bulkid writes it (relative to the workspace
        root when under it)."""
        root = str(self.attrs.get("root") or "").rstrip("/")
        return path[len(root) + 1:] if root and path.startswith(root + "/") else path

    def status_codes(self, marks: pd.DataFrame, codes: dict[str, int]) -> np.ndarray:
        """A small int per row: `codes[status]` of its mark in `marks` (path, status), 0
        for unmarked."""
        out = np.zeros(len(self), np.int8)
        if marks.empty:
            return out
        if self.path is not None:
            found = pc.index_in(self.path, value_set=pa.array(marks["path"], pa.string()))
        else:
            rels = [self._rel_of(p) for p in marks["path"]]
            found = pc.index_in(self.rel, value_set=pa.array(rels, pa.string()))
        hit = found.is_valid().to_numpy(zero_copy_only=False)
        which = found.fill_null(0).to_numpy(zero_copy_only=False)[hit]
        out[hit] = np.array([codes.get(s, 0) for s in marks["status"]], np.int8)[which]
        return out

    # ---- more like this -------------------------------------------------------------
    def nearest(self, position: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The `k` readable rows nearest to the row at `position` by cosine similarity
        of the embeddings (itself left out): (positions, similarities), nearest first.

        Raises:
            ZoolibError: that row could not be read (it has no embedding).
        """
        if not self.ok[position]:
            raise ZoolibError(f"{self.rel[position]} could not be read: it has no embedding")
        index = self.index
        query = self.embedding(position)[None]
        # More than k: unreadable rows (zero vectors) and the query itself are
        # dropped, and equal similarities are ordered by position (as a stable sort
        # of a full scan would), which a heap's cut-off at exactly k would not do.
        want = 2 * int(k) + 8
        while True:
            sims, ids = index.search(query, min(want, index.ntotal))
            ids, sims = ids[0], sims[0]
            keep = (ids >= 0) & (ids != position)
            keep[keep] &= self.ok[ids[keep]]
            if keep.sum() >= k or want >= index.ntotal:
                ids, sims = ids[keep], sims[keep]
                order = np.lexsort((ids, -sims))[:k]
                return ids[order], sims[order]
            want *= 4

    def embedding(self, position: int) -> np.ndarray:
        """The float32 embedding of one row."""
        return self._embedding_at(int(position))

    @property
    def index(self) -> ann.Index:
        """The nearest-neighbour index of the embeddings (built or loaded once)."""
        if self._index is None:
            self._index = load_or_build(self)
        return self._index

    @cached_property
    def dim(self) -> int:
        return int(next(iter(self._embeddings())).shape[1])


def _stack(column) -> np.ndarray:
    """float32 matrix of an embedding column (zero rows where missing)."""
    vectors = [None if v is None else np.asarray(v, np.float32) for v in column]
    dim = next((len(v) for v in vectors if v is not None), 1)
    zero = np.zeros(dim, np.float32)
    return np.stack([zero if v is None else v for v in vectors]) if vectors \
        else np.zeros((0, dim), np.float32)


def _text_order(values: pa.Array, ascending: bool) -> np.ndarray:
    order = pc.sort_indices(values, sort_keys=[("", "ascending" if ascending
                                                else "descending")])
    return order.to_numpy().astype(_INDEX)


# ----------------------------------------------------------------------------- on disk

def open_view(workspace, name: str, progress: bool = False) -> ResultsView:
    """Open a run's results lazily (see the module doc); also while it runs.

    A merged file repeating the rows of an earlier one (a copy under a valid name)
    is left out with a warning, as `load_results` leaves it out. The view reads the
    files it opened to the end, whatever the run does to them (`reader`).

    Raises:
        ZoolibError: no run of that name, or a file of it cannot be read (named).
    """
    ws = open_workspace(workspace)
    run_dir = ws.bulkid / str(name)
    if not (run_dir / "run.json").exists():
        return ResultsView.from_frame(store.load_results(ws, name))  # raises, naming runs
    if store._may_repeat(run_dir):  # an older version's leftovers: rows to de-duplicate
        return ResultsView.from_frame(store.load_results(ws, name))
    meta = store._read_run_json(run_dir)
    attrs = {"name": str(name), "generation": meta["generation"],
             "classes": list(meta["classes"]), "root": str(ws.root)}
    return _open(store.settled(lambda: Files(store.checked_sources(run_dir))), attrs,
                 run_dir / "ann")


def _open(files: Files, attrs: dict, index_dir: Path) -> ResultsView:
    """The view of `files`, less those whose image paths repeat an earlier one's."""
    rel, pred, names, scores, ok = _scan(files)
    # rel for path: one follows from the other, and only rel is in memory here
    repeated = parts.repeats(files.paths, files.split(rel))
    if repeated:  # rare (a copied file): read the others again rather than cut arrays
        for path, why in repeated.items():
            store._leave_out(path, why)
        return _open(files.without(repeated), attrs, index_dir)
    classes = sorted(names)
    remap = np.array([classes.index(c) for c in names] or [0], np.int32)  # first seen -> sorted
    for i in range(0, len(pred), _BATCH):  # in place, a batch at a time: no copy of every row
        part = pred[i:i + _BATCH]
        part[:] = np.where(part < 0, -1, remap[np.maximum(part, 0)])

    def fetch(positions: np.ndarray, columns: list[str]) -> pd.DataFrame:
        return files.read(positions, columns).to_pandas()

    def embedding_at(position: int) -> np.ndarray:
        return decode(files.read(np.array([position]), ["embedding"]).column(0))[0]

    return ResultsView(rel, pred, classes, scores, ok, attrs, fetch, files.embeddings,
                       embedding_at, files, index_dir=index_dir)


def _scan(files: Files) -> tuple[pa.ChunkedArray, np.ndarray, dict[str, int],
                                 dict[str, np.ndarray], np.ndarray]:
    """The small columns of every row: rel, class codes (in the order first seen) and
    the names they stand for, the scores, whether each file was readable."""
    n = int(files.starts[-1])
    scores = {c: np.full(n, np.nan, SCORE_TYPES[c]) for c in SCORES}
    ok, pred = np.ones(n, bool), np.full(n, -1, np.int32)
    rels, names, start = [], {}, 0  # names: class -> code, in the order first seen
    for batch in files.scan(["rel", "pred", "error", *SCORES]):
        stop = start + batch.num_rows
        rels.append(_owned(batch.column("rel")))
        for c in SCORES:
            if c in batch.schema.names:  # older tables have no knn
                scores[c][start:stop] = batch.column(c).to_numpy(zero_copy_only=False)
        error = batch.column("error")  # null or "": readable
        ok[start:stop] = pc.fill_null(pc.equal(error.cast(pa.string()), ""), True
                                      ).to_numpy(zero_copy_only=False)
        pred[start:stop] = _codes(batch.column("pred"), names)
        start = stop
    pa.default_memory_pool().release_unused()  # the decoded batches' pages, back to the OS
    # chunked as read: concatenating would hold every path twice for a moment
    return pa.chunked_array(rels, pa.string()), pred, names, scores, ok


def _owned(strings: pa.Array) -> pa.Array:
    """A copy of a string array in memory numpy owns, not Arrow's pool.

    A slice of a batch would keep every column's decoded buffers; a copy in the pool
    lands between them, so the pool cannot give their pages back (at ten million
    rows, 0.6 GB held beside 0.3 GB of paths). numpy's large arrays are pages of their
    own, returned when freed.
    """
    if strings.null_count:  # rel is never null in a table zoolib wrote; be safe anyway
        return pa.concat_arrays([strings])
    offsets = np.frombuffer(strings.buffers()[1], np.int32, count=len(strings) + 1,
                            offset=4 * strings.offset)
    data = np.frombuffer(strings.buffers()[2] or b"", np.uint8)[offsets[0]:offsets[-1]].copy()
    return pa.Array.from_buffers(pa.string(), len(strings), [
        None, pa.py_buffer(offsets - offsets[0]), pa.py_buffer(data)])


def _codes(column: pa.Array, names: dict[str, int]) -> np.ndarray:
    """Codes of a string column: `names` maps each name to its code (first seen first,
    extended here); -1 where null."""
    encoded = column if pa.types.is_dictionary(column.type) else pc.dictionary_encode(column)
    local = np.array([names.setdefault(v, len(names)) for v in
                      encoded.dictionary.to_pylist()] or [0], np.int32)
    idx = encoded.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    valid = encoded.is_valid().to_numpy(zero_copy_only=False)
    return np.where(valid, local[idx], -1)


__all__ = ["PAGE_COLUMNS", "ROW_COLUMNS", "SCORES", "ResultsView", "open_view"]
