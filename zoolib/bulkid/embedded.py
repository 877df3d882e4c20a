"""A pretrained embedder in bulk identification: the junk score and "more like this"
from a backbone's features instead of the generation's.

With `run(embedder=...)` naming a pretrained backbone (`zoolib.embedder`), every
table of rows the engine makes is rescored here before it is written:

- `embedding` holds the backbone's vectors, so "more like this" and the faiss
  index search in its space;
- `knn` is 1 - cosine similarity to the K-th (5th) nearest library image of the
  generation's classes in that space (their vectors cached by content hash), as
  the model's own score is in its stage features (`neighbours`): higher is
  farther from the library, so `lowest_scores(by="knn")` puts junk first. The
  backbone never trained on the library, so every split is reference, not only
  the training images the model's score is limited to.

run.json records the embedder, and a run is never resumed with another one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .. import embedder as embedders
from .. import neighbours, probe
from ..heads import unit
from ..workspace import Workspace
from . import schema

# Neighbours of the knn score in a backbone's space: 5 (junk AUC 0.899 against 0.895 at
# 10 on the tuning inbox of `embedder.pool`; k = 1 0.882, 20 0.882, 50 0.858).
K = 5


def reference(ws: Workspace, generation: str, value: str, progress: bool = True
              ) -> torch.Tensor:
    """Unit-length vectors of the library images of the generation's classes (as
    cleaning takes them: `probe.rows_to_clean`) under EMBEDDER `value`."""
    rows, _ = probe.rows_to_clean(ws, generation)
    found = embedders.vectors(ws, value, [ws.library / p for p in rows["path"]], rows["hash"],
                              progress=progress)
    return unit(torch.from_numpy(found))


def rescore(cache: embedders.EmbeddingCache, ref: torch.Tensor | None, table: pa.Table
            ) -> pa.Table:
    """`table` (rows of the results schema) with knn and embedding from the embedder.

    Args:
        cache: the embedder's cache in the workspace (made once a run: resolving the
            EMBEDDER hashes its weights file and reads the scan cache).
        ref: the knn reference (`reference`), or None for no knn score (NaN).
        table: the rows.
    """
    ok = pc.equal(table["error"], "").to_numpy(zero_copy_only=False)
    if not ok.any():
        return table
    rows = np.flatnonzero(ok)
    paths = table["path"].take(pa.array(rows)).to_pylist()
    hashes = table["hash"].take(pa.array(rows)).to_pylist()
    found = cache.get([Path(p) for p in paths], hashes, progress=False)
    knn = np.full(len(ok), np.nan)
    if ref is not None:
        knn[rows] = neighbours.kth_distance(ref, torch.from_numpy(found), K).numpy()
    blobs = pa.array([found[i].astype(schema.EMBEDDING).tobytes() if k else None
                      for i, k in zip(np.cumsum(ok) - 1, ok)], pa.binary())
    table = table.set_column(table.schema.get_field_index("knn"), "knn", pa.array(knn))
    return table.set_column(table.schema.get_field_index("embedding"), "embedding", blobs)
