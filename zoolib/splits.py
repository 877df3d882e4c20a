"""Train / valid / test / benchmark splits keyed on image content.

A file's split is a function of its content hash alone, so adding images never
moves an existing one and exact duplicates always land together. A rewritten
image (rotated, orientation fixed) keeps the split of its first content: the
rewrite is recorded in `splits/origins.csv` and splits are keyed on that first
hash (`split_key`). The benchmark
set is frozen in `splits/benchmark.csv` class by class, when a class first
trains (`freeze_benchmark`): rows are only ever added, never changed.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from . import library, models
from .library import read_flags
from .workspace import Workspace, ZoolibError, write_atomic

SPLITS = ("train", "valid", "test", "benchmark")
DEFAULT_FRACTIONS = {"train": 0.7, "valid": 0.1, "test": 0.1, "benchmark": 0.1}
_BUCKETS = 10_000
_HASH = re.compile(r"^[0-9a-f]{16,}$")  # content hashes (`images.content_hash`): hex
# What to do when a side file of splits/ is damaged, and what deleting it costs.
_FRACTIONS_ADVICE = ("restore it from a backup (a discard may have moved it under _trash/). "
                     "Deleting it falls back to the default shares "
                     f"{DEFAULT_FRACTIONS}: if the workspace used other shares, that moves "
                     "images between splits, and later generations may be tested on images "
                     "earlier ones trained on")
_ORIGINS_ADVICE = ("restore it from a backup (a discard may have moved it under _trash/). "
                   "Deleting it makes each rotated or rewritten image take the split of its "
                   "new content, which may move it from training to test or back")
_BENCHMARK_ADVICE = ("restore it from a backup (a discard may have moved it under _trash/). "
                     "Deleting it freezes the benchmark again when a generation next trains "
                     "for real: drawn from today's library, it then also holds the images "
                     "that joined the benchmark bucket since (test images until now), so "
                     "benchmark figures of earlier generations no longer compare with later "
                     "ones")


def _check_fractions(fractions: dict[str, float]) -> list[tuple[str, int]]:
    if set(fractions) != set(SPLITS) or any(v < 0 for v in fractions.values()):
        raise ZoolibError(f"split fractions need non-negative values for {SPLITS}, "
                          f"got {fractions}")
    if abs(sum(fractions.values()) - 1) > 1e-6:
        raise ZoolibError(f"split fractions must add up to 1, got {sum(fractions.values())}")
    bounds, edge = [], 0.0
    for name in SPLITS:
        edge += fractions[name]
        bounds.append((name, round(edge * _BUCKETS)))
    return bounds


def workspace_fractions(ws: Workspace) -> dict[str, float]:
    """The split shares of a workspace: `splits/fractions.json`, else DEFAULT_FRACTIONS."""
    path = ws.splits / "fractions.json"
    if not path.exists():
        return dict(DEFAULT_FRACTIONS)
    try:
        fractions = json.loads(path.read_bytes())
        _check_fractions(fractions if isinstance(fractions, dict) else {})
    except (ValueError, TypeError) as exc:  # ZoolibError, JSON and Unicode errors too
        raise ZoolibError(f"{path} does not hold split shares ({exc}): "
                          f"{_FRACTIONS_ADVICE}") from exc
    return fractions


def set_fractions(ws: Workspace, fractions: dict[str, float]) -> dict[str, float]:
    """Fix the split shares of a new workspace, before anything was split.

    For a workspace whose test figures come from elsewhere (a public test set,
    say), the test and benchmark shares can go to training. Shares are fixed for
    good once the benchmark is drawn or a generation is trained: changing them
    would move images between splits, and a later generation could be tested on
    images an earlier one trained on.

    Raises:
        ZoolibError: bad shares, or the workspace has already been split.
    """
    _check_fractions(fractions)
    if ws.benchmark_csv.exists() or any(ws.models.glob("gen-*")):
        raise ZoolibError(f"the splits of {ws.root} are already in use (a benchmark or a "
                          "generation exists): their shares can no longer change")
    ws.splits.mkdir(parents=True, exist_ok=True)
    write_atomic(ws.splits / "fractions.json", json.dumps(fractions, indent=2))
    return dict(fractions)


# A rewrite (rotation, orientation fix) changes a file's bytes and so its content hash;
# its split must not change with them. Each rewrite is recorded as new hash -> the
# first hash the workspace saw for that image, and splits are keyed on the latter.
ORIGINS_COLUMNS = ["hash", "origin", "path", "time"]


def _origins_csv(ws: Workspace):
    return ws.splits / "origins.csv"


def _read_side_table(path: Path, columns: list[str], hashes: list[str],
                     advice: str) -> pd.DataFrame:
    """A CSV side table of splits/, checked: its columns, and hex content hashes in
    `hashes` columns.

    Raises:
        ZoolibError: the file cannot be parsed or lacks what it must hold, naming
            it, what is wrong and `advice` (what to do, and what deleting it costs).
    """
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except ValueError as exc:  # pandas' ParserError and UnicodeDecodeError are ValueErrors
        raise ZoolibError(f"{path} is not a readable CSV table ({type(exc).__name__}: "
                          f"{exc}): {advice}") from exc
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ZoolibError(f"{path} lacks the column(s) {', '.join(missing)} (it should have "
                          f"{', '.join(columns)}): {advice}")
    for col in hashes:
        bad = table.loc[~table[col].str.match(_HASH), col]
        if len(bad):
            raise ZoolibError(f"{path} has {len(bad)} row(s) whose {col} is not a content "
                              f"hash (first: {bad.iloc[0][:40]!r}): {advice}")
    return table


def _read_origins_table(ws: Workspace) -> pd.DataFrame:
    return _read_side_table(_origins_csv(ws), ORIGINS_COLUMNS, ["hash", "origin"],
                            _ORIGINS_ADVICE)


def read_origins(ws: Workspace) -> dict[str, str]:
    """Rewritten contents: content hash -> the image's first hash (its split key).

    Raises:
        ZoolibError: splits/origins.csv is damaged (named, with what to do).
    """
    if not _origins_csv(ws).exists():
        return {}
    table = _read_origins_table(ws)
    return dict(zip(table["hash"], table["origin"]))


def record_rewrite(ws: Workspace, old_hash: str, new_hash: str, path: str) -> str:
    """Record that the image at `path` was rewritten from `old_hash` to `new_hash`.

    Returns:
        The image's split key (the first hash seen), which it keeps.
    """
    origins = read_origins(ws)
    origin = origins.get(old_hash, old_hash)
    if new_hash == origin:  # rewritten back to its first bytes (an undo)
        return origin
    path_csv = _origins_csv(ws)
    table = (_read_origins_table(ws) if path_csv.exists()
             else pd.DataFrame(columns=ORIGINS_COLUMNS))
    row = {"hash": new_hash, "origin": origin, "path": path,
           "time": pd.Timestamp.now(tz="UTC").isoformat()}
    table = pd.concat([table[table["hash"] != new_hash], pd.DataFrame([row])], ignore_index=True)
    ws.splits.mkdir(parents=True, exist_ok=True)
    write_atomic(path_csv, table.to_csv(index=False))
    return origin


def split_key(ws: Workspace, hashes: pd.Series) -> pd.Series:
    """The key each content's split is drawn from: its first hash (see `record_rewrite`)."""
    origins = read_origins(ws)
    return hashes.map(origins).fillna(hashes) if origins else hashes


