"""Candidate versus deployed: the paired comparison, the promotion rule, deploying."""
import json
import shutil

import numpy as np
import pytest

from zoolib import evaluate, journal, library, models, promotion, splits
from zoolib.promotion import Rule
from zoolib.workspace import ZoolibError


def _pred(paths, labels, preds, classes):
    probs = np.full((len(paths), len(classes)), 0.05)
    for r, p in enumerate(preds):
        probs[r, classes.index(p)] = 0.9
    return evaluate.frame_from_probs(labels, probs, classes, path=paths)


@pytest.fixture
def comp():
    """Baseline knows a, b; the candidate adds c. On a and b both get 3 of 4 right,
    but a gains 0.5 and b drops 0.5."""
    paths = [f"p{i}" for i in range(7)]
    labels = ["a", "a", "b", "b", "c", "c", "x"]
    base = _pred(paths, labels, ["a", "b", "b", "b", "a", "b", "a"], ["a", "b"])
    cand = _pred(paths, labels, ["a", "a", "b", "a", "c", "a", "c"], ["a", "b", "c"])
    return promotion.compare_frames(cand, ["a", "b", "c"], "gen-0002", base, ["a", "b"],
                                    "gen-0001")


def _paired(wins: int, losses: int, both_right: int = 80, both_wrong: int = 8,
            new_right: int | None = None):
    """Classes a, b (a new class n when `new_right` is given, of 4 images); the
    discordant pairs all in class a, the rest split between a and b."""
    n = wins + losses + both_right + both_wrong
    labels = ["a"] * (wins + losses) + ["a", "b"] * ((both_right + both_wrong) // 2)
    truth_pred = list(labels)
    base = ["b"] * wins + labels[wins:wins + losses] + truth_pred[wins + losses:]
    cand = labels[:wins] + ["b"] * losses + truth_pred[wins + losses:]
    for i in range(wins + losses + both_right, n):  # both wrong
        base[i] = cand[i] = "b" if labels[i] == "a" else "a"
    classes = ["a", "b"]
    cand_classes = classes + (["n"] if new_right is not None else [])
    if new_right is not None:
        labels += ["n"] * 4
        base += ["a"] * 4
        cand += ["n"] * new_right + ["a"] * (4 - new_right)
    paths = [f"{i}.jpg" for i in range(len(labels))]
    return promotion.compare_frames(_pred(paths, labels, cand, cand_classes), cand_classes,
                                    "cand", _pred(paths, labels, base, classes), classes, "base")


def test_compare_different_class_lists(comp):
    assert comp.shared == ["a", "b"] and comp.new == ["c"] and comp.removed == []
    assert comp.images == 4 and (comp.wins, comp.losses) == (1, 1)
    assert comp.baseline_accuracy == 0.75 and comp.candidate_accuracy == 0.75
    assert comp.gain == 0
    t = comp.per_class.set_index("class")
    assert t.loc["a", ["baseline", "candidate", "change", "wins", "losses"]].tolist() == [
        0.5, 1.0, 0.5, 1, 0]
    assert t.loc["b", ["baseline", "candidate", "change", "wins", "losses"]].tolist() == [
        1.0, 0.5, -0.5, 0, 1]
    assert comp.new_classes.values.tolist() == [["c", 2, 0.5]]
    side = comp.side_by_side()
    assert list(side.columns) == ["class", "images", "gen-0001", "gen-0002", "change", "wins",
                                  "losses", "p_worse"]
    assert side.iloc[-1]["images"] == 4
    json.dumps(comp.summary())  # JSON-ready


def test_compare_needs_same_images():
    a = _pred(["p1"], ["a"], ["a"], ["a", "b"])
    b = _pred(["p2"], ["a"], ["a"], ["a", "b"])
    with pytest.raises(ZoolibError, match="same images"):
        promotion.compare_frames(a, ["a", "b"], "x", b, ["a", "b"], "y")


def test_paired_p_is_mcnemars_exact_test():
    # 10 of 12 discordant pairs for the candidate: P(X >= 10), X ~ Binomial(12, 1/2)
    assert promotion.paired_p(10, 2)[0] == pytest.approx((66 + 12 + 1) / 4096)
    assert promotion.paired_p(2, 10)[1] == pytest.approx((66 + 12 + 1) / 4096)
    assert promotion.paired_p(0, 0) == (1.0, 1.0)


@pytest.mark.parametrize("wins,losses,ok", [(10, 2, True),   # p = 0.019
                                            (9, 3, False),   # p = 0.073
                                            (3, 3, False)])  # a tie never promotes
def test_rule_on_both_sides_of_the_significance_threshold(wins, losses, ok):
    comp = _paired(wins, losses)
    d = promotion.decide(comp, Rule(alpha=0.05))
    assert d.promote is ok and comp.gain == pytest.approx((wins - losses) / comp.images)
    assert f"p = {comp.p_better:.3g} that it is better" in str(d)
    assert ("not significant" in str(d)) is (not ok)


def test_min_gain_still_applies_to_a_significant_gain():
    comp = _paired(10, 2)  # gain 8/100
    assert promotion.decide(comp, Rule(min_gain=0.08)).promote
    d = promotion.decide(comp, Rule(min_gain=0.09))
    assert not d.promote and "below MIN_GAIN" in str(d)


def test_a_new_class_generation_must_not_be_significantly_worse():
    assert promotion.decide(_paired(3, 3, new_right=4)).promote  # a tie is fine here
    d = promotion.decide(_paired(2, 10, new_right=4))
    assert not d.promote and "significantly worse" in str(d)


@pytest.mark.parametrize("right,ok", [(0, False), (1, False), (2, True), (4, True)])
def test_new_class_recall_floor(right, ok):
    d = promotion.decide(_paired(3, 3, new_right=right), Rule(min_new_recall=0.5))
    assert d.promote is ok
    assert f"n {right / 4:.2f} of 4" in str(d)


def test_one_benchmark_image_cannot_veto_but_a_significant_drop_does(comp):
    # class b drops 0.5 on one image: not significant, reported, no veto
    d = promotion.decide(comp, Rule(max_class_drop=0.05, min_new_recall=0.5))
    assert d.promote and "b -0.500" in str(d) and "not significantly" in str(d)
    # a new class; on the old ones a loses 10 of 20 images, b wins 8 of 20: not
    # significantly worse overall (10 vs 8), but a is (10 vs 0)
    labels = ["a"] * 20 + ["b"] * 20 + ["n"] * 4
    base = ["a"] * 20 + ["a"] * 8 + ["b"] * 12 + ["a"] * 4
    cand = ["b"] * 10 + ["a"] * 10 + ["b"] * 20 + ["n"] * 4
    paths = [f"{i}.jpg" for i in range(len(labels))]
    split = promotion.compare_frames(_pred(paths, labels, cand, ["a", "b", "n"]),
                                     ["a", "b", "n"], "cand",
                                     _pred(paths, labels, base, ["a", "b"]), ["a", "b"], "base")
    assert (split.wins, split.losses) == (8, 10)
    d = promotion.decide(split, Rule(max_class_drop=0.05))
    assert not d.promote and "1 class(es) significantly worse by more than" in str(d)
    assert "a -0.500 (p = 0.000977)" in str(d) and "not significantly worse" in str(d)
    assert promotion.decide(split, Rule(max_class_drop=0.5)).promote


def test_rule_thresholds_are_checked():
    with pytest.raises(ZoolibError, match="ALPHA"):
        Rule(alpha=0)
    with pytest.raises(ZoolibError, match="MIN_NEW_RECALL"):
        Rule(min_new_recall=1.5)


# ---- on a trained workspace -------------------------------------------------------------

def _bench_frame(ws, generation: str, right: int, wrong: int):
    classes = models.read_info(ws, generation)["classes"]
    labels = [classes[0]] * (right + wrong)
    preds = [classes[0]] * right + [classes[1]] * wrong
    return _pred([f"{i}.jpg" for i in range(len(labels))], labels, preds, classes)


@pytest.mark.parametrize("floor,ok", [(0.5, True), (0.51, False)])
def test_first_deployment_needs_the_accuracy_floor(trained_ws, floor, ok):
    frame = _bench_frame(trained_ws, "gen-0001", right=5, wrong=5)
    d = promotion.promote(trained_ws, "gen-0001", rule=Rule(min_first_accuracy=floor),
                          benchmark_frame=frame)
    assert d.promote is ok and d.promoted is ok
    assert "benchmark accuracy 0.500 on 10 images" in str(d)
    assert (models.read_deployed(trained_ws) is not None) is ok


def test_first_promotion_then_rule(trained_ws):
    ws = trained_ws
    d = promotion.promote(ws, "gen-0001", rule=Rule(min_first_accuracy=0.0))
    assert d.promote and d.promoted
    assert models.read_deployed(ws)["generation"] == "gen-0001"
    rows = journal.read(ws, "promote")
    assert len(rows) == 1 and json.loads(rows["details"][0])["generation"] == "gen-0001"
    assert not promotion.promote(ws, "gen-0001").promoted  # already deployed
    # a candidate identical to the deployed one: no discordant pair, a tie
    shutil.copytree(ws.models / "gen-0001", ws.models / "gen-0002")
    info_path = ws.models / "gen-0002" / "model.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()),
                                     "name": "gen-0002", "parent": "gen-0001"}))
    comp = promotion.compare(ws, "gen-0002", "deployed")
    assert comp.gain == 0 and (comp.wins, comp.losses) == (0, 0) and comp.images > 0
    d = promotion.promote(ws, "gen-0002", comp)
    assert not d.promote and not d.promoted
    assert models.read_deployed(ws)["generation"] == "gen-0001"
    d = promotion.promote(ws, "gen-0002", comp, force=True)
    deployed = models.read_deployed(ws)
    assert d.promoted and deployed["forced"] is True and deployed["previous"] == "gen-0001"
    assert deployed["paired"]["p_better"] == 1.0 and deployed["rule"]["alpha"] == 0.05
    assert len(journal.read(ws, "promote")) == 2
    table = evaluate.lineage(ws)
    assert table["generation"].tolist() == ["gen-0001", "gen-0002"]
    assert table["deployed"].tolist() == [False, True]
    assert table.loc[1, "parent"] == "gen-0001"
    assert table.loc[0, "classes_added"].split(", ") == models.read_info(ws, "gen-0001")["classes"]


