"""Reports from the transaction log: usage and accuracy over time, by generation,
confidence band and class, and the latest generation against the previous one.

Every table function takes the joined log (`load(ws)`: one row per transaction,
with its newest manual evaluation) and returns a DataFrame; the plot functions
draw those tables and save PNGs. Accuracy counts evaluated transactions only and
comes with a Wilson 95% confidence interval and its counts. `build` writes every
figure and table of a run into one folder and never fails for lack of data: it
says what is missing instead.
"""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import translog
from .plots import save
from .workspace import Workspace, open_workspace

BANDS = (0.0, 0.5, 0.7, 0.9, 1.0)  # confidence band edges
LEVEL = 0.95  # confidence level of the accuracy intervals
_ACC_COLUMNS = ["predictions", "evaluated", "correct", "accuracy", "ci_low", "ci_high"]


def load(workspace, since: str | None = None, bands: tuple[float, ...] = BANDS
         ) -> pd.DataFrame:
    """The joined transaction log with `band` (confidence band) and `class` columns
    (see `add_columns`)."""
    ws = open_workspace(workspace) if not isinstance(workspace, Workspace) else workspace
    return add_columns(translog.joined(ws, since or None), bands)


def add_columns(df: pd.DataFrame, bands: tuple[float, ...] = BANDS) -> pd.DataFrame:
    """Add `band`, `class` and `class_from` to a joined log.

    `class` is the class an evaluated transaction counts under in per-class
    accuracy: the reviewer's true class where given, else the predicted class,
    both for a "correct" mark and for a "wrong" mark without a true class. The
    latter counts as an error of the class the model named (`class_from` says
    "prediction"): dropping it, while every "correct" mark counts, would inflate
    that class's accuracy.
    """
    df = df.copy()
    labels = [f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(bands[:-1], bands[1:])]
    df["band"] = pd.cut(df["confidence"].astype(float), list(bands), labels=labels,
                        include_lowest=True)
    given = df["true_class"].notna()
    df["class"] = df["true_class"].where(given, df["predicted"].where(df["evaluated"]))
    df["class_from"] = np.where(given, "reviewer",
                                np.where(df["evaluated"], "prediction", None))
    return df


def status(df: pd.DataFrame) -> str:
    """One sentence on what the log holds, saying clearly when data is missing."""
    if df.empty:
        return ("No transactions logged yet: serve a generation (python -m zoolib.serving "
                "WORKSPACE, or zoolib.serving.Predictor) and the report fills in.")
    gens = df["generation"].nunique()
    span = f"{df['time'].min():%Y-%m-%d} to {df['time'].max():%Y-%m-%d}"
    n_eval = int(df["evaluated"].sum())
    if n_eval == 0:
        return (f"{len(df)} transactions from {gens} generation(s), {span}. No manual "
                "evaluations yet: accuracy needs reviews (zoolib.widgets.ReviewWidget or POST "
                "/evaluations); usage and confidence are shown.")
    text = (f"{len(df)} transactions from {gens} generation(s), {span}; {n_eval} evaluated "
            f"({n_eval / len(df):.0%}).")
    blind = int((df["evaluated"] & ~df["correct"].fillna(False).astype(bool)
                 & df["true_class"].isna()).sum())
    if blind:
        text += (f" {blind} marked wrong without a true class: per-class accuracy counts "
                 "them against the predicted class.")
    return text


