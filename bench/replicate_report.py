"""The report half of bench/replicate.py: goals, tables, plots and the results file.

Everything here reads the run's metrics dict (`m`): `settings` (generations,
default_chain, ...), `runs` (one flat record per trained run: seed, gen, chain
("scratch" or "method:schedule"), test_accuracy, epoch_ratio, train_seconds, ...),
`histories`, `inbox` (one entry per seed), `seconds` and `memory`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from cifar import ANIMALS, REPO  # noqa: E402
from zoolib import pipeline  # noqa: E402

RESULTS = REPO / "bench" / "results" / "replicate.json"
GOALS = {"epoch_ratio": 0.25, "test_gain": 0.01, "never_below": "-seed spread",
         "enrichment": 3.0, "junk_auc": 0.85, "minutes": 90, "peak_rss_mb": 2048}
# the per-generation figures aggregated over seeds (mean and spread = max - min)
FIELDS = ["classes", "library", "test_accuracy", "test_accuracy_tta", "test_gain",
          "best_valid", "epochs_to_scratch_best", "epoch_ratio", "plateau_epoch", "epochs_run",
          "train_seconds", "cum_seconds", "scratch_cum_seconds"]


# ----------------------------------------------------------------------------- figures

def _num(v) -> float | None:
    """A finite float, or None (None, NaN)."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _mean(values) -> float | None:
    values = [_num(v) for v in values]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _spread(values) -> float | None:
    values = [v for v in map(_num, values) if v is not None]
    return max(values) - min(values) if values else None


def _rows(m: dict, chain: str, gen: int) -> dict[int, dict]:
    """The run records of a chain at a generation, by seed (gen 1 of a chain: the scratch run)."""
    name = "scratch" if gen == 1 else chain
    return {r["seed"]: r for r in m["runs"] if r["chain"] == name and r["gen"] == gen}


def derive(m: dict) -> None:
    """Add each record's test_gain (minus its scratch run) and cumulative training seconds."""
    by = {(r["seed"], r["gen"], r["chain"]): r for r in m["runs"]}
    for r in m["runs"]:
        seed, gen = r["seed"], r["gen"]
        r["scratch_cum_seconds"] = sum(by[(seed, g, "scratch")]["train_seconds"]
                                       for g in range(1, gen + 1))
        chain = [by[(seed, 1, "scratch")]] + [by[(seed, g, r["chain"])] for g in range(2, gen + 1)]
        r["cum_seconds"] = sum(x["train_seconds"] for x in chain)
        s = by[(seed, gen, "scratch")]
        r["test_gain"] = r["test_accuracy"] - s["test_accuracy"]
        if r["test_accuracy_tta"] is not None and s["test_accuracy_tta"] is not None:
            r["test_gain_tta"] = r["test_accuracy_tta"] - s["test_accuracy_tta"]


def aggregate(m: dict) -> pd.DataFrame:
    """One row per chain (scratch included) and generation: FIELDS' mean and spread."""
    rows = []
    for chain in ["scratch"] + m["settings"]["chains"]:
        for gen in range(1, m["settings"]["generations"] + 1):
            runs = list(_rows(m, chain, gen).values())
            if not runs:
                continue
            row = {"chain": chain, "gen": gen, "seeds": len(runs),
                   "reached": sum(r["epochs_to_scratch_best"] is not None for r in runs)}
            for f in FIELDS:
                row[f + "_mean"] = _mean(r.get(f) for r in runs)
                row[f + "_spread"] = _spread(r.get(f) for r in runs)
            rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- goals

def _goal(value, goal, met: bool, what: str, **more) -> dict:
    value = None if _num(value) is None else round(float(value), 4)
    return {"value": value, "goal": goal, "met": bool(met), "what": what, **more}


def _never_below(m: dict, chain: str, last: int) -> dict:
    """Generations 3+: the worst mean gap (warm minus scratch test accuracy) against the
    seed spread (the mean over those generations of the max - min over seeds of the
    scratch and the warm runs' test accuracy)."""
    gens = range(3, last + 1)
    gaps, spreads = {}, []
    for g in gens:
        warm, scratch = _rows(m, chain, g), _rows(m, "scratch", g)
        gaps[g] = _mean(warm[s]["test_accuracy"] - scratch[s]["test_accuracy"] for s in warm)
        spreads += [_spread(r["test_accuracy"] for r in rr.values()) for rr in (warm, scratch)]
    if not gaps or any(v is None for v in gaps.values()):
        return _goal(None, None, False, "needs generations 3+ of the default chain")
    spread = _mean(spreads) or 0.0
    worst = min(gaps.values())
    return _goal(worst, -round(spread, 4) or 0.0, worst >= -spread - 1e-12,
                 f"gens 3-{last}, {chain}: worst mean (warm - scratch) cifar10/test accuracy, at "
                 "least minus the seed spread (mean max-min over seeds of both runs' test "
                 "accuracy at those generations; 0 with one seed)",
                 per_generation={str(g): None if v is None else round(v, 4)
                                 for g, v in gaps.items()})


