"""Benchmark: the bulk-identification widget's filter + page update on a 100,000-row table.

Goal: under 100 ms per update. Measured side by side in one run:

- select: `widgets.select_rows` (numpy masks, sort orders computed once) against the
  plain pandas way (boolean indexing + sort_values on the DataFrame each time);
- update: a whole widget update as a click causes it (control value set -> rows
  selected -> 24 tiles redrawn), with thumbnails cached and with a cold cache.

Thumbnails come from real photos (`/work/shared/datasets/animals10-mini`) when
present, else from drawn 64 px images; rows cycle over those files.

    nice .venv/bin/python bench/widget_speed.py [--rows 100000] [--repeats 15]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from zoolib import widgets
from zoolib.workspace import create

PHOTOS = Path("/work/shared/datasets/animals10-mini")
CLASSES = ["lion", "zebra", "elephant", "flamingo", "leopard", "cheetah", "penguin", "okapi"]


def image_files(tmp: Path, n: int = 400) -> list[str]:
    """Real photos if available, else `n` drawn JPEGs."""
    if PHOTOS.is_dir():
        files = sorted(str(p) for p in PHOTOS.rglob("*") if p.is_file())
        if files:
            return files
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = tmp / f"img_{i:05d}.jpg"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        out.append(str(path))
    return out


def table(rows: int, files: list[str]) -> pd.DataFrame:
    """A results table with bulkid's columns (random scores, no model)."""
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.1, 1.0, rows)
    paths = [f"{files[i % len(files)]}" for i in range(rows)]
    frame = pd.DataFrame({
        "path": [f"{p}#{i}" if i >= len(files) else p for i, p in enumerate(paths)],
        "rel": [f"inbox/cam{i % 7}/img_{i:07d}.jpg" for i in range(rows)],
        "hash": [f"{i:032x}" for i in range(rows)],
        "pred": rng.choice(CLASSES, rows), "confidence": conf,
        "top5": [CLASSES[:5]] * rows, "top5_prob": [[0.5, 0.2, 0.1, 0.1, 0.1]] * rows,
        "margin": conf * rng.uniform(0.2, 1.0, rows), "entropy": rng.uniform(0, 2, rows),
        "ood": rng.normal(-5, 1, rows), "embedding": [None] * rows,
        "generation": "gen-0001", "error": ""})
    frame.loc[rng.choice(rows, rows // 200, replace=False), "error"] = "OSError: truncated"
    frame["source_file"] = paths  # the image each row shows (rows reuse files)
    return frame


def pandas_way(results: pd.DataFrame, state: widgets.ViewState, mask: pd.Series,
               status: pd.Series) -> pd.DataFrame:
    """The obvious pandas implementation the widget's select_rows replaces."""
    rows = results[mask & (status == "")]
    if state.pred != widgets.ANY_CLASS:
        rows = rows[rows["pred"] == state.pred]
    rows = rows[rows["confidence"].between(*state.conf)]
    column, ascending = widgets.SORTS[state.sort]
    rows = rows.sort_values(column, ascending=ascending, kind="stable")
    return rows.iloc[state.page * state.page_size:(state.page + 1) * state.page_size]


def timed(fn, repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


STATES = [widgets.ViewState(), widgets.ViewState(pred="okapi"),
          widgets.ViewState(conf=(0.2, 0.6), sort="entropy, high first"),
          widgets.ViewState(pred="zebra", sort="predicted class", page=3),
          widgets.ViewState(sort="path", page=100)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = image_files(tmp)
        results = table(args.rows, files)
        masks = {"all": results["error"] == "",
                 "lowest": results["confidence"] < results["confidence"].quantile(0.3)}
        status = pd.Series([""] * len(results))
        view_of = widgets.as_view(results)  # sort orders computed once, as the widget does
        codes = np.zeros(len(results), np.int8)  # the widget's marks: a small int per row
        print(f"{len(results):,} rows, thumbnails from {len(files)} files "
              f"({'photos' if PHOTOS.is_dir() else 'drawn 64 px JPEGs'})")
        print("select rows (median ms)       widget   pandas   ratio")
        for state in STATES:
            ours = timed(lambda: widgets.page_of(widgets.select_rows(
                view_of, state, masks, codes), state.page, state.page_size),
                args.repeats)
            theirs = timed(lambda: pandas_way(results, state, masks["all"], status),
                           args.repeats)
            label = f"{state.pred[:6]}/{state.sort[:14]}/p{state.page}"
            print(f"  {label:<28} {ours:7.1f}  {theirs:7.1f}  {theirs / ours:5.1f}x")

        # Whole updates: rows point at real files through `path` for the thumbnails.
        shown = results.assign(path=results["source_file"])
        view = widgets.BulkView(create(tmp / "ws"), shown, masks, run="bench")
        classes = iter(CLASSES * 1000)

        def click_class():
            view.pred.value = next(classes)

        widgets.thumbnail.cache_clear()
        cold = []
        for _ in range(args.repeats):
            widgets.thumbnail.cache_clear()
            t0 = time.perf_counter()
            click_class()
            cold.append((time.perf_counter() - t0) * 1000)
        for cls in CLASSES:  # warm the cache for every class's first page
            view.pred.value = cls
        warm = timed(click_class, args.repeats)
        view.pred.value = widgets.ANY_CLASS
        paging = timed(lambda: view.go(view.state.page + 1), args.repeats)
        print("widget update (median ms)     time     goal 100 ms")
        for name, ms in (("class filter, thumbnails cached", warm),
                         ("class filter, cold thumbnails", statistics.median(cold)),
                         ("next page", paging)):
            print(f"  {name:<30} {ms:6.1f}   {ms / 100:5.2f} of goal")


if __name__ == "__main__":
    main()