def wilson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (NaN, NaN when n is 0)."""
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def _gen_key(name: str):
    match = re.search(r"(\d+)$", str(name))
    return (int(match.group(1)) if match else -1, str(name))


def generations(df: pd.DataFrame) -> list[str]:
    """Generations in the log, oldest first (by their number)."""
    return sorted(df["generation"].unique(), key=_gen_key)


def _accuracy(group: pd.DataFrame) -> pd.Series:
    ev = group[group["evaluated"]]
    k, n = int(ev["correct"].sum()), len(ev)
    lo, hi = wilson(k, n)
    return pd.Series({"predictions": len(group), "evaluated": n, "correct": k,
                      "accuracy": k / n if n else float("nan"), "ci_low": lo, "ci_high": hi})


def accuracy_by(df: pd.DataFrame, by: str | list[str]) -> pd.DataFrame:
    """Accuracy of evaluated transactions per group, with counts and a Wilson interval.

    Args:
        df: the joined log (`load`).
        by: column(s): "generation", "band", "class" (true class), "predicted", "period".

    Returns:
        One row per group: predictions, evaluated, correct, accuracy, ci_low, ci_high.
    """
    keys = [by] if isinstance(by, str) else list(by)
    known = df.dropna(subset=keys)  # e.g. class: unknown for "wrong" without a true class
    if known.empty:
        return pd.DataFrame(columns=keys + _ACC_COLUMNS)
    groups = known.groupby(keys, observed=True)
    out = groups[["evaluated", "correct"]].apply(_accuracy).reset_index()
    for col in ("predictions", "evaluated", "correct"):
        out[col] = out[col].astype(int)
    return out


def with_period(df: pd.DataFrame, freq: str = "D") -> pd.DataFrame:
    """Add `period` (start of the day "D" or ISO week "W", UTC) to a joined log."""
    df = df.copy()
    df["period"] = df["time"].dt.tz_convert(None).dt.to_period(freq).dt.start_time
    return df


def usage(df: pd.DataFrame, freq: str = "D") -> pd.DataFrame:
    """Predictions per period (rows, every period in the range) and generation (columns)."""
    if df.empty:
        return pd.DataFrame()
    table = with_period(df, freq).pivot_table(index="period", columns="generation",
                                              values="id", aggfunc="count", fill_value=0)
    full = pd.period_range(table.index.min(), table.index.max(), freq=freq).start_time
    return table.reindex(full, fill_value=0)[generations(df)].rename_axis("period")


def band_share(df: pd.DataFrame) -> pd.DataFrame:
    """Share of each generation's predictions per confidence band (rows sum to 1),
    with the counts in a `predictions` column."""
    if df.empty:
        return pd.DataFrame()
    counts = pd.crosstab(df["generation"], df["band"], dropna=False)
    share = counts.div(counts.sum(axis=1), axis=0)
    share.columns = share.columns.astype(str)
    share["predictions"] = counts.sum(axis=1)
    return share.loc[generations(df)]


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per generation: traffic, accuracy with interval, confidence, latency."""
    if df.empty:
        return pd.DataFrame()
    acc = accuracy_by(df, "generation").set_index("generation")
    g = df.groupby("generation")
    extra = pd.DataFrame({
        "first": g["time"].min(), "last": g["time"].max(),
        "mean_confidence": g["confidence"].mean(),
        "share_below_0.5": g["confidence"].apply(lambda c: float((c < 0.5).mean())),
        "latency_p50_ms": g["latency_ms"].median(),
        "latency_p99_ms": g["latency_ms"].quantile(0.99)})
    return acc.join(extra).loc[generations(df)]


def compare(df: pd.DataFrame, latest: str | None = None, previous: str | None = None
            ) -> pd.DataFrame:
    """The latest generation against the previous one: summary rows side by side
    with the change (latest - previous). Empty with fewer than two generations."""
    gens = generations(df) if not df.empty else []
    if len(gens) < 2 and (latest is None or previous is None):
        return pd.DataFrame()
    latest, previous = latest or gens[-1], previous or gens[-2]
    table = summary(df).drop(columns=["first", "last"]).T[[previous, latest]].astype(float)
    table["change"] = table[latest] - table[previous]
    return table


def class_comparison(df: pd.DataFrame, gens: list[str] | None = None) -> pd.DataFrame:
    """Accuracy per true class (rows) and generation (columns), evaluated only."""
    if df.empty or not df["evaluated"].any():
        return pd.DataFrame()
    table = accuracy_by(df, ["class", "generation"]).pivot(index="class", columns="generation",
                                                           values="accuracy")
    return table[[g for g in (gens or generations(df)) if g in table.columns]]


# --- figures -------------------------------------------------------------------------


def plot_usage(df: pd.DataFrame, path: str | Path | None = None):
    """Predictions per day and per week, stacked by generation (None if no data)."""
    if df.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [3, 1]})
    for ax, freq, title in zip(axes, ("D", "W"), ("per day", "per week")):
        table = usage(df, freq)
        table.index = table.index.strftime("%m-%d")
        table.plot.bar(stacked=True, ax=ax, width=0.85, legend=freq == "D")
        ax.set_title(f"Predictions {title}")
        ax.set_xlabel("")
    return save(fig, path)


def _errorbars(ax, table: pd.DataFrame, x: str, label: str | None = None, offset: float = 0):
    pos = np.arange(len(table)) + offset
    acc = table["accuracy"].to_numpy(float)
    err = np.vstack([acc - table["ci_low"], table["ci_high"] - acc])
    ax.errorbar(pos, acc, yerr=err, fmt="o", capsize=3, label=label)
    for p, a, n in zip(pos, acc, table["evaluated"]):
        if not np.isnan(a):
            ax.annotate(f"n={n}", (p, a), textcoords="offset points", xytext=(5, -3),
                        fontsize=7)
    ax.set_xticks(np.arange(len(table)), table[x].astype(str), rotation=30, ha="right")
    ax.set_ylim(-0.02, 1.05)
    ax.set_ylabel(f"accuracy ({LEVEL:.0%} CI)")