def _last_generation(m: dict, chain: str, last: int) -> tuple[dict, dict]:
    warm, scratch = _rows(m, chain, last), _rows(m, "scratch", last)
    ratios = [warm[s]["epoch_ratio"] for s in sorted(warm)]
    ratio = None if not ratios or None in ratios else _mean(ratios)
    gains = [warm[s]["test_accuracy"] - scratch[s]["test_accuracy"] for s in sorted(warm)]
    gain = _mean(gains)
    each = bool(gains) and all(g > 0 for g in gains)
    return (
        _goal(ratio, GOALS["epoch_ratio"], ratio is not None and ratio <= GOALS["epoch_ratio"],
              f"gen {last}, {chain}: warm epochs to the scratch run's best valid accuracy / the "
              "scratch run's epochs, mean of seeds (None if a seed never reaches it), at most",
              per_seed=ratios),
        _goal(gain, GOALS["test_gain"], gain is not None and gain >= GOALS["test_gain"] and each,
              f"gen {last}, {chain}: warm minus scratch cifar10/test accuracy (plain), mean of "
              "seeds, at least, and higher in each seed",
              per_seed=[round(g, 4) for g in gains], higher_in_each_seed=each))


def goals(m: dict) -> dict:
    """Each headline goal of issue 28: name -> value, goal, met and what it measures."""
    s, chain = m["settings"], m["settings"]["default_chain"]
    last = int(s["generations"])
    ratio, gain = _last_generation(m, chain, last)
    enrich = [i["lookalike"]["enrichment"] for i in m["inbox"]]
    aucs = [next(r["auc"] for r in i["junk_scores"] if r["default"]) for i in m["inbox"]]
    e = None if not enrich or None in map(_num, enrich) else _mean(enrich)
    auc = None if not aucs or None in map(_num, aucs) else _mean(aucs)
    minutes = m["seconds"]["total"] / 60
    rss = m["memory"]["peak_rss_mb"]
    return {
        "epoch_ratio": ratio, "test_gain": gain,
        "never_below": _never_below(m, chain, last),
        "enrichment": _goal(e, GOALS["enrichment"], e is not None and e >= GOALS["enrichment"],
                            "gen 1 look-alike enrichment of the first arriving class, mean of "
                            "seeds, at least", per_seed=[_num(v) for v in enrich]),
        "junk_auc": _goal(auc, GOALS["junk_auc"], auc is not None and auc >= GOALS["junk_auc"],
                          "gen 1 junk-removal ROC AUC of the default score, mean of seeds, at "
                          "least", per_seed=[_num(v) for v in aucs]),
        "minutes": _goal(minutes, GOALS["minutes"], minutes <= GOALS["minutes"],
                         "total run time (minutes, 2 CPU cores), at most"),
        "peak_rss_mb": _goal(rss, GOALS["peak_rss_mb"], rss < GOALS["peak_rss_mb"],
                             "peak resident memory of the run (MB), under"),
    }


# ----------------------------------------------------------------------------- tables

def _fmt(v, spec: str = ".3f") -> str:
    return "n/a" if _num(v) is None else format(v, spec)


def _ms(row: pd.Series, field: str, spec: str = ".3f", scale: float = 1.0) -> str:
    """`mean (spread)` of an aggregate row's field."""
    mean, spread = _num(row[field + "_mean"]), _num(row[field + "_spread"])
    if mean is None:
        return "n/a"
    return f"{mean * scale:{spec}} ({spread * scale:{spec.lstrip('+')}})"