def bucket(hashes: pd.Series) -> pd.Series:
    """A number in [0, 10000) from each hex content hash."""
    return hashes.str[:8].map(lambda h: int(h, 16) % _BUCKETS)


def assign(hashes: pd.Series, fractions: dict[str, float] | None = None) -> pd.Series:
    """The split of each content hash (a pure function of the hash).

    Args:
        hashes: hex content hashes.
        fractions: share of each split; DEFAULT_FRACTIONS when None (the
            functions taking a workspace use its `workspace_fractions`).

    Returns:
        A Series of split names aligned with `hashes`.
    """
    bounds = _check_fractions(fractions or DEFAULT_FRACTIONS)
    b = bucket(hashes)
    out = pd.Series("benchmark", index=hashes.index, dtype=object)
    lower = 0
    for name, upper in bounds:
        out[(b >= lower) & (b < upper)] = name
        lower = upper
    return out


BENCHMARK_COLUMNS = ["hash", "path", "label", "added"]


def read_benchmark(ws: Workspace) -> pd.DataFrame:
    """The frozen benchmark set as saved (no side effects; empty before the first freeze).

    Returns:
        Columns hash (the split key: see `split_key`), path, label, added (UTC
        timestamp of the freeze).

    Raises:
        ZoolibError: splits/benchmark.csv is damaged (named, with what is wrong
            and what to do).
    """
    if not ws.benchmark_csv.exists():
        return pd.DataFrame(columns=BENCHMARK_COLUMNS)
    table = _read_side_table(ws.benchmark_csv, BENCHMARK_COLUMNS, ["hash"], _BENCHMARK_ADVICE)
    empty = table["label"] == ""
    if empty.any():
        raise ZoolibError(f"{ws.benchmark_csv} has {int(empty.sum())} row(s) without a label: "
                          f"{_BENCHMARK_ADVICE}")
    return table


