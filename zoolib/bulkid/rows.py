"""The rows of a results table from a run's scores: Arrow columns built from flat arrays.

Class names are taken from the class list by index (Arrow's take), and lists are
built from flat arrays and offsets: no Python object per value, which matters at
millions of rows.
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from .. import inference
from ..workspace import Workspace
from . import schema


def table(ws: Workspace, loaded: inference.Loaded, paths: list[str], hashes: list[str],
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
    return pa.table({
        "path": paths, "rel": [p[len(root):] if p.startswith(root) else p for p in paths],
        "hash": list(hashes), "pred": names.take(pa.array(best, mask=~ok)), "confidence": conf,
        "top5": _lists(names.take(pa.array(top_i.ravel())), ok),
        "top5_prob": _lists(pa.array(s.get("top_p", np.zeros(0)).ravel(), type=pa.float32()),
                            ok),
        "margin": margin, "entropy": entropy, "ood": ood, "knn": knn,
        "embedding": _blobs(s.get("emb", np.zeros((0, 0))), ok),
        "generation": pa.repeat(pa.scalar(loaded.name), n), "error": list(errors),
    }, schema=schema.SCHEMA)


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
    data = np.ascontiguousarray(emb, dtype=schema.EMBEDDING)
    offsets = _offsets(ok, data.shape[1] * schema.EMBEDDING.itemsize if data.size else 0)
    valid = pa.array(ok).buffers()[1]  # Arrow's validity bitmap has the bool array's bits
    return pa.BinaryArray.from_buffers(pa.binary(), len(ok), [
        valid, pa.py_buffer(offsets), pa.py_buffer(data.tobytes())], null_count=int((~ok).sum()))