def _table(df: pd.DataFrame) -> str:
    """A DataFrame as a markdown table (no tabulate dependency)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, ".3f") if isinstance(v, float) else str(v)
                                       for v in row) + " |")
    return "\n".join(lines)


def chain_table(m: dict, agg: pd.DataFrame, chain: str) -> pd.DataFrame:
    """The markdown rows of one chain: per generation, the chain beside scratch."""
    rows = []
    for gen in range(1, m["settings"]["generations"] + 1):
        w = agg[(agg["chain"] == chain) & (agg["gen"] == gen)]
        s = agg[(agg["chain"] == "scratch") & (agg["gen"] == gen)]
        if w.empty or s.empty:
            continue
        w, s = w.iloc[0], s.iloc[0]
        reach = [r["epochs_to_scratch_best"] for r in sorted(_rows(m, chain, gen).values(),
                                                              key=lambda r: r["seed"])]
        rows.append({
            "gen": gen, "classes": int(w["classes_mean"]), "images": int(w["library_mean"]),
            "scratch test": _ms(s, "test_accuracy"), "warm test": _ms(w, "test_accuracy"),
            "gain": _ms(w, "test_gain", "+.3f"), "scratch TTA": _ms(s, "test_accuracy_tta"),
            "warm TTA": _ms(w, "test_accuracy_tta"),
            "to scratch best": " / ".join("never" if v is None else str(v) for v in reach),
            "of epochs": f"{_fmt(s['epochs_run_mean'], '.0f')}",
            "ratio": _ms(w, "epoch_ratio", ".2f"), "plateau": _ms(w, "plateau_epoch", ".1f"),
            "scratch best valid": _ms(s, "best_valid"), "warm best valid": _ms(w, "best_valid"),
            "warm min": _ms(w, "train_seconds", ".1f", 1 / 60),
            "cum min warm": _ms(w, "cum_seconds", ".1f", 1 / 60),
            "cum min scratch": _ms(s, "scratch_cum_seconds", ".1f", 1 / 60)})
    return pd.DataFrame(rows)


def inbox_markdown(m: dict) -> list[str]:
    """Per seed: the look-alike figures and the junk scores."""
    lines = []
    for i in m["inbox"]:
        look, h = i["lookalike"], i["holdout"]
        lines += [f"### Seed {i['seed']}", "",
                  f"Look-alike of {h}: **{look['class']}** (generation 1's predictions for the "
                  f"{h} images it arrives with: {look['counts']}). At confidence below "
                  f"{look['threshold']}: {look['candidates']} candidates, {look['holdout_found']} "
                  f"of them {h} (share {_fmt(look['share'])} versus {_fmt(look['base_share'])} "
                  f"in the inbox): enrichment **{_fmt(look['enrichment'], '.2f')}x**, recall "
                  f"{_fmt(look['recall'])}.", "", _table(pd.DataFrame(i["enrichment"])), "",
                  "Mass removal (junk = vehicles; `junk_in_bottom`: share of junk among the "
                  "n_junk rows `lowest_scores` lists first by that score):", "",
                  _table(pd.DataFrame(i["junk_scores"])), "", f"![inbox](inbox_s{i['seed']}.png)",
                  ""]
    return lines


def summary_markdown(m: dict, agg: pd.DataFrame) -> str:
    """The run's summary.md."""
    s = m["settings"]
    plan = pd.DataFrame([{"gen": g, **{a: c.get(a, 0) for a in ANIMALS}, "images": sum(c.values())}
                         for g, c in s["plan"].items()])
    g = pd.DataFrame([{"goal": k, "what": v["what"], "value": v["value"], "target": v["goal"],
                       "met": v["met"]} for k, v in m["goals"].items()])
    tta = {"last": "the last generation", "all": "every generation", "none": "no generation"}
    lines = [
        f"# Warm chains versus scratch on a growing CIFAR-10 animal library: `{m['run']}`", "",
        f"{s['arch']} at {s['size']} px, the workbench's default recipe, budget "
        f"{s['resolved_epochs']} epochs per run, validating every epoch. Seeds {s['seeds']} "
        f"(each its own sample and workspace); arrivals {s['arrivals']}; growth {s['growth']}. "
        f"Chains: {', '.join(s['chains'])} (goals on **{s['default_chain']}**). Test figures "
        f"on cifar10/test (the classes of each run), plain; TTA (six views) at "
        f"{tta[s['tta']]}."
        f" CPU: {m['cpu']['model']} ({', '.join(m['cpu']['flags'])}), {m['cpu']['cores']} "
        f"cores. Total {m['seconds']['total'] / 60:.1f} min (estimated training "
        f"{m['estimate']['training_minutes']} min), peak resident memory "
        f"{m['memory']['peak_rss_mb']:.0f} MB. Commit {m['commit'][:10]}, {m['date']}.", "",
        "Library per class by generation:", "", _table(plan.astype(int)), "",
        "## Goals", "", _table(g), "",
        "Figures are `mean (spread)` over seeds, spread = max - min; `to scratch best`: per "
        "seed, the first epoch whose valid accuracy reaches the same generation's scratch "
        "run's best (for generation 1, the scratch run's own); `ratio`: that over the "
        "scratch run's epochs. Cumulative minutes are training seconds summed along the "
        "chain (generation 1 included) and over every scratch run.", ""]
    for chain in s["chains"]:
        lines += [f"## Chain {chain}", "", _table(chain_table(m, agg, chain)), ""]
    lines += ["![test accuracy](test_accuracy.png)", "", "![compute](compute.png)", "",
              "![curves](curves.png)", "",
              "## Bulk identification of the inbox with generation 1", ""] + inbox_markdown(m)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

