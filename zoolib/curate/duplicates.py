"""Finding problems in the library: unreadable files, exact and near duplicates.

Near duplicates: perceptual hashes compared by Hamming distance with multi-index
hashing, never an N x N matrix; optionally embedding similarity from a generation
(`embedding_pairs`, given the embeddings).
"""
from __future__ import annotations



import numpy as np
import pandas as pd

from .. import ann
from ..workspace import ZoolibError

_BANDS = 4  # multi-index hashing: a 64-bit hash is looked up by four 16-bit bands
_CHUNK = 2_000_000  # candidate pairs verified at once (bounds memory)
PAIR_COLUMNS = ["path_a", "path_b", "label_a", "label_b", "kind", "distance", "similarity"]


def unreadable(manifest: pd.DataFrame) -> pd.DataFrame:
    """Files that could not be decoded, with the reason.

    Returns:
        Columns path, label, bytes, error.
    """
    bad = manifest.loc[~manifest["readable"], ["path", "label", "bytes", "error"]]
    return bad.reset_index(drop=True)


def exact_duplicates(manifest: pd.DataFrame) -> pd.DataFrame:
    """Groups of readable files with identical content.

    Returns:
        One row per group: hash, count, paths (list), labels (sorted list) and
        conflict (True when copies are filed under different classes); largest
        groups first.
    """
    ok = manifest[manifest["readable"]]
    dup = ok[ok.duplicated("hash", keep=False)]
    groups = dup.groupby("hash").agg(count=("path", "size"), paths=("path", list),
                                     labels=("label", lambda s: sorted(set(s))))
    groups["conflict"] = groups["labels"].map(len) > 1
    return groups.reset_index().sort_values(["count", "hash"], ascending=[False, True],
                                            ignore_index=True)


# ---------------------------------------------------------------- near duplicates

def hash_codes(phashes) -> np.ndarray:
    """16-hex-digit perceptual hashes -> uint64 array (one vectorised parse)."""
    text = "".join(phashes)
    if len(text) != 16 * len(phashes):
        raise ZoolibError("perceptual hashes must be 16 hex digits each (rescan the library)")
    return np.frombuffer(bytes.fromhex(text), dtype=">u8").astype(np.uint64)


def _band_masks(radius: int) -> np.ndarray:
    """All 16-bit masks with at most `radius` bits set."""
    values = np.arange(1 << 16, dtype=np.uint32)
    return values[np.bitwise_count(values) <= radius].astype(np.int64)


