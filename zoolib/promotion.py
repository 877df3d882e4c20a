"""Candidate versus deployed: the comparison on the benchmark, the promotion rule, deploying.

The benchmark is one fixed set of images both generations predict, so the
comparison is paired: what matters is the images one generation gets right and
the other wrong. The rule tests those discordant pairs with McNemar's exact test
(a binomial test of the candidate's share of them, scipy's `binomtest`), so a
tie or a gain of a few images, which is noise on a benchmark of a few hundred,
never replaces the deployed generation:

- same classes as the deployed generation: promote when the candidate is
  significantly better on the benchmark (one-sided p < `alpha`) and gains at
  least `min_gain`;
- new classes: promote when the candidate is not significantly worse on the
  shared classes (the point of the generation is the new class) and recognises
  every new class at least `min_new_recall` of the time on its benchmark images;
- either way no shared class may be significantly worse by more than
  `max_class_drop` (one benchmark image can never veto: one discordant pair is
  never significant);
- the first deployment, with nothing to compare with, needs a benchmark accuracy
  of at least `min_first_accuracy`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy.stats import binomtest

from . import journal, library, models
from .evaluate import predict_rows
from .splits import benchmark_rows, drop_trained, trained_hashes
from .models import deployed_name
from .plots import save
from .workspace import Workspace, ZoolibError, open_workspace

_EPS = 1e-9  # thresholds are inclusive: float noise must not flip a decision


@dataclass
class Rule:
    """The promotion rule's thresholds (03_evaluate parameters of the same names).

    Attributes:
        alpha: significance level of the paired tests.
        min_gain: benchmark accuracy the candidate must gain on shared classes
            (same class list only; a new-class generation must not be worse).
        max_class_drop: a shared class whose accuracy drops by more than this,
            significantly, vetoes the promotion.
        min_new_recall: benchmark accuracy each new class needs.
        min_first_accuracy: benchmark accuracy of the first deployed generation.
    """

    alpha: float = 0.05
    min_gain: float = 0.0
    max_class_drop: float = 0.05
    min_new_recall: float = 0.5
    min_first_accuracy: float = 0.5

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise ZoolibError(f"ALPHA must be in (0, 1), got {self.alpha}")
        for name in ("max_class_drop", "min_new_recall", "min_first_accuracy"):
            if not 0 <= getattr(self, name) <= 1:
                raise ZoolibError(f"{name.upper()} must be in [0, 1], got {getattr(self, name)}")


def paired_p(wins: int, losses: int) -> tuple[float, float]:
    """McNemar's exact test on discordant pairs: (p that the candidate is better,
    p that it is worse), one-sided; (1, 1) without a discordant pair."""
    n = int(wins) + int(losses)
    if n == 0:
        return 1.0, 1.0
    better = binomtest(int(wins), n, 0.5, alternative="greater").pvalue
    worse = binomtest(int(losses), n, 0.5, alternative="greater").pvalue
    return float(better), float(worse)


@dataclass
class Comparison:
    """Two generations on the same benchmark images.

    Attributes:
        candidate, baseline: generation names.
        shared: classes in both class lists (the fair comparison).
        new: classes only the candidate has (reported separately).
        removed: classes only the baseline has.
        per_class: class, images, baseline, candidate, change, wins, losses,
            p_worse (accuracy on shared classes; wins: images only the candidate
            gets right, losses: only the baseline).
        new_classes: class, images, candidate accuracy on the new classes.
        baseline_accuracy, candidate_accuracy: on images of the shared classes.
        images, wins, losses: shared-class images and their discordant pairs.
    """

    candidate: str
    baseline: str
    shared: list[str]
    new: list[str]
    removed: list[str]
    per_class: pd.DataFrame
    new_classes: pd.DataFrame
    baseline_accuracy: float
    candidate_accuracy: float
    images: int
    wins: int = 0
    losses: int = 0

    @property
    def gain(self) -> float:
        return self.candidate_accuracy - self.baseline_accuracy

    @property
    def p_better(self) -> float:
        return paired_p(self.wins, self.losses)[0]

    @property
    def p_worse(self) -> float:
        return paired_p(self.wins, self.losses)[1]

    def summary(self) -> dict:
        """JSON-ready headline of the comparison."""
        return {"candidate": self.candidate, "baseline": self.baseline, "images": self.images,
                "baseline_accuracy": self.baseline_accuracy,
                "candidate_accuracy": self.candidate_accuracy, "gain": self.gain,
                "wins": self.wins, "losses": self.losses,
                "p_better": self.p_better, "p_worse": self.p_worse,
                "shared": self.shared, "new": self.new, "removed": self.removed,
                "per_class": self.per_class.set_index("class").round(4).to_dict(orient="index"),
                "new_classes": self.new_classes.set_index("class").round(4)
                                   .to_dict(orient="index")}

    def side_by_side(self) -> pd.DataFrame:
        """Per-class table plus an "all shared classes" row, for display."""
        total = pd.DataFrame([{"class": "(all shared classes)", "images": self.images,
                               "baseline": self.baseline_accuracy,
                               "candidate": self.candidate_accuracy, "change": self.gain,
                               "wins": self.wins, "losses": self.losses,
                               "p_worse": self.p_worse}])
        return pd.concat([self.per_class, total], ignore_index=True).rename(
            columns={"baseline": self.baseline, "candidate": self.candidate})


def compare_frames(candidate: pd.DataFrame, candidate_classes: list[str], candidate_name: str,
                   baseline: pd.DataFrame, baseline_classes: list[str], baseline_name: str
                   ) -> Comparison:
    """Compare two prediction frames of the same images (matched by path).

    Raises:
        ZoolibError: the frames do not hold the same images.
    """
    if sorted(candidate["path"]) != sorted(baseline["path"]):
        raise ZoolibError(f"{candidate_name} and {baseline_name} were not predicted on the "
                          "same images")
    shared = [c for c in candidate_classes if c in baseline_classes]
    new = [c for c in candidate_classes if c not in baseline_classes]
    removed = [c for c in baseline_classes if c not in candidate_classes]
    both = candidate[["path", "label", "correct"]].merge(
        baseline[["path", "correct"]], on="path", suffixes=("_c", "_b"))
    both["win"] = both["correct_c"] & ~both["correct_b"]
    both["loss"] = both["correct_b"] & ~both["correct_c"]
    on_shared = both[both["label"].isin(shared)]
    g = on_shared.groupby("label")
    per_class = pd.DataFrame({"images": g.size(), "baseline": g["correct_b"].mean(),
                              "candidate": g["correct_c"].mean(), "wins": g["win"].sum(),
                              "losses": g["loss"].sum()}).reindex(shared)
    per_class = per_class.dropna(subset=["images"]).rename_axis("class").reset_index()
    for col in ("images", "wins", "losses"):
        per_class[col] = per_class[col].astype(int)
    per_class["change"] = per_class["candidate"] - per_class["baseline"]
    per_class["p_worse"] = [paired_p(w, lo)[1] for w, lo in zip(per_class["wins"],
                                                                 per_class["losses"])]
    per_class = per_class[["class", "images", "baseline", "candidate", "change", "wins",
                           "losses", "p_worse"]]
    on_new = both[both["label"].isin(new)].groupby("label")["correct_c"]
    new_classes = pd.DataFrame({"images": on_new.size(), "candidate": on_new.mean()}
                               ).reindex(new).rename_axis("class").reset_index()
    new_classes["images"] = new_classes["images"].fillna(0).astype(int)
    acc = lambda col: float(on_shared[col].mean()) if len(on_shared) else float("nan")  # noqa: E731
    return Comparison(candidate_name, baseline_name, shared, new, removed, per_class,
                      new_classes, acc("correct_b"), acc("correct_c"), int(len(on_shared)),
                      int(on_shared["win"].sum()), int(on_shared["loss"].sum()))


def compare(workspace, candidate: str = "last", baseline: str = "deployed",
            candidate_frame: pd.DataFrame | None = None, tta: bool = False) -> Comparison:
    """Predict the benchmark images with both generations and compare them.

    Args:
        workspace: a workspace path or Workspace.
        candidate: a generation name or "last".
        baseline: a generation name or "deployed".
        candidate_frame: the candidate's benchmark predictions, if already made
            (with the same `tta` as the baseline's, for a fair comparison).
        tta: multi-crop test-time augmentation (`inference.tta_views`) for both generations.

    Raises:
        ZoolibError: baseline "deployed" while nothing is deployed.
    """
    ws = open_workspace(workspace)
    candidate = models.resolve_generation(ws, candidate, include_throwaway=True)
    baseline = deployed_name(ws) if baseline == "deployed" else baseline
    if baseline is None:
        raise ZoolibError(f"nothing is deployed yet in {ws.models}: nothing to compare with")
    rows = benchmark_rows(ws, library.scan(ws, progress=False))
    # images either lineage trained on say nothing about generalisation
    rows, _ = drop_trained(ws, rows, trained_hashes(ws, candidate) | trained_hashes(ws, baseline))
    if candidate_frame is not None:
        candidate_frame = candidate_frame[candidate_frame["path"].isin(set(rows["path"]))]
    cand = (candidate_frame if candidate_frame is not None
            else predict_rows(ws, candidate, rows, tta=tta))
    base = predict_rows(ws, baseline, rows, tta=tta)
    return compare_frames(cand, models.read_info(ws, candidate)["classes"], candidate,
                          base, models.read_info(ws, baseline)["classes"], baseline)


def plot_comparison(comp: Comparison, path: str | Path | None = None):
    """Per-class benchmark accuracy of baseline and candidate side by side, new classes apart."""
    t = comp.per_class
    n = len(t) + len(comp.new_classes)
    fig, ax = plt.subplots(figsize=(7, 0.32 * n + 1.5))
    y = np.arange(len(t))
    ax.barh(y - 0.2, t["baseline"], 0.4, label=comp.baseline, color="tab:gray")
    ax.barh(y + 0.2, t["candidate"], 0.4, label=comp.candidate, color="tab:blue")
    yn = np.arange(len(t), n)
    ax.barh(yn + 0.2, comp.new_classes["candidate"].fillna(0), 0.4, color="tab:orange",
            label=f"{comp.candidate}, new classes")
    ax.set_yticks(list(y) + list(yn), list(t["class"]) + [f"{c} (new)" for c in
                                                             comp.new_classes["class"]])
    ax.invert_yaxis(); ax.set_xlim(0, 1); ax.set_xlabel("benchmark accuracy")
    ax.set_title(f"shared classes: {comp.baseline} {comp.baseline_accuracy:.3f} -> "
                 f"{comp.candidate} {comp.candidate_accuracy:.3f}")
    ax.legend(loc="lower right", fontsize=8)
    return save(fig, path)


@dataclass
class Decision:
    """The promotion rule's verdict and its reasons (`promoted`: deployed.json was written)."""

    promote: bool
    reasons: list[str]
    promoted: bool = False

    def __str__(self) -> str:
        verdict = "PROMOTE" if self.promote else "KEEP THE DEPLOYED GENERATION"
        return f"{verdict}: " + "; ".join(self.reasons)


def decide(comp: Comparison, rule: Rule | None = None) -> Decision:
    """The promotion rule on a comparison with the deployed generation (module docstring)."""
    rule = rule or Rule()
    if comp.images == 0:
        return Decision(False, ["no benchmark image of a shared class: nothing to compare"])
    checks = [_overall(comp, rule), _class_drops(comp, rule)]
    if comp.new:
        checks.append(_new_classes(comp, rule))
    return Decision(all(ok for ok, _ in checks), [r for _, r in checks if r])


def _overall(comp: Comparison, rule: Rule) -> tuple[bool, str]:
    pairs = (f"{comp.images} shared benchmark images, {comp.wins} right only by "
             f"{comp.candidate} and {comp.losses} only by {comp.baseline} (McNemar exact")
    if comp.new:  # a generation that adds classes must not be worse on the old ones
        ok = comp.p_worse >= rule.alpha
        verdict = "not significantly worse" if ok else "significantly worse"
        return ok, (f"gain {comp.gain:+.3f} on shared classes: {verdict} ({pairs}, "
                    f"p = {comp.p_worse:.3g} that it is worse, ALPHA {rule.alpha})")
    significant = comp.p_better < rule.alpha
    enough = comp.gain + _EPS >= rule.min_gain
    text = (f"gain {comp.gain:+.3f} on shared classes: "
            f"{'significant' if significant else 'not significant'} ({pairs}, "
            f"p = {comp.p_better:.3g} that it is better, ALPHA {rule.alpha})")
    if significant and not enough:
        text += f", below MIN_GAIN {rule.min_gain:+.3f}"
    return significant and enough, text


def _class_drops(comp: Comparison, rule: Rule) -> tuple[bool, str]:
    t = comp.per_class
    dropped = t[-t["change"] > rule.max_class_drop + _EPS]
    bad = dropped[dropped["p_worse"] < rule.alpha]
    if len(bad):
        return False, (f"{len(bad)} class(es) significantly worse by more than MAX_CLASS_DROP "
                       f"{rule.max_class_drop:.3f}: " + ", ".join(
                           f"{r['class']} {r['change']:+.3f} (p = {r['p_worse']:.3g})"
                           for _, r in bad.iterrows()))
    if len(dropped):
        return True, (f"{len(dropped)} class(es) drop more than MAX_CLASS_DROP, not "
                      "significantly: " + ", ".join(
                          f"{r['class']} {r['change']:+.3f} ({r['losses']} vs {r['wins']} "
                          f"images, p = {r['p_worse']:.3g})" for _, r in dropped.iterrows()))
    return True, ""


def _new_classes(comp: Comparison, rule: Rule) -> tuple[bool, str]:
    t = comp.new_classes
    weak = t[~(t["candidate"].fillna(-1) + _EPS >= rule.min_new_recall)]
    listed = ", ".join(f"{r['class']} {r['candidate']:.2f} of {r['images']}"
                       if r["images"] else f"{r['class']} (no benchmark image)"
                       for _, r in t.iterrows())
    if len(weak):
        return False, (f"new class(es) below MIN_NEW_RECALL {rule.min_new_recall:.2f} or "
                       f"without benchmark images: {listed}")
    return True, f"new classes meet MIN_NEW_RECALL {rule.min_new_recall:.2f}: {listed}"


def _first(ws: Workspace, name: str, rule: Rule, frame: pd.DataFrame | None,
           tta: bool) -> Decision:
    """The first deployment: the candidate's benchmark accuracy against the floor."""
    classes = models.read_info(ws, name)["classes"]
    if frame is None:
        frame = predict_rows(ws, name, benchmark_rows(ws, library.scan(ws, progress=False)),
                             tta=tta)
    known = frame[frame["label"].isin(classes)]
    if known.empty:
        return Decision(False, [f"nothing is deployed yet and {name} has no benchmark image "
                                "of its classes to judge it by"])
    acc = float(known["correct"].mean())
    ok = acc + _EPS >= rule.min_first_accuracy
    return Decision(ok, [f"nothing is deployed yet: benchmark accuracy {acc:.3f} on "
                         f"{len(known)} images {'meets' if ok else 'is below'} "
                         f"MIN_FIRST_ACCURACY {rule.min_first_accuracy:.3f}"])


def judge(workspace, candidate: str = "last", comparison: Comparison | None = None,
          rule: Rule | None = None, benchmark_frame: pd.DataFrame | None = None,
          tta: bool = False) -> tuple[Decision, Comparison | None]:
    """What the promotion rule says about a candidate, without deploying anything.

    A throw-away candidate is never promoted; the first promotion (nothing deployed
    yet) is judged on the candidate's benchmark accuracy; otherwise the candidate is
    compared with the deployed generation (`comparison` is reused when it is against
    that generation).

    Args:
        workspace: a workspace path or Workspace.
        candidate: a generation name or "last".
        comparison: a comparison already made, reused if against the deployed one.
        rule: the thresholds (`Rule()` when None).
        benchmark_frame: the candidate's benchmark predictions, if already made.
        tta: multi-crop test-time augmentation for predictions made here.

    Returns:
        The decision and the comparison it rests on (None without a deployed generation).
    """
    ws = open_workspace(workspace)
    rule = rule or Rule()
    name = models.resolve_generation(ws, candidate, include_throwaway=True)
    current = deployed_name(ws)
    if models.read_info(ws, name).get("throwaway"):
        return Decision(False, [f"{name} is a throw-away generation: never promoted"]), None
    if current == name:
        return Decision(False, [f"{name} is already the deployed generation"]), None
    if current is None:
        return _first(ws, name, rule, benchmark_frame, tta), None
    if comparison is None or (comparison.candidate, comparison.baseline) != (name, current):
        comparison = compare(ws, name, current, benchmark_frame, tta=tta)
    return decide(comparison, rule), comparison


def promote(workspace, candidate: str = "last", comparison: Comparison | None = None,
            rule: Rule | None = None, force: bool = False,
            benchmark_frame: pd.DataFrame | None = None, tta: bool = False) -> Decision:
    """Apply the promotion rule and, if it says so (or `force`), deploy the candidate.

    Deploying writes `models/deployed.json` and a "promote" journal row, both with
    the rule, the p-values and the reasons.

    Args:
        workspace: a workspace path or Workspace.
        candidate: a generation name or "last".
        comparison, rule, benchmark_frame, tta: see `judge`.
        force: deploy even if the rule says no (never a throw-away run).

    Returns:
        The decision; `promoted` tells whether deployed.json was written.

    Raises:
        ZoolibError: the candidate is a throw-away generation or does not exist.
    """
    ws = open_workspace(workspace)
    rule = rule or Rule()
    name = models.resolve_generation(ws, candidate, include_throwaway=True)
    if models.read_info(ws, name).get("throwaway"):
        raise ZoolibError(f"{name} is a throw-away generation: it can never be promoted "
                          "(it exists only for bulk identification of rare classes)")
    current = deployed_name(ws)
    decision, comparison = judge(ws, name, comparison, rule, benchmark_frame, tta)
    if current == name or not (decision.promote or force):
        return decision
    forced = force and not decision.promote
    if forced:
        decision.reasons.append("promoted anyway: force=True")
    paired = ({k: comparison.summary()[k] for k in ("gain", "wins", "losses", "p_better",
                                                    "p_worse")} if comparison else {})
    details = {"previous": current, "gain": paired.get("gain"), "paired": paired,
               "forced": forced, "rule": asdict(rule), "reasons": decision.reasons}
    models.write_deployed(ws, name, **details)
    journal.record(ws, "promote", generation=name, **details)
    decision.promoted = True
    return decision
