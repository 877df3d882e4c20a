"""Benchmark: a results table of 10,000,000 rows opened lazily by the widget.

Goals (issue 16): filter + page update under 200 ms; "more like this" under 100 ms;
peak memory of opening the table under 2 GB.

A synthetic run is written in the layout bulk identification writes (results.parquet
for a first run, a segment for a later one, row groups of `results.FLUSH_ROWS`),
with random scores and float16 embeddings of `--dim` values drawn around a few
hundred centres (so neighbours mean something). Then, each in a fresh process so
its peak RSS is its own:

- open: `bulkid.open_view` + `widgets.filter_sets`, peak RSS;
- update: median ms of `select_head` + `page_of` + reading the page's rows (what
  the widget does), over filter / class / band / sort changes; the first time of
  each sort is reported apart (a score's first page is a partition; path sorts
  every row once);
- more like this: the index build (once, saved beside the run), then median ms per
  query, and recall@k of the approximate index against an exact scan.

    nice .venv/bin/python bench/results_scale.py [--rows 10000000] [--dim 128]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CLASSES = [f"class{i:03d}" for i in range(200)]


def _batch(rng, start: int, n: int, dim: int, centres: np.ndarray, root: str) -> pa.Table:
    from zoolib.bulkid import results

    ids = np.arange(start, start + n)
    rel = pa.array([f"inbox/cam{i % 50:02d}/img_{i:08d}.jpg" for i in ids])
    path = pa.array([f"{root}/inbox/cam{i % 50:02d}/img_{i:08d}.jpg" for i in ids])
    conf = rng.uniform(0.05, 1.0, n)
    pred = rng.integers(0, len(CLASSES), n)
    emb = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.normal(size=(n, dim))
    blob = emb.astype("<f2").tobytes()
    offsets = pa.array(np.arange(0, n + 1, dtype=np.int32) * dim * 2)
    embedding = pa.BinaryArray.from_buffers(pa.binary(), n, [None, offsets.buffers()[1],
                                                             pa.py_buffer(blob)])
    top5 = pa.ListArray.from_arrays(pa.array(np.arange(0, 5 * n + 1, 5, dtype=np.int32)),
                                    pa.array(np.array(CLASSES)[(pred[:, None] + np.arange(5))
                                                               .ravel() % len(CLASSES)]))
    error = np.where(rng.random(n) < 0.005, "OSError: truncated", "")
    cols = {"path": path, "rel": rel, "hash": pa.array([f"{i:032x}" for i in ids]),
            "pred": pa.array(np.array(CLASSES)[pred]), "confidence": conf, "top5": top5,
            "top5_prob": pa.ListArray.from_arrays(top5.offsets, pa.array(
                np.tile([0.5, 0.2, 0.1, 0.1, 0.1], n).astype(np.float32))),
            "margin": conf * rng.uniform(0.1, 1, n), "entropy": rng.uniform(0, 3, n),
            "ood": rng.normal(-5, 1, n), "knn": rng.uniform(0, 1, n), "embedding": embedding,
            "generation": pa.array(["gen-0001"] * n), "error": pa.array(error)}
    table = pa.table(cols, schema=results.SCHEMA)
    bad = pa.array(error != "")
    return table.set_column(11, "embedding", pa.compute.if_else(
        bad, pa.scalar(None, pa.binary()), table.column("embedding")))


def write(root: Path, rows: int, dim: int) -> Path:
    """The synthetic run (90% first run, 10% a later one); its run folder."""
    from zoolib import workspace
    from zoolib.bulkid import results

    from PIL import Image

    ws = workspace.create(root)
    for cls in CLASSES[:10]:  # a small library: the filters read its class counts
        (ws.library / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 90, 20)).save(ws.library / cls / f"{i}.png")
    run_dir = results.run_dir(ws, "big")
    meta = {"name": "big", "generation": "gen-0001", "classes": CLASSES}
    (run_dir / "run.json").write_text(json.dumps(meta))
    schema = results.SCHEMA.with_metadata({results._META_KEY: json.dumps(meta).encode()})
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(300, dim))
    first = int(rows * 0.9)
    for path, lo, hi, parts in ((run_dir / "results.parquet", 0, first, [1, 1]),
                                (run_dir / "segments" / "seg-00002.parquet", first, rows,
                                 [2, 2])):
        meta_file = {**schema.metadata, results._PARTS_KEY: json.dumps(parts).encode()}
        with pq.ParquetWriter(path, schema.with_metadata(meta_file),
                              use_dictionary=results._DICT_COLUMNS,
                              compression=results._COMPRESSION) as out:
            for start in range(lo, hi, results.FLUSH_ROWS):
                n = min(results.FLUSH_ROWS, hi - start)
                out.write_table(_batch(rng, start, n, dim, centres, str(ws.root)))
    return run_dir


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(root: str, what: str) -> dict:
    from zoolib import bulkid, library, widgets
    from zoolib.widgets import ViewState

    base = _rss_mb()
    t0 = time.perf_counter()
    view = bulkid.open_view(root, "big")
    opened = time.perf_counter() - t0
    rss_view = _rss_mb()
    manifest = library.scan(root, progress=False)
    masks = widgets.filter_sets(view, manifest, lookalike_class=CLASSES[3])
    out = {"open_s": opened, "masks_s": time.perf_counter() - t0 - opened,
           "rss_before_mb": base, "rss_view_mb": rss_view,
           "rss_open_mb": _rss_mb()}
    if what == "update":
        status = np.zeros(len(view), np.int8)
        states = [ViewState(), ViewState(filter="lowest"), ViewState(pred=CLASSES[5]),
                  ViewState(conf=(0.2, 0.4)), ViewState(sort="margin, low first"),
                  ViewState(sort="path"), ViewState(filter="lookalikes"),
                  ViewState(pred=CLASSES[7], sort="entropy, high first", page=3)]
        first, times = {}, []
        for _ in range(6):
            for state in states:
                t = time.perf_counter()
                need = (state.page + 1) * state.page_size  # what the widget asks
                rows, _ = widgets.select_head(view, state, masks, status, need=need)
                page = view.rows(widgets.page_of(rows, state.page, state.page_size),
                                 bulkid.view.PAGE_COLUMNS)
                ms = (time.perf_counter() - t) * 1000
                assert len(page) <= state.page_size
                if state.sort not in first:
                    first[state.sort] = ms
                else:
                    times.append(ms)
        deep = ViewState(sort="far from the library, high first", page=1000)
        t = time.perf_counter()  # past view.HEAD_MAX positions: the whole order, once
        rows, _ = widgets.select_head(view, deep, masks, status,
                                      need=(deep.page + 1) * deep.page_size)
        view.rows(widgets.page_of(rows, deep.page, deep.page_size), bulkid.view.PAGE_COLUMNS)
        out["deep_page_first_ms"] = (time.perf_counter() - t) * 1000
        out.update(first_sort_ms=first, update_ms=statistics.median(times),
                   update_p90_ms=statistics.quantiles(times, n=10)[-1],
                   update_max_ms=max(times), rss_update_mb=_rss_mb())
    if what == "like":
        t = time.perf_counter()
        index = view.index
        out["index_s"] = time.perf_counter() - t
        rng = np.random.default_rng(1)
        queries = [int(q) for q in rng.choice(np.flatnonzero(view.ok), 20, replace=False)]
        times, found = [], []
        for q in queries:
            t = time.perf_counter()
            near, _ = view.nearest(q, 23)  # what the widget's button does, then the page
            view.rows(near, bulkid.view.PAGE_COLUMNS)
            times.append((time.perf_counter() - t) * 1000)
            found.append(near)
        out.update(like_ms=statistics.median(times[2:]), like_max_ms=max(times[2:]),
                   recall_at_23=_recall(view, queries, found), index_exact=index.exact,
                   index_rows=index.ntotal, rss_like_mb=_rss_mb())
    return out


def _recall(view, queries: list[int], found: list[np.ndarray]) -> float:
    """Share of the exact 23 nearest (a scan of every embedding) the index found."""
    from zoolib import ann

    q = ann.normalise(np.stack([view.embedding(i) for i in queries]))
    best = [np.empty(0, np.int64)] * len(queries)
    best_s = [np.empty(0)] * len(queries)
    start = 0
    for batch in view._embeddings():
        sims = q @ ann.normalise(batch).T
        ids = np.arange(start, start + len(batch))
        okb = view.ok[ids]
        for j in range(len(queries)):
            s = np.where(okb & (ids != queries[j]), sims[j], -np.inf)
            top = np.argpartition(-s, 23)[:23] if len(s) > 23 else np.arange(len(s))
            allid, alls = np.concatenate([best[j], ids[top]]), np.concatenate([best_s[j], s[top]])
            keep = np.argsort(-alls)[:23]
            best[j], best_s[j] = allid[keep], alls[keep]
        start += len(batch)
    return float(np.mean([len(set(a) & set(b)) / 23 for a, b in zip(found, best)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--only", choices=["update", "like"], help="one measurement")
    parser.add_argument("--data", type=Path,
                        help="keep the generated workspace here (reused when it exists)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        t = time.perf_counter()
        ws = args.data or Path(tmp) / "ws"
        run_dir = ws / "bulkid" / "big"
        if not (run_dir / "run.json").exists():
            run_dir = write(ws, args.rows, args.dim)
        size = sum(p.stat().st_size for p in run_dir.rglob("*.parquet")) / 2**30
        print(f"{args.rows:,} rows ({args.dim}-value float16 embeddings, "
              f"{size:.2f} GiB) written or found in {time.perf_counter() - t:.0f} s")
        # like twice: build the index, then load it
        for what in [args.only] if args.only else ["update", "like", "like"]:
            proc = subprocess.run([sys.executable, __file__, "--child", str(run_dir.parent.parent),
                                   what], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{what} failed:\n{proc.stderr[-3000:]}")
            print(what, proc.stdout.strip().splitlines()[-1])
    print("goals: update < 200 ms, more like this < 100 ms, open peak RSS < 2048 MB")


if __name__ == "__main__":
    main()