def plot_test(m: dict, path: Path) -> None:
    """cifar10/test accuracy per generation: scratch and each chain, seed min to max."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    gens = range(1, m["settings"]["generations"] + 1)
    for chain in ["scratch"] + m["settings"]["chains"]:
        acc = [[r["test_accuracy"] for r in _rows(m, chain, g).values()] for g in gens]
        mean = [_mean(a) for a in acc]
        err = [[mu - min(a) for mu, a in zip(mean, acc)], [max(a) - mu for mu, a in zip(mean, acc)]]
        ax.errorbar(list(gens), mean, yerr=err, marker="o", capsize=3,
                    ls="--" if chain == "scratch" else "-", label=chain)
    ax.set_xticks(list(gens)); ax.set_xlabel("generation")
    ax.set_ylabel("cifar10/test accuracy (plain)")
    ax.set_title("Warm chains versus scratch (bars: min to max over seeds)"); ax.legend()
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def plot_compute(agg: pd.DataFrame, chains: list[str], path: Path) -> None:
    """Cumulative training minutes per generation: every scratch run versus each chain."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    s = agg[agg["chain"] == "scratch"]
    ax.plot(s["gen"], s["scratch_cum_seconds_mean"] / 60, "s--", label="scratch every time")
    for chain in chains:
        w = agg[agg["chain"] == chain]
        ax.plot(w["gen"], w["cum_seconds_mean"] / 60, "o-", label=f"chain {chain}")
    ax.set_xticks(list(s["gen"])); ax.set_xlabel("generation")
    ax.set_ylabel("cumulative training minutes (mean of seeds)")
    ax.set_title("Training compute"); ax.legend()
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def plot_curves(m: dict, path: Path) -> None:
    """Valid accuracy per epoch at the last generation, one panel per seed."""
    last, seeds = m["settings"]["generations"], m["settings"]["seeds"]
    fig, axes = plt.subplots(1, len(seeds), figsize=(6 * len(seeds), 4), squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        for chain in ["scratch"] + m["settings"]["chains"]:
            h = m["histories"].get(f"s{seed}-g{last}-{chain}")
            if h:
                ax.plot(h["epoch"], h["accuracy"], "s--" if chain == "scratch" else "o-",
                        label=chain)
        best = _rows(m, "scratch", last).get(seed)
        if best:
            ax.axhline(best["best_valid"], color="gray", ls=":", label="scratch best")
        ax.set_xlabel("epoch"); ax.set_ylabel("valid accuracy"); ax.legend(loc="lower right")
        ax.set_title(f"Generation {last}, seed {seed}")
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


# ----------------------------------------------------------------------------- files

def write_report(m: dict, out: Path) -> None:
    """Derived figures, goals, CSVs, plots, metrics.json and summary.md (adds m["goals"])."""
    derive(m)
    m["goals"] = goals(m)
    agg = aggregate(m)
    m["generations"] = agg.to_dict(orient="records")
    pd.DataFrame(m["runs"]).to_csv(out / "runs.csv", index=False)
    agg.to_csv(out / "generations.csv", index=False)
    plot_test(m, out / "test_accuracy.png")
    plot_compute(agg, m["settings"]["chains"], out / "compute.png")
    plot_curves(m, out / "curves.png")
    pipeline.write_metrics(out, m)
    (out / "summary.md").write_text(summary_markdown(m, agg))


def write_results(m: dict, path: Path = RESULTS) -> None:
    """bench/results/replicate.json: goals, settings, per-generation figures, CPU, date, commit."""
    keep = {k: m[k] for k in ("goals", "cpu", "date", "commit", "estimate", "seconds")}
    keep["settings"] = {k: m["settings"][k] for k in (
        "generations", "arrivals", "initial", "growth", "new_class", "chains", "default_chain",
        "seeds", "arch", "size", "resolved_epochs", "tta", "plan")}
    keep["peak_rss_mb"] = m["memory"]["peak_rss_mb"]
    keep["generations"] = m["generations"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(keep, indent=2, default=str) + "\n")
