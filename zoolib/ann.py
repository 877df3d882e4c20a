"""Nearest neighbours by cosine similarity, on faiss.

One index type per size, chosen by `factory`:

- up to EXACT_MAX vectors: `IndexFlatIP`, exact (the answer equals a full scan);
- above, with the vectors in memory (library near duplicates): an inverted file
  of flat vectors ("IVF<n>,Flat"), searching the NPROBE cells nearest a query;
- above, streamed from disk (a results table of millions of rows): the same
  inverted file with product-quantised codes ("IVF<n>_HNSW32,PQ<m>np"), at most
  64 bytes a vector, so ten million fit in ~0.7 GB. "np": no polysemous training,
  which took 10x the k-means itself and serves only Hamming-distance search. (4-bit
  fast-scan codes trained faster still but found a third of the true neighbours
  on our test set, against 0.96 for 8-bit.) An HNSW graph over the cell centres
  finds a vector's cell in log time, which makes adding 10M affordable.

Vectors are normalised here, so inner product is cosine similarity. faiss is
used rather than our own blocked matrix products because its inverted files
make a query cost a few cells, not N rows, and it is the well-kept library for it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

EXACT_MAX = 200_000  # IndexFlatIP holds n x d float32: 400 MB at 512 dims
NPROBE = 32  # cells searched per query: recall@10 above 0.9 on our embeddings (bench)
MAX_CELLS = 4096
TRAIN_PER_CELL = 64  # k-means points per cell (faiss warns below 39)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as contiguous float32 (zero rows stay zero)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cells(n: int) -> int:
    """Inverted-file cells for `n` vectors: ~4 sqrt(n), a power of two, 64..MAX_CELLS."""
    return int(min(MAX_CELLS, max(64, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))


def _pq_parts(dim: int) -> int:
    """Product-quantiser sub-vectors (a byte each): the largest divisor of `dim` up
    to 64."""
    return max(m for m in range(1, min(64, dim) + 1) if dim % m == 0)


def factory(n: int, dim: int, compressed: bool = False, exact_max: int = EXACT_MAX) -> str:
    """The faiss index factory string for `n` vectors of `dim` (see the module doc)."""
    if n <= exact_max:
        return "Flat"
    nlist = cells(n)
    if compressed:
        return f"IVF{nlist}_HNSW32,PQ{_pq_parts(dim)}np"
    return f"IVF{nlist},Flat"


class Index:
    """A cosine-similarity index over vectors numbered 0..ntotal-1 in the order added.

    Args:
        index: a faiss index with the inner-product metric.
    """

    def __init__(self, index):
        self.index = index
        self._set_nprobe()

    @classmethod
    def build(cls, batches: Callable[[], Iterable[np.ndarray]], n: int, dim: int,
              compressed: bool = False, exact_max: int = EXACT_MAX,
              seed: int = 0) -> Index:
        """An index of every vector `batches()` yields (in order), `n` in all.

        Args:
            batches: returns an iterable of (rows, dim) arrays; called twice for
                an inverted file (a sample to train the cells on, then the adds),
                so the vectors never need to be in memory at once.
            n: how many vectors the batches hold (chooses the index type).
            dim: their length.
            compressed: product-quantised codes above `exact_max` (see module doc).
            exact_max: the size up to which the index is exact.
            seed: for the training sample and k-means.
        """
        import faiss

        index = faiss.index_factory(int(dim), factory(n, dim, compressed, exact_max),
                                    faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(_sample(batches, n, TRAIN_PER_CELL * cells(n), seed))
        out = cls(index)
        for batch in batches():
            out.add(batch)
        return out

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def exact(self) -> bool:
        """Whether a search scans every vector (no inverted file)."""
        import faiss

        return faiss.try_extract_index_ivf(self.index) is None

    def _set_nprobe(self) -> None:
        import faiss

        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.nprobe = NPROBE

    def add(self, vectors: np.ndarray) -> None:
        """Append vectors (numbered after those already in)."""
        if len(vectors):
            self.index.add(normalise(vectors))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The `k` nearest of each query: (similarities, ids), each (len(queries), k),
        nearest first; ids are -1 where fewer than k were found."""
        k = int(min(k, self.ntotal))
        if k < 1:
            empty = np.zeros((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        return self.index.search(normalise(queries), k)

    def pairs(self, vectors: np.ndarray, min_similarity: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pairs (a, b, similarity), a < b, of the indexed vectors (given again as
        `vectors`, in the order added) at least `min_similarity` alike."""
        # faiss keeps similarities strictly above the radius; ours is inclusive
        radius = float(np.nextafter(np.float32(min_similarity), np.float32(-np.inf)))
        lims, sims, ids = self.index.range_search(normalise(vectors), radius)
        a = np.repeat(np.arange(len(vectors)), np.diff(lims.astype(np.int64)))
        keep = a < ids
        return a[keep], ids[keep], sims[keep]

    def save(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path) -> Index:
        import faiss

        return cls(faiss.read_index(str(path)))


def _sample(batches: Callable[[], Iterable[np.ndarray]], n: int, size: int,
            seed: int) -> np.ndarray:
    """About `size` vectors drawn evenly at random from all the batches, one pass."""
    rng = np.random.default_rng(seed)
    share = min(1.0, size / max(n, 1))
    picked = [normalise(b)[rng.random(len(b)) < share] for b in batches()]
    return np.concatenate(picked)


def near_pairs(vectors: np.ndarray, min_similarity: float, exact_max: int = EXACT_MAX
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of rows of `vectors` at least `min_similarity` alike (cosine):
    (a, b, similarity) with a < b. Exact up to `exact_max` rows, else found through
    an inverted file (near duplicates share a cell, or one of the NPROBE nearest)."""
    if len(vectors) < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32)
    index = Index.build(lambda: [vectors], len(vectors), vectors.shape[1],
                        exact_max=exact_max)
    return index.pairs(vectors, min_similarity)