def freeze_benchmark(ws: Workspace, manifest: pd.DataFrame, classes: list[str],
                     fractions: dict[str, float] | None = None) -> pd.DataFrame:
    """Freeze the benchmark rows of the `classes` that have none yet, and save.

    Training calls it with the classes that reached `MIN_IMAGES` (a throw-away run
    does not), so a class's benchmark is drawn from the library it had when it
    first reached the cutoff: not from the handful of images a class starts with.
    Its rows are its readable, non-discarded images in the benchmark bucket. Rows
    are only ever added: later images of a frozen class that fall in the
    benchmark bucket are test images, so the set that compares generations stays
    the same.

    Returns:
        The whole frozen set (see `read_benchmark`).
    """
    frozen = read_benchmark(ws)
    todo = [c for c in classes if c not in set(frozen["label"])]
    ok = _candidates(manifest, todo, read_flags(ws))
    ok = ok.assign(hash=split_key(ws, ok["hash"])).drop_duplicates("hash")  # keys, stored
    new = ok[assign(ok["hash"], fractions or workspace_fractions(ws)) == "benchmark"]
    if new.empty:
        return frozen
    new = new.assign(added=pd.Timestamp.now(tz="UTC").isoformat())[BENCHMARK_COLUMNS]
    frozen = pd.concat([frozen, new], ignore_index=True)
    ws.splits.mkdir(parents=True, exist_ok=True)
    write_atomic(ws.benchmark_csv, frozen.to_csv(index=False))
    return frozen


def _candidates(manifest: pd.DataFrame, classes: list[str], flags: pd.DataFrame) -> pd.DataFrame:
    """Readable, non-discarded manifest rows of `classes`."""
    return manifest[manifest["readable"] & manifest["label"].isin(classes)
                    & ~manifest["path"].isin(flags.loc[flags["discard"], "path"])]


