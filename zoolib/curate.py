"""Curation: find problems in the library and fix them without losing anything.

Finding: unreadable files, exact duplicates (same bytes), near duplicates
(perceptual hashes compared by Hamming distance with multi-index hashing, never
an N x N matrix; optionally embedding similarity from a generation), leakage of
duplicates across splits, EXIF orientation tags that disagree with the pixels,
and how much of each class is staged or synthetic.

Fixing, and where each fact lives (every action is one journal row; `undo`
reverses any of them):

- Rotation: the original is moved to `_trash/` (a journal "trash" row) and the
  rotated pixels are written as a new file at its path (a "rotate" row naming
  that trash row). Undo trashes the rotated file and moves the original back.
- Provenance (real, staged, synthetic): the `source` column of
  `library/_meta.csv`, rewritten atomically ("source" rows).
- Discard flags and split pins: `library/_flags.csv` (path, discard, reason,
  pin), rewritten atomically ("discard", "undiscard", "pin", "unpin" rows);
  `library.read_flags` reads it and `splits.split_manifest` drops discarded
  images and puts pinned ones in their pinned split.

Table edits record the old and new values of every changed row, so an undo
restores exactly what was there. Flags and provenance are keyed by the path in
the library, like `_meta.csv`.
"""
from __future__ import annotations

import functools
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from . import journal, library, splits
from .images import content_hash
from .workspace import (UNKNOWN, Workspace, ZoolibError, check_class_name, check_user_file,
                        class_folders, lock, user_area, write_atomic)

_BANDS = 4  # multi-index hashing: a 64-bit hash is looked up by four 16-bit bands
_CHUNK = 2_000_000  # candidate pairs verified at once (bounds memory)
_HELD_OUT = ["train", "valid", "test", "benchmark"]  # later = further from training
ROTATIONS = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180,
             270: Image.Transpose.ROTATE_90}  # clockwise degrees -> PIL transpose
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


def embedding_pairs(ws: Workspace, manifest: pd.DataFrame, generation: str = "last",
                    min_similarity: float = 0.97, batch_size: int = 64) -> pd.DataFrame:
    """Pairs of readable images whose embeddings from a generation are close.

    The embedding is the model's pre-logit feature vector (plain torch, the
    generation's own preprocessing). Pairs come from a nearest-neighbour index
    (`ann.near_pairs`: exact up to `ann.EXACT_MAX` images, an inverted file above),
    not from an N x N scan.

    Args:
        ws: the workspace.
        manifest: from `library.scan`.
        generation: a generation name or "last".
        min_similarity: the least cosine similarity that counts as a near duplicate.
        batch_size: images per forward pass.

    Returns:
        PAIR_COLUMNS with kind "embedding" and the cosine similarity.
    """
    import torch  # lazy: torch is only needed when this option is used

    from . import ann, inference

    ok = manifest[manifest["readable"]].drop_duplicates("hash").reset_index(drop=True)
    loaded = inference.load(ws, generation)
    feats = []
    for start in range(0, len(ok), batch_size):
        paths = ok["path"].iloc[start:start + batch_size]
        batch = [inference.file_tensor(ws.library / p, loaded.info) for p in paths]
        feats.append(inference.forward(loaded, torch.stack(batch))[1].numpy())
    emb = np.concatenate(feats) if feats else np.zeros((0, 1), np.float32)
    a, b, s = ann.near_pairs(emb, min_similarity)
    order = np.lexsort((b, a))  # in manifest order, as the pairs of other kinds
    a, b, s = a[order], b[order], s[order]
    pairs = pd.DataFrame({"path_a": ok["path"].to_numpy()[a], "path_b": ok["path"].to_numpy()[b],
                          "label_a": ok["label"].to_numpy()[a],
                          "label_b": ok["label"].to_numpy()[b], "kind": "embedding",
                          "distance": np.nan, "similarity": np.round(s, 4)})
    return pairs[PAIR_COLUMNS]


def _components(paths: list[str], pairs: pd.DataFrame) -> pd.Series:
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
    comp = _components(paths, pairs)
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


