"""Sweeps and cross-validation: run a notebook over a parameter grid or k folds.

Each run executes the notebook with papermill into its own report folder and
contributes one row (its parameters, status, error and the scalar values of its
`metrics.json`) to a table. A failing run is recorded with its error message and
the others go on. Runs of 02_train train real generations in the workspace; pass
`THROWAWAY=True` in the base parameters to keep them out of promotion.
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Callable

import matplotlib.pyplot as plt
import pandas as pd

from . import pipeline
from .plots import save
from .workspace import ZoolibError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def grid(**values: list) -> list[dict]:
    """Every combination of parameter values, e.g. grid(LR=[1e-3, 3e-3], EPOCHS=[4, 8])."""
    for name, options in values.items():
        if not isinstance(options, (list, tuple)) or not options:
            raise ZoolibError(f"sweep parameter {name} needs a non-empty list of values, "
                              f"got {options!r}")
    names = list(values)
    return [dict(zip(names, combo)) for combo in itertools.product(*values.values())]


def folds(k: int) -> list[dict]:
    """The runs of k-fold cross-validation: FOLDS=k with FOLD 0..k-1."""
    if int(k) < 2:
        raise ZoolibError(f"cross-validation needs at least 2 folds, got {k}")
    return [{"FOLDS": int(k), "FOLD": i} for i in range(int(k))]


def run_name(params: dict) -> str:
    """A folder name for a run from its parameters, e.g. "LR=0.003_EPOCHS=4"."""
    text = "_".join(f"{k}={v}" for k, v in params.items()) or "run"
    return "".join(c if c.isalnum() or c in "=._-" else "-" for c in text)[:120]


def error_message(exc: Exception) -> str:
    """One line naming what failed: the notebook's own exception for papermill errors."""
    # papermill's PapermillExecutionError carries the kernel's exception as ename/evalue;
    # its str() is a coloured traceback.
    name = getattr(exc, "ename", None) or type(exc).__name__
    value = getattr(exc, "evalue", None) or str(exc)
    lines = [ln for ln in _ANSI.sub("", str(value)).splitlines() if ln.strip()]
    return f"{name}: {lines[-1].strip() if lines else ''}"[:500]


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))
            or v is None}


def run_sweep(runs: list[dict], out_dir: str | Path, notebook: str = "02_train",
              base: dict | None = None,
              runner: Callable[[str, Path, dict], dict] = pipeline.run_notebook) -> pd.DataFrame:
    """Run a notebook once per parameter set and collect the results in one table.

    Args:
        runs: parameter sets (from `grid` or `folds`), merged over `base`.
        out_dir: each run writes into `<out_dir>/<run name>/`; the table is
            saved as `<out_dir>/sweep.csv`.
        notebook: notebook name without suffix.
        base: parameters shared by every run (WORKSPACE, EPOCHS, THROWAWAY, ...).
        runner: executes one run and returns its metrics (papermill by default).

    Returns:
        One row per run: run, the swept parameters, status ("ok" or "failed"),
        error (the exception's last line) and the scalar metrics.
    """
    out = pipeline.report_dir(out_dir)
    rows = []
    for params in runs:
        name = run_name(params)
        row = {"run": name, **params, "status": "ok", "error": ""}
        try:
            row.update(_scalars(runner(notebook, out / name, {**(base or {}), **params})))
        except Exception as exc:  # noqa: BLE001 - one failing run must not stop the sweep
            row.update(status="failed", error=error_message(exc))
        print(f"{name}: {row['status']} {row['error']}".rstrip())
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(out / "sweep.csv", index=False)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2, default=str))
    return table


def summarize(table: pd.DataFrame, metrics: list[str], by: list[str] | None = None
              ) -> pd.DataFrame:
    """Mean, spread (standard deviation) and count of metrics over the successful runs.

    Args:
        table: from `run_sweep`.
        metrics: numeric columns to summarise, e.g. ["valid_accuracy"].
        by: group by these parameter columns (None: all runs together, as for folds).

    Returns:
        One row per group with `<metric>_mean`, `<metric>_std`, `runs` and `failed`.
    """
    missing = [m for m in metrics if m not in table]
    if missing:
        raise ZoolibError(f"sweep table has no column {missing}; it has {list(table.columns)}")
    t = table.assign(_ok=table["status"] == "ok")
    keys = by or []
    groups = t.groupby(keys, dropna=False) if keys else [((), t)]
    rows = []
    for key, g in groups:
        ok = g[g["_ok"]]
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        for m in metrics:
            vals = pd.to_numeric(ok[m], errors="coerce")
            row[f"{m}_mean"], row[f"{m}_std"] = vals.mean(), vals.std(ddof=1)
        row.update(runs=int(len(ok)), failed=int((~g["_ok"]).sum()))
        rows.append(row)
    return pd.DataFrame(rows)


def plot_sweep(table: pd.DataFrame, metric: str, path: str | Path | None = None):
    """One bar per run (failed runs marked), with the mean of successful runs as a line."""
    ok = table["status"] == "ok"
    vals = pd.to_numeric(table.get(metric), errors="coerce").fillna(0)
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(table) + 2), 3.4))
    ax.bar(range(len(table)), vals.where(ok, 0),
           color=["tab:blue" if o else "tab:red" for o in ok])
    for i in [i for i, o in enumerate(ok) if not o]:
        ax.text(i, 0.02, "failed", rotation=90, ha="center", va="bottom", color="tab:red")
    if ok.any():
        mean, std = vals[ok].mean(), vals[ok].std(ddof=1)
        ax.axhline(mean, color="k", ls="--",
                   label=f"mean {mean:.3f}" + (f" ± {std:.3f}" if ok.sum() > 1 else ""))
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(table)), table["run"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    return save(fig, path)