def label_conflicts(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows whose content (hash) is filed under more than one class, by hash."""
    labels = rows.groupby("hash")["label"].transform("nunique")
    return rows[labels > 1].sort_values(["hash", "path"])


def conflicting_labels(ws: Workspace, manifest: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Exact duplicates filed under two or more of `classes`: path, label, hash.

    `split_manifest` leaves them out; curation resolves them (discard the wrong
    copy, or move it).
    """
    rows = _candidates(manifest, classes, read_flags(ws))
    return label_conflicts(rows)[["path", "label", "hash"]].reset_index(drop=True)


def split_manifest(ws: Workspace, manifest: pd.DataFrame, classes: list[str],
                   fractions: dict[str, float] | None = None) -> pd.DataFrame:
    """Readable images of `classes` with their split.

    Images in the frozen benchmark keep the split "benchmark"; other images that
    fall in the benchmark bucket are test images. Images flagged as discarded in
    `library/_flags.csv` are left out, and so are contents filed under two or more
    of `classes` (`conflicting_labels`: training them under both labels would
    teach the model nonsense); pinned ones take their pinned split (except frozen
    benchmark images, which stay in the benchmark).

    Returns:
        The manifest rows of `classes` plus a `split` column.
    """
    flags = read_flags(ws)
    rows = _candidates(manifest, classes, flags)
    rows = rows[~rows["path"].isin(set(label_conflicts(rows)["path"]))].copy()
    fractions = fractions or workspace_fractions(ws)
    key = split_key(ws, rows["hash"])
    rows["split"] = assign(key, fractions)
    bench = set(read_benchmark(ws)["hash"])
    late = (rows["split"] == "benchmark") & ~key.isin(bench)
    rows.loc[late, "split"] = "test"
    pins = rows["path"].map(flags.set_index("path")["pin"]).fillna("")
    pinned = (pins != "") & (rows["split"] != "benchmark")
    rows.loc[pinned, "split"] = pins[pinned]
    return rows.reset_index(drop=True)


def fold_of(hashes: pd.Series, k: int) -> pd.Series:
    """The cross-validation fold (0..k-1) of each hex content hash.

    Uses other hash digits than `bucket`, so folds are independent of the
    train/valid/test split and stay fixed as images are added.
    """
    if int(k) < 2:
        raise ZoolibError(f"FOLDS must be at least 2 for cross-validation, got {k}")
    return hashes.str[8:16].map(lambda h: int(h, 16) % int(k)).astype(int)


def apply_fold(data: pd.DataFrame, k: int, fold: int) -> pd.DataFrame:
    """Re-split the train and valid rows of a split manifest for fold `fold` of `k`.

    Fold `fold` of the train+valid pool becomes the valid split and the other
    folds the train split; test and benchmark rows are untouched.

    Raises:
        ZoolibError: `fold` is not in 0..k-1.
    """
    if not 0 <= int(fold) < int(k):
        raise ZoolibError(f"FOLD must be in 0..{int(k) - 1} for FOLDS={k}, got {fold}")
    out = data.copy()
    pool = out["split"].isin(["train", "valid"])
    folds = fold_of(out.loc[pool, "hash"], k)
    out.loc[pool, "split"] = (folds == int(fold)).map({True: "valid", False: "train"})
    return out


def split_rows(ws: Workspace, manifest: pd.DataFrame, classes: list[str],
               split: str = "test") -> pd.DataFrame:
    """The rows of one split ("test" by default) of a generation's classes."""
    data = split_manifest(ws, manifest, classes)
    return data[data["split"] == split].reset_index(drop=True)


def _keyed(ws: Workspace, manifest: pd.DataFrame) -> pd.DataFrame:
    """Readable, non-discarded manifest rows with their split `key`, by which saved
    splits and the benchmark find an image again after a rewrite."""
    ok = manifest[manifest["readable"] & ~manifest["path"].isin(library.discarded_paths(ws))]
    return ok.assign(key=split_key(ws, ok["hash"]))


def generation_rows(ws: Workspace, generation: str, manifest: pd.DataFrame,
                    classes: list[str], split: str = "test") -> pd.DataFrame:
    """One split of a generation, from the splits.parquet it was trained with.

    Rows are found by split key (`split_key`) in today's library: a file may have
    moved, or been rotated since; its label is today's; discarded and unreadable
    images are left out. A generation saved before splits were kept gets today's
    split. Evaluation reads its test rows here, the nearest-neighbour score its
    training rows.
    """
    saved = models.read_splits(ws, generation)
    if saved is None:
        return split_rows(ws, manifest, classes, split)
    ok = _keyed(ws, manifest).drop_duplicates("key")
    wanted = pd.DataFrame({"key": split_key(ws, saved.loc[saved["split"] == split, "hash"])})
    return (wanted.drop_duplicates().merge(ok, on="key").drop(columns="key")
            .sort_values("path", ignore_index=True))


def test_rows(ws: Workspace, generation: str, manifest: pd.DataFrame,
              classes: list[str]) -> pd.DataFrame:
    """The generation's own test split (`generation_rows`)."""
    return generation_rows(ws, generation, manifest, classes, "test")


def trained_hashes(ws: Workspace, generation: str) -> set[str]:
    """Split keys (`splits.split_key`) of the images the generation or any ancestor
    in its lineage trained on."""
    hashes, name, seen = set(), generation, set()
    while name and name not in seen and (ws.models / name / "model.json").exists():
        seen.add(name)
        saved = models.read_splits(ws, name)
        if saved is not None:
            hashes |= set(split_key(ws, saved.loc[saved["split"] == "train", "hash"]))
        name = models.read_info(ws, name).get("parent")
    return hashes


def drop_trained(ws: Workspace, rows: pd.DataFrame, keys: set[str]) -> tuple[pd.DataFrame, int]:
    """`rows` without the images whose split key is in `keys`, and how many were dropped."""
    seen = split_key(ws, rows["hash"]).isin(keys)
    return rows[~seen].reset_index(drop=True), int(seen.sum())


def benchmark_rows(ws: Workspace, manifest: pd.DataFrame) -> pd.DataFrame:
    """The frozen benchmark images still in the library and not discarded, with current
    path, label, source.

    Labels of every class are returned; a generation scores those in its class list.
    """
    ok = _keyed(ws, manifest).drop_duplicates("hash")
    frozen = read_benchmark(ws)[["hash"]].rename(columns={"hash": "key"})
    return (frozen.merge(ok, on="key").drop(columns="key")
            .sort_values("path", ignore_index=True))