def hamming_pairs(codes: np.ndarray, max_distance: int) -> tuple[np.ndarray, ...]:
    """All pairs of 64-bit codes within `max_distance` bits, without an N x N matrix.

    Multi-index hashing: if two codes differ in at most d bits, one of their four
    16-bit bands differs in at most d // 4 bits. Each band is sorted once; every
    code looks up the band values within that radius (binary search), and the
    candidates are verified with a popcount. Exact for any d <= 15.

    Args:
        codes: uint64 hashes.
        max_distance: the largest Hamming distance reported (0..15).

    Returns:
        Arrays i, j (i < j, indices into `codes`) and distance, sorted by (i, j).
    """
    if not 0 <= max_distance < 4 * _BANDS:
        raise ZoolibError(f"max_distance must be in 0..{4 * _BANDS - 1}, got {max_distance}")
    n = len(codes)
    found = [np.empty(0, np.int64)]
    masks = _band_masks(max_distance // _BANDS)
    for band in range(_BANDS):
        keys = ((codes >> np.uint64(16 * band)) & np.uint64(0xFFFF)).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        # where each of the 65536 band values starts in sorted order: lookups are gathers
        starts = np.searchsorted(keys[order], np.arange((1 << 16) + 1))
        for mask in masks:
            query = keys ^ mask
            lo = starts[query]
            found.extend(_verify(codes, order, lo, starts[query + 1] - lo, max_distance))
    pairs = np.unique(np.concatenate(found))
    i, j = pairs // max(n, 1), pairs % max(n, 1)
    return i, j, np.bitwise_count(codes[i] ^ codes[j]).astype(np.int64)


def _verify(codes, order, lo, count, max_distance):
    """Expand candidate ranges to pairs in chunks; keep those within the distance."""
    n, out = len(codes), []
    ends = np.cumsum(count)
    start = 0
    while start < n:
        stop = int(np.searchsorted(ends, (ends[start - 1] if start else 0) + _CHUNK, "right"))
        stop = min(max(stop, start + 1), n)
        cnt = count[start:stop]
        q = np.repeat(np.arange(start, stop), cnt)
        offset = np.arange(len(q)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        c = order[lo[q] + offset]
        keep = q < c
        q, c = q[keep], c[keep]
        close = np.bitwise_count(codes[q] ^ codes[c]) <= max_distance
        out.append(q[close] * n + c[close])
        start = stop
    return out


def near_duplicate_pairs(manifest: pd.DataFrame, max_distance: int = 10) -> pd.DataFrame:
    """Pairs of readable files that are exact or near duplicates.

    Args:
        manifest: from `library.scan` (needs its phash column).
        max_distance: the largest Hamming distance between 64-bit perceptual
            hashes that counts as a near duplicate (0..15).

    Returns:
        PAIR_COLUMNS: kind "exact" (same bytes, distance 0) or "near";
        similarity is empty (it is filled by `embedding_pairs`).
    """
    ok = manifest[manifest["readable"] & (manifest["phash"] != "")]
    files = ok[["path", "label", "hash"]]
    reps = ok.drop_duplicates("hash").reset_index(drop=True)
    i, j, dist = hamming_pairs(hash_codes(reps["phash"].tolist()), max_distance)
    near = pd.DataFrame({"hash_a": reps["hash"].to_numpy()[i],
                         "hash_b": reps["hash"].to_numpy()[j], "distance": dist})
    near = (near.merge(files.add_suffix("_a"), on="hash_a")
            .merge(files.add_suffix("_b"), on="hash_b").assign(kind="near"))
    same = files.merge(files, on="hash", suffixes=("_a", "_b"))
    exact = same[same["path_a"] < same["path_b"]].assign(kind="exact", distance=0)
    pairs = pd.concat([exact, near], ignore_index=True).assign(similarity=np.nan)
    return pairs[PAIR_COLUMNS].sort_values(["distance", "path_a", "path_b"],
                                           ignore_index=True)


def embedding_pairs(rows: pd.DataFrame, embeddings: np.ndarray,
                    min_similarity: float = 0.97, embedder: str = "model") -> pd.DataFrame:
    """Pairs of images whose embeddings (a generation's or a pretrained backbone's) are close.

    Curation stays below the model: the embeddings are given, one row per row of
    `rows` (`embedder.library_vectors` gives a pretrained backbone's or, with
    "model", a generation's pre-logit features). Pairs come from a nearest-neighbour index (`ann.near_pairs`:
    exact up to `ann.EXACT_MAX` images, an inverted file above), not an N x N scan.

    Args:
        rows: manifest rows (path, label), e.g. the readable ones, one per content hash.
        embeddings: (len(rows), d) float array.
        min_similarity: the least cosine similarity that counts as a near duplicate.
        embedder: whose embeddings, for the pairs' kind.

    Returns:
        PAIR_COLUMNS with kind "embedding (<embedder>)" and the cosine similarity.

    Raises:
        ZoolibError: the embeddings are not one row per image.
    """
    if len(embeddings) != len(rows):
        raise ZoolibError(f"embedding_pairs: {len(embeddings)} embeddings for {len(rows)} "
                          "images; give one row per image, in the rows' order")
    emb = np.asarray(embeddings, np.float32).reshape(len(rows), -1)
    a, b, s = ann.near_pairs(emb, min_similarity)
    order = np.lexsort((b, a))  # in the rows' order, as the pairs of other kinds
    a, b, s = a[order], b[order], s[order]
    path, label = rows["path"].to_numpy(), rows["label"].to_numpy()
    pairs = pd.DataFrame({"path_a": path[a], "path_b": path[b], "label_a": label[a],
                          "label_b": label[b], "kind": f"embedding ({embedder})", "distance": np.nan,
                          "similarity": np.round(s, 4)})
    return pairs[PAIR_COLUMNS]


def components(paths: list[str], pairs: pd.DataFrame) -> pd.Series:
    """Connected-component id of each path in `pairs` (index: path)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    index = {p: k for k, p in enumerate(paths)}
    a = pairs["path_a"].map(index).to_numpy()
    b = pairs["path_b"].map(index).to_numpy()
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(paths), len(paths)))
    _, comp = connected_components(graph, directed=False)
    return pd.Series(comp, index=paths)


def suggest_keeper(rows: pd.DataFrame) -> str:
    """The member of a duplicate group to keep: most pixels, then a real photo over
    staged or synthetic, then the larger file (less compressed), then the shorter
    path (copies get suffixes), then the path."""
    rank = rows.assign(pixels=rows["width"] * rows["height"],
                       synthetic=rows["source"].map({"real": 0, "staged": 1}).fillna(2),
                       name_len=rows["path"].str.len())
    rank = rank.sort_values(["pixels", "synthetic", "bytes", "name_len", "path"],
                            ascending=[False, True, False, True, True])
    return str(rank["path"].iloc[0])


def near_duplicates(manifest: pd.DataFrame, pairs: pd.DataFrame | None = None,
                    max_distance: int = 10) -> pd.DataFrame:
    """Groups of exact and near duplicates, each with a suggested keeper.

    Args:
        manifest: from `library.scan`.
        pairs: from `near_duplicate_pairs` (computed with `max_distance` when
            None), optionally concatenated with `embedding_pairs`.
        max_distance: used only when `pairs` is None.

    Returns:
        One row per group: group (id), count, keeper, paths (keeper first),
        labels (sorted), conflict (several classes), kind ("exact" when all
        members share one content, else "near"), max_distance (largest Hamming
        distance of a linking pair); largest groups first.
    """
    cols = ["group", "count", "keeper", "paths", "labels", "conflict", "kind", "max_distance"]
    if pairs is None:
        pairs = near_duplicate_pairs(manifest, max_distance)
    if pairs.empty:
        return pd.DataFrame(columns=cols)
    paths = sorted(set(pairs["path_a"]) | set(pairs["path_b"]))
    comp = components(paths, pairs)
    members = manifest.set_index("path").loc[paths].reset_index().assign(
        group=comp.loc[paths].to_numpy())
    link = pairs.assign(group=pairs["path_a"].map(comp)).groupby("group")["distance"].max()
    rows = []
    for gid, g in members.groupby("group"):
        keeper = suggest_keeper(g)
        rows.append({"group": int(gid), "count": len(g), "keeper": keeper,
                     "paths": [keeper] + sorted(set(g["path"]) - {keeper}),
                     "labels": sorted(set(g["label"])), "conflict": g["label"].nunique() > 1,
                     "kind": "exact" if g["hash"].nunique() == 1 else "near",
                     "max_distance": link.get(gid)})
    out = pd.DataFrame(rows, columns=cols).sort_values(["count", "keeper"],
                                                       ascending=[False, True])
    return out.reset_index(drop=True)