# ---------------------------------------------------------------- leakage

def current_splits(ws: Workspace, manifest: pd.DataFrame) -> pd.Series:
    """The split of every readable, non-discarded library image (index: path).

    Uses `splits.split_manifest` over all classes but Unknown, so it honours
    discard flags, pins and the frozen benchmark exactly as training does.
    """
    classes = sorted(set(manifest["label"]) - {UNKNOWN})
    data = splits.split_manifest(ws, manifest, classes)
    return data.set_index("path")["split"]


def leakage(ws: Workspace, manifest: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Duplicate and near-duplicate pairs that sit in different splits.

    Args:
        ws: the workspace.
        manifest: from `library.scan`.
        pairs: from `near_duplicate_pairs` and/or `embedding_pairs`.

    Returns:
        PAIR_COLUMNS plus split_a, split_b, train_leak (one side is trained on,
        the other evaluated) and suggested_pin (the more held-out split, test
        instead of the frozen benchmark); train leaks first.
    """
    split = current_splits(ws, manifest)
    out = pairs.assign(split_a=pairs["path_a"].map(split), split_b=pairs["path_b"].map(split))
    out = out.dropna(subset=["split_a", "split_b"])
    out = out[out["split_a"] != out["split_b"]].copy()
    out["train_leak"] = (out["split_a"] == "train") ^ (out["split_b"] == "train")
    rank = {s: k for k, s in enumerate(_HELD_OUT)}
    far = np.maximum(out["split_a"].map(rank), out["split_b"].map(rank))
    out["suggested_pin"] = [_pinnable(_HELD_OUT[int(k)]) for k in far]
    return out.sort_values(["train_leak", "path_a", "path_b"], ascending=[False, True, True],
                           ignore_index=True)


def _pinnable(split: str) -> str:
    return "test" if split == "benchmark" else split


def pin_leaking_groups(ws: Workspace, manifest: pd.DataFrame, pairs: pd.DataFrame) -> int | None:
    """Pin every duplicate group that spans splits to its most held-out split.

    The whole group (all images linked by `pairs`) is pinned, so no member is
    left behind in training; frozen benchmark members stay in the benchmark.

    Returns:
        The journal event id of the pin, or None when nothing leaks.
    """
    leaks = leakage(ws, manifest, pairs)
    if leaks.empty:
        return None
    split = current_splits(ws, manifest)
    pairs = pairs[pairs["path_a"].isin(split.index) & pairs["path_b"].isin(split.index)]
    paths = sorted(set(pairs["path_a"]) | set(pairs["path_b"]))
    comp = _components(paths, pairs)
    rank = {s: k for k, s in enumerate(_HELD_OUT)}
    pins: dict[str, str] = {}
    for gid in set(comp.loc[list(leaks["path_a"])]):
        group = list(comp.index[comp == gid])
        target = _pinnable(max(split.loc[group], key=rank.get))
        pins.update({p: target for p in group if split.loc[p] != "benchmark"})
    return _edit_table(ws, library.flags_csv(ws), library.FLAG_COLUMNS, "pin",
                       {p: {"pin": s} for p, s in pins.items()})


# ---------------------------------------------------------------- table edits

def _read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    holds = library.META_HOLDS if path.name == "_meta.csv" else library.FLAGS_HOLDS
    table = (library._read_csv(path, holds) if path.exists()
             else pd.DataFrame(columns=["path"] + columns))
    for col in columns:
        if col not in table.columns:
            table[col] = ""
    return table.drop_duplicates("path", keep="last").set_index("path")


def _write_table(path: Path, table: pd.DataFrame) -> None:
    write_atomic(path, table.reset_index().to_csv(index=False))


def _check_paths(ws: Workspace, paths) -> list[str]:
    """Library-relative image paths, each a real file under a class folder (no link,
    no side table, nothing outside the library)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    for p in paths:
        if user_area(ws, ws.library / p) != "library":
            raise ZoolibError(f"{p!r} is not an image in a class folder of library {ws.library}")
        check_user_file(ws, ws.library / p, areas=("library",))
    return paths


def _edit_table(ws: Workspace, path: Path, columns: list[str], action: str,
                updates: dict[str, dict[str, str]]) -> int:
    """Set columns of rows keyed by image path, rewrite the table, journal old and new."""
    with lock(ws):
        table = _read_table(path, columns)
        # Edited as a dict of rows, then one frame: adding rows to a frame one at a
        # time copies it each time (pinning 12,000 images took 4 minutes).
        rows, changes = table.to_dict("index"), []
        for img, values in updates.items():
            old = rows.get(img)
            row = None if values is None else {**(old or {c: "" for c in table.columns}),
                                                **values}
            if row is None:
                rows.pop(img, None)
            else:
                rows[img] = row
            changes.append({"path": img, "old": old, "new": row})
        table = pd.DataFrame.from_dict(rows, orient="index", columns=table.columns)
        table.index.name = "path"
        # Row first: a kill before the rewrite leaves an undo that restores what
        # is already there, never an edit without its row.
        event = journal.record(ws, action, path=path.relative_to(ws.root).as_posix(),
                               table=path.relative_to(ws.root).as_posix(), changes=changes)
        _write_table(path, table)
        return event


def _undo_table(ws: Workspace, row: pd.Series, details: dict) -> int:
    path = ws.root / details["table"]
    table = _read_table(path, [])
    for change in reversed(details["changes"]):
        if change["old"] is None:
            table = table.drop(index=change["path"], errors="ignore")
        else:
            table.loc[change["path"]] = pd.Series(change["old"])
    _write_table(path, table.fillna(""))
    return journal.record(ws, "undo", path=row["path"], undoes=int(row["id"]))


# ---------------------------------------------------------------- flags and provenance

def discard(ws: Workspace, paths, reason: str) -> int:
    """Flag images as unsuitable for training: they stay in the library but are left
    out of every split. Returns the journal event id."""
    if not reason.strip():
        raise ZoolibError("discard needs a reason (e.g. 'subject too small to zoom')")
    return _edit_table(ws, library.flags_csv(ws), library.FLAG_COLUMNS, "discard",
                       {p: {"discard": "1", "reason": reason} for p in _check_paths(ws, paths)})


def undiscard(ws: Workspace, paths) -> int:
    """Clear the discard flag of images (they rejoin their splits)."""
    return _edit_table(ws, library.flags_csv(ws), library.FLAG_COLUMNS, "undiscard",
                       {p: {"discard": "", "reason": ""} for p in _check_paths(ws, paths)})


def pin(ws: Workspace, paths, split: str) -> int:
    """Pin images (a duplicate group) to one split: train, valid or test.

    Raises:
        ZoolibError: unknown split, or "benchmark" (the benchmark set is frozen).
    """
    if split not in ("train", "valid", "test"):
        raise ZoolibError(f"cannot pin to split {split!r}: use train, valid or test "
                          "(the benchmark set is frozen)")
    return _edit_table(ws, library.flags_csv(ws), library.FLAG_COLUMNS, "pin",
                       {p: {"pin": split} for p in _check_paths(ws, paths)})


def unpin(ws: Workspace, paths) -> int:
    """Remove split pins (images return to their content-hash split)."""
    return _edit_table(ws, library.flags_csv(ws), library.FLAG_COLUMNS, "unpin",
                       {p: {"pin": ""} for p in _check_paths(ws, paths)})


def set_source(ws: Workspace, paths, source: str) -> int:
    """Mark images as real, staged or synthetic in `library/_meta.csv`."""
    if source not in library.SOURCES:
        raise ZoolibError(f"source {source!r} is not one of {', '.join(library.SOURCES)}")
    return _edit_table(ws, ws.meta_csv, ["source", "notes"], "source",
                       {p: {"source": source} for p in _check_paths(ws, paths)})


def provenance(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per class: readable images by source and the share that is staged or synthetic.

    Returns:
        Columns label, real, staged, synthetic, total, staged_share,
        synthetic_share, reliance (staged + synthetic share); most reliant first.
    """
    ok = manifest[manifest["readable"]]
    table = pd.crosstab(ok["label"], ok["source"]).reindex(columns=list(library.SOURCES),
                                                           fill_value=0)
    table["total"] = table.sum(axis=1)
    table["staged_share"] = (table["staged"] / table["total"]).round(3)
    table["synthetic_share"] = (table["synthetic"] / table["total"]).round(3)
    table["reliance"] = (table["staged_share"] + table["synthetic_share"]).round(3)
    table.columns.name = None
    return table.reset_index().sort_values(["reliance", "label"], ascending=[False, True],
                                           ignore_index=True)


# ---------------------------------------------------------------- orientation

def _keep_split(ws: Workspace, rel: str, old: bytes, new: bytes) -> None:
    """Record a rewrite so the image keeps its split (splits.record_rewrite)."""
    splits.record_rewrite(ws, content_hash(old), content_hash(new), rel)


def _locked(action):
    """Run a curation action under the workspace lock (one action at a time)."""
    @functools.wraps(action)
    def run(ws: Workspace, *args, **kwargs):
        with lock(ws):
            journal.recover(ws)
            return action(ws, *args, **kwargs)
    return run


@_locked
def rotate(ws: Workspace, path: str, degrees: int) -> int:
    """Rotate a library image clockwise by 90, 180 or 270 degrees, keeping the original.

    The upright pixels (EXIF applied) are turned and written at the same path
    (no orientation tag; JPEG quality 95); the original goes to `_trash/`.

    Returns:
        The journal id of the "rotate" event (undo it with `undo`).
    """
    if degrees not in ROTATIONS:
        raise ZoolibError(f"rotation must be 90, 180 or 270 degrees, got {degrees}")
    rel = _check_paths(ws, path)[0]
    src = ws.library / rel
    with Image.open(src) as img:
        fmt = img.format or "PNG"
        turned = ImageOps.exif_transpose(img).transpose(ROTATIONS[degrees])
    buf = io.BytesIO()  # encode before moving anything, so a failure changes nothing
    turned.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    _keep_split(ws, rel, src.read_bytes(), buf.getvalue())
    trashed = journal.trash(ws, src.relative_to(ws.root), reason=f"rotate {degrees}")
    src.write_bytes(buf.getvalue())
    dest = journal.dest(ws, trashed)
    return journal.record(ws, "rotate", path=src.relative_to(ws.root).as_posix(), dest=dest,
                          degrees=degrees, trash_event=trashed)


def _undo_rotate(ws: Workspace, row: pd.Series, details: dict) -> int:
    rotated = ws.root / row["path"]
    if not (ws.root / row["dest"]).exists():
        raise ZoolibError(f"cannot undo rotation {row['id']}: original {row['dest']} is missing")
    if rotated.exists():
        journal.trash(ws, row["path"], reason=f"undo rotate {row['id']}")
    journal.undo(ws, int(details["trash_event"]))
    return journal.record(ws, "undo", path=row["path"], undoes=int(row["id"]))


def exif_disagreements(ws: Workspace, manifest: pd.DataFrame) -> pd.DataFrame:
    """Images whose EXIF orientation tag disagrees with their pixels.

    Two cases are detectable from the file alone: a tag outside 1..8, and a
    quarter-turn tag (5..8) on pixels that were already turned (the stored size
    is the camera's recorded PixelXDimension x PixelYDimension swapped), which
    viewers and training would turn a second time.

    Returns:
        Columns path, label, orientation, width, height, problem, suggested
        (the fix: "strip tag" means rewrite upright without the tag).
    """
    rows = []
    tagged = manifest[manifest["readable"] & (manifest["orientation"] != 1)]
    for r in tagged.itertuples():
        problem = ""
        if not 1 <= r.orientation <= 8:
            problem = f"orientation tag {r.orientation} is not a valid value (1..8)"
        elif r.orientation >= 5:
            with Image.open(ws.library / r.path) as img:
                exif = img.getexif().get_ifd(0x8769)
            shot = (exif.get(0xA002), exif.get(0xA003))
            if None not in shot and shot[0] != shot[1] and (r.width, r.height) == shot[::-1]:
                problem = (f"pixels are already turned ({r.width}x{r.height}, camera recorded "
                           f"{shot[0]}x{shot[1]}) but tag {r.orientation} turns them again")
        if problem:
            rows.append({"path": r.path, "label": r.label, "orientation": r.orientation,
                         "width": r.width, "height": r.height, "problem": problem})
    return pd.DataFrame(rows, columns=["path", "label", "orientation", "width", "height",
                                       "problem"])


@_locked
def strip_orientation(ws: Workspace, path: str) -> int:
    """Rewrite an image's stored pixels without its EXIF orientation tag (the fix
    for pixels that were already turned); the original goes to `_trash/`, undoable
    like a rotation. Returns the journal event id."""
    rel = _check_paths(ws, path)[0]
    src = ws.library / rel
    with Image.open(src) as img:
        fmt = img.format or "PNG"
        img.load()
        buf = io.BytesIO()
        img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    _keep_split(ws, rel, src.read_bytes(), buf.getvalue())
    trashed = journal.trash(ws, src.relative_to(ws.root), reason="strip orientation tag")
    src.write_bytes(buf.getvalue())
    dest = journal.dest(ws, trashed)
    return journal.record(ws, "rotate", path=src.relative_to(ws.root).as_posix(), dest=dest,
                          degrees=0, trash_event=trashed)


# ---------------------------------------------------------------- class names

MERGE = "merge"


@_locked
def merge_classes(ws: Workspace, source: str, into: str) -> int:
    """Move every image of `library/<source>/` into `library/<into>/`, as one undoable event.

    The fix for two folders that are one class to a person ("Lion" beside
    "lion", see `library.name_issues`). Files keep their names (a counter is
    added where `into` has the name already); their rows in `_meta.csv` and
    `_flags.csv` move with them; the emptied folder is removed. Splits are
    keyed by content, so no image changes split.

    Returns:
        The journal id of the merge (undo it with `undo`).

    Raises:
        ZoolibError: either folder is not a class folder, or they are the same.
    """
    folders = {f.name: f for f in class_folders(ws)}
    for name in (source, into):
        if name not in folders or folders[name].is_symlink():
            raise ZoolibError(f"{name!r} is not a class folder of library {ws.library}")
    if source == into:
        raise ZoolibError(f"cannot merge class {source!r} into itself")
    files = sorted(Path(top) / n for top, dirs, names in os.walk(folders[source])
                   for n in names + [d for d in dirs if (Path(top) / d).is_symlink()])
    for f in files:  # all checked before the first moves: a link stops the merge here
        check_user_file(ws, f, areas=("library",))
    events, tables = _move_images(ws, files, into)
    for folder in sorted((p for p in folders[source].rglob("*") if p.is_dir()), reverse=True):
        folder.rmdir()
    folders[source].rmdir()
    return journal.record(ws, MERGE, path=f"library/{source}", dest=f"library/{into}",
                          label=into, events=events, tables=tables)


RELABEL = "relabel"


@_locked
def relabel(ws: Workspace, paths, cls: str) -> int:
    """Move library images to another class folder (a label fix), as one undoable event.

    Their `_meta.csv` and `_flags.csv` rows move with them; the content hash,
    and so the split, stays. A new class name creates the folder.

    Args:
        ws: the workspace.
        paths: library-relative image paths ("lion/x.jpg").
        cls: the class they belong to.

    Returns:
        The journal id of the relabel (undo it with `undo`).

    Raises:
        ZoolibError: a path is not a library image, or the class name is not plain
            (or differs from an existing class only by case).
    """
    cls = check_class_name(cls, ws)
    paths = _check_paths(ws, paths)
    same = [p for p in paths if p.split("/", 1)[0] == cls]
    if same:
        raise ZoolibError(f"{same[0]!r} is already in class {cls!r}")
    events, tables = _move_images(ws, [ws.library / p for p in paths], cls)
    return journal.record(ws, RELABEL, path=paths[0], dest=f"library/{cls}", label=cls,
                          paths=paths, events=events, tables=tables)


def _move_images(ws: Workspace, files: list[Path], into: str) -> tuple[list[int], list[int]]:
    """Move checked library files into class `into` with their side-table rows.

    Returns:
        The journal ids of the file moves and of the side-table edits.
    """
    events, moves = [], {}
    for f in files:
        event = journal.copy_into(ws, f, ws.library / into, action="move_image", label=into,
                                  move=True)
        events.append(event)
        moves[f.relative_to(ws.library).as_posix()] = \
            journal.dest(ws, event).removeprefix("library/")
    tables = [_rekey(ws, table, columns, moves) for table, columns in
              ((ws.meta_csv, ["source", "notes"]), (library.flags_csv(ws), library.FLAG_COLUMNS))]
    return events, [t for t in tables if t]


def _rekey(ws: Workspace, path: Path, columns: list[str], moves: dict[str, str]) -> int | None:
    """Move a side table's rows from old to new image paths (one journaled edit)."""
    if not path.exists():
        return None
    table = _read_table(path, columns)
    updates: dict[str, dict | None] = {}
    for old, new in moves.items():
        if old in table.index:
            updates[old] = None
            updates[new] = table.loc[old].to_dict()
    return _edit_table(ws, path, columns, "rekey", updates) if updates else None


def _undo_moves(ws: Workspace, row: pd.Series, details: dict) -> int:
    """Undo a merge or relabel: side tables first, then the files, newest first."""
    for table_event in reversed(details["tables"]):
        table_row = journal.undoable_event(ws, table_event)
        _undo_table(ws, table_row, json.loads(table_row["details"]))
    for event in reversed(details["events"]):
        journal.undo(ws, event)
    return journal.record(ws, "undo", path=row["path"], undoes=int(row["id"]))


CHECKED = "checked"


def mark_checked(ws: Workspace, paths) -> int:
    """Mark library images as checked by a person: label-issue lists leave them out.

    One journal row (undoable), so the marks survive kernels and follow the journal.

    Returns:
        The journal id of the mark.
    """
    paths = _check_paths(ws, paths)
    with lock(ws):
        return journal.record(ws, CHECKED, path=paths[0], paths=paths)


def checked_paths(ws: Workspace) -> set[str]:
    """Library paths marked checked (marks that were undone are not)."""
    rows = journal.read(ws, CHECKED)
    live = rows[~rows["undone"].astype(bool)]
    return {p for details in live["details"] for p in json.loads(details)["paths"]}


# ---------------------------------------------------------------- undo and history

@_locked
def undo(ws: Workspace, event_id: int) -> int:
    """Reverse any curation event (rotation, table edit, trash, copy, move).

    Returns:
        The id of the journal row recording the undo.

    Raises:
        ZoolibError: no such event, or it was already undone.
    """
    row = journal.undoable_event(ws, event_id)
    details = json.loads(row["details"] or "{}")
    if row["action"] == "rotate":
        return _undo_rotate(ws, row, details)
    if row["action"] in (MERGE, RELABEL):
        return _undo_moves(ws, row, details)
    if row["action"] == CHECKED:  # a mark only: the undo row is the whole undo
        return journal.record(ws, "undo", path=row["path"], undoes=int(row["id"]))
    if "changes" in details:
        return _undo_table(ws, row, details)
    return journal.undo(ws, event_id)


CURATION_ACTIONS = ("rotate", "discard", "undiscard", "pin", "unpin", "source", "trash", "merge",
                    "relabel", "checked")


def history(ws: Workspace, columns=None) -> pd.DataFrame:
    """Curation events of the journal, newest first, with whether each was undone
    (`columns` of them only, as `journal.read` names them; default all)."""
    return journal.read(ws, actions=CURATION_ACTIONS, columns=columns, newest_first=True)