def plot_accuracy(df: pd.DataFrame, path: str | Path | None = None):
    """Accuracy by generation, confidence band and true class, with intervals and
    counts (None when nothing is evaluated)."""
    if df.empty or not df["evaluated"].any():
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6),
                             gridspec_kw={"width_ratios": [1, 1.3, 2.2]})
    for ax, key, title in zip(axes, ("generation", "band", "class"),
                              ("by generation", "by confidence band", "by true class")):
        table = accuracy_by(df[df["evaluated"]], key)
        ax.set_title(f"Accuracy {title}")
        if table.empty:
            ax.text(0.5, 0.5, "no evaluation names a class", ha="center", transform=ax.transAxes)
            continue
        _errorbars(ax, table, key)
    return save(fig, path)


def plot_accuracy_over_time(df: pd.DataFrame, freq: str = "W", path: str | Path | None = None):
    """Accuracy per period and generation, with intervals (None when nothing is evaluated)."""
    if df.empty or not df["evaluated"].any():
        return None
    table = accuracy_by(with_period(df[df["evaluated"]], freq), ["period", "generation"])
    fig, ax = plt.subplots(figsize=(8, 3.4))
    periods = sorted(table["period"].unique())
    gens = generations(table)
    width = 0.6 / max(1, len(gens))
    for k, gen in enumerate(gens):  # side by side within each period
        part = table[table["generation"] == gen].set_index("period").reindex(periods)
        part = part.reset_index().assign(evaluated=part["evaluated"].fillna(0).astype(int).values)
        _errorbars(ax, part, "period", gen, offset=k * width)
    ax.set_xticks(np.arange(len(periods)) + width * (len(gens) - 1) / 2,
                  [f"{p:%m-%d}" for p in periods], rotation=0)
    ax.set_title(f"Accuracy per {'week' if freq == 'W' else 'day'} and generation")
    ax.legend()
    return save(fig, path)


def plot_band_share(df: pd.DataFrame, path: str | Path | None = None):
    """Share of predictions in each confidence band, per generation (None if no data)."""
    if df.empty:
        return None
    share = band_share(df).drop(columns="predictions")
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(share) + 1.8))
    share.plot.barh(stacked=True, ax=ax, colormap="RdYlGn")
    ax.set_xlabel("share of predictions")
    ax.set_title("Confidence bands")
    ax.legend(title="confidence", bbox_to_anchor=(1.0, 1.0), loc="upper left")
    return save(fig, path)


def plot_class_comparison(df: pd.DataFrame, path: str | Path | None = None):
    """Accuracy per true class for the last two generations (None without evaluations)."""
    table = class_comparison(df, generations(df)[-2:] if not df.empty else None)
    if table.empty:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.4))
    table.plot.bar(ax=ax)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("Accuracy per true class: latest vs previous generation")
    return save(fig, path)


# --- one report ----------------------------------------------------------------------


def build(workspace, out_dir: str | Path, since: str | None = None) -> dict:
    """Write every figure and table of a report into `out_dir`; return its metrics.

    Files: usage.png, accuracy.png, accuracy_over_time.png, confidence_bands.png,
    class_comparison.png (each only when there is data for it), summary.csv,
    comparison.csv, accuracy_by_band.csv, accuracy_by_class.csv and report.md.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = load(workspace, since)
    figures = {"usage.png": plot_usage(df), "accuracy.png": plot_accuracy(df),
               "accuracy_over_time.png": plot_accuracy_over_time(df),
               "confidence_bands.png": plot_band_share(df),
               "class_comparison.png": plot_class_comparison(df)}
    written = []
    for name, fig in figures.items():
        if fig is not None:
            save(fig, out / name)
            plt.close(fig)
            written.append(name)
    tables = {"summary.csv": summary(df), "comparison.csv": compare(df),
              "accuracy_by_band.csv": accuracy_by(df[df["evaluated"]], "band") if len(df) else
              pd.DataFrame(), "accuracy_by_class.csv": accuracy_by(df[df["evaluated"]], "class")
              if len(df) else pd.DataFrame()}
    for name, table in tables.items():
        table.to_csv(out / name)
    message = status(df)
    (out / "report.md").write_text(_markdown(message, tables["summary.csv"],
                                             tables["comparison.csv"]))
    return {"status": message, "transactions": len(df),
            "evaluated": int(df["evaluated"].sum()) if len(df) else 0,
            "generations": generations(df) if len(df) else [], "figures": written,
            "tables": list(tables)}


def _markdown(message: str, summary_table: pd.DataFrame, comparison: pd.DataFrame) -> str:
    parts = ["# Serving report", "", message, ""]
    for title, table in (("By generation", summary_table.T),
                         ("Latest vs previous generation", comparison)):
        if not table.empty:
            parts += [f"## {title}", "", "```", table.to_string(float_format="{:.3f}".format),
                      "```", ""]
    return "\n".join(parts)