def test_compare_with_a_new_class(trained_ws):
    ws = trained_ws
    promotion.promote(ws, "gen-0001", force=True)
    old = models.read_info(ws, "gen-0001")
    classes = sorted(old["classes"] + ["okapi"])
    splits.freeze_benchmark(ws, library.scan(ws, progress=False), ["okapi"])  # as training does
    model = models.create_model(old["arch"], len(classes))
    info = {k: old[k] for k in ("arch", "img_size", "mean", "std")}
    models.save_generation(ws, model, {**info, "classes": classes, "parent": "gen-0001"})
    comp = promotion.compare(ws, "gen-0002")
    bench = splits.benchmark_rows(ws, library.scan(ws, progress=False))
    assert comp.new == ["okapi"] and comp.shared == old["classes"]
    assert comp.new_classes["images"].tolist() == [int((bench["label"] == "okapi").sum())] != [0]
    assert comp.images == int(bench["label"].isin(old["classes"]).sum())
    assert "okapi" not in comp.per_class["class"].tolist()


def test_throwaway_never_promoted(trained_ws):
    models.update_info(trained_ws, "gen-0001", throwaway=True)
    for force in (False, True):
        with pytest.raises(ZoolibError, match="gen-0001 is a throw-away generation"):
            promotion.promote(trained_ws, "gen-0001", force=force)
    assert models.read_deployed(trained_ws) is None
    assert len(journal.read(trained_ws, "promote")) == 0
    d, _ = promotion.judge(trained_ws, "gen-0001")
    assert not d.promote
