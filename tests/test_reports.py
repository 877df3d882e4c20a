"""Reports from the transaction log (a hand-made log: no model needed), and the review widget."""
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from PIL import Image

from zoolib import reports, translog
from zoolib.widgets import ReviewWidget, thumbnail

MON = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)  # a Monday


def log(ws, day: int, generation: str, predicted: str, confidence: float,
        image: str | None = None) -> int:
    writer = translog.Writer(ws)
    try:
        return writer.append({
            "time": (MON + timedelta(days=day)).isoformat(), "generation": generation,
            "image_hash": f"h{day}{predicted}", "source": "test", "predicted": predicted,
            "confidence": confidence, "top5": [[predicted, confidence], ["zebra", 0.05]],
            "latency_ms": 10.0, "image": image})
    finally:
        writer.close()


@pytest.fixture
def logged(demo_ws):
    """gen-0001 on days 0-6 (6 predictions), gen-0002 on days 7-9 (4); 7 reviewed."""
    ids = {}
    rows = [(0, "gen-0001", "lion", 0.95), (0, "gen-0001", "lion", 0.6),
            (1, "gen-0001", "zebra", 0.3), (3, "gen-0001", "lion", 0.8),
            (6, "gen-0001", "zebra", 0.92), (6, "gen-0001", "zebra", 0.4),
            (7, "gen-0002", "lion", 0.97), (8, "gen-0002", "zebra", 0.99),
            (9, "gen-0002", "lion", 0.75), (9, "gen-0002", "zebra", 0.45)]
    for k, r in enumerate(rows):
        ids[k] = log(demo_ws, *r)
    # gen-0001: 2 of 4 right; gen-0002: 2 of 3 right.
    for k, true in [(0, "lion"), (2, "lion"), (3, "lion"), (5, "cheetah"),
                    (6, "lion"), (7, "zebra"), (9, "lion")]:
        translog.record_evaluation(demo_ws, ids[k], "anna", true_class=true,
                                   time=MON + timedelta(days=12))
    return demo_ws


def test_usage_per_day_and_week(logged):
    df = reports.load(logged)
    daily = reports.usage(df, "D")
    assert len(daily) == 10  # every day from the first to the last, gaps as zeros
    assert daily.loc[pd.Timestamp("2026-03-02"), "gen-0001"] == 2
    assert daily.loc[pd.Timestamp("2026-03-04")].sum() == 0
    weekly = reports.usage(df, "W")
    assert weekly.to_dict() == {"gen-0001": {pd.Timestamp("2026-03-02"): 6,
                                             pd.Timestamp("2026-03-09"): 0},
                                "gen-0002": {pd.Timestamp("2026-03-02"): 0,
                                             pd.Timestamp("2026-03-09"): 4}}


def test_accuracy_by_generation_band_and_class(logged):
    df = reports.load(logged)
    by_gen = reports.accuracy_by(df, "generation").set_index("generation")
    assert by_gen["predictions"].to_dict() == {"gen-0001": 6, "gen-0002": 4}
    assert by_gen["evaluated"].to_dict() == {"gen-0001": 4, "gen-0002": 3}
    assert by_gen.loc["gen-0001", "accuracy"] == pytest.approx(0.5)
    assert by_gen.loc["gen-0002", "accuracy"] == pytest.approx(2 / 3)
    assert (by_gen["ci_low"] < by_gen["accuracy"]).all()
    assert (by_gen["accuracy"] < by_gen["ci_high"]).all()
    by_band = reports.accuracy_by(df, "band").set_index("band")
    assert by_band["predictions"].sum() == 10
    assert by_band.loc["0.90-1.00", "evaluated"] == 3
    assert by_band.loc["0.90-1.00", "accuracy"] == pytest.approx(1.0)
    by_class = reports.accuracy_by(df, "class").set_index("class")
    assert by_class["evaluated"].to_dict() == {"cheetah": 1, "lion": 5, "zebra": 1}
    assert by_class.loc["lion", "correct"] == 3


def test_a_wrong_mark_without_a_true_class_counts_against_the_prediction(logged):
    ids = translog.joined(logged)["id"].tolist()
    translog.record_evaluation(logged, ids[1], "ben", correct=False)  # a "lion", no true class
    df = reports.load(logged)
    by_class = reports.accuracy_by(df, "class").set_index("class")
    assert by_class.loc["lion", "evaluated"] == 6 and by_class.loc["lion", "correct"] == 3
    row = df[df["id"] == ids[1]].iloc[0]
    assert row["class"] == "lion" and row["class_from"] == "prediction"
    assert "1 marked wrong without a true class" in reports.status(df)


def test_wilson_interval():
    lo, hi = reports.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert all(pd.isna(v) for v in reports.wilson(0, 0))


def test_band_share_summary_and_comparison(logged):
    df = reports.load(logged)
    share = reports.band_share(df)
    bands = share.drop(columns="predictions")
    assert bands.sum(axis=1).tolist() == pytest.approx([1.0, 1.0])
    assert share.loc["gen-0002", "0.90-1.00"] == pytest.approx(0.5)
    assert share["predictions"].tolist() == [6, 4]
    comp = reports.compare(df)
    assert list(comp.columns) == ["gen-0001", "gen-0002", "change"]
    assert comp.loc["accuracy", "change"] == pytest.approx(2 / 3 - 0.5)
    assert comp.loc["predictions", "change"] == -2
    classes = reports.class_comparison(df)
    assert classes.loc["lion", "gen-0002"] == pytest.approx(0.5)
    assert classes.loc["lion", "gen-0001"] == pytest.approx(2 / 3)


def test_report_with_no_transactions_says_so(demo_ws, tmp_path):
    metrics = reports.build(demo_ws, tmp_path)
    assert metrics["transactions"] == 0 and metrics["figures"] == []
    assert "No transactions logged yet" in metrics["status"]
    assert "No transactions logged yet" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "summary.csv").exists()


def test_report_without_evaluations_shows_usage(demo_ws, tmp_path):
    log(demo_ws, 0, "gen-0001", "lion", 0.9)
    metrics = reports.build(demo_ws, tmp_path)
    assert "No manual evaluations yet" in metrics["status"]
    assert metrics["figures"] == ["usage.png", "confidence_bands.png"]
    assert reports.compare(reports.load(demo_ws)).empty  # one generation: nothing to compare


def test_full_report(logged, tmp_path):
    metrics = reports.build(logged, tmp_path, since="2026-03-03T00:00:00+00:00")
    assert metrics["transactions"] == 8 and metrics["evaluated"] == 6
    assert metrics["generations"] == ["gen-0001", "gen-0002"]
    for name in ("usage.png", "accuracy.png", "accuracy_over_time.png",
                 "confidence_bands.png", "class_comparison.png"):
        assert (tmp_path / name).stat().st_size > 1000
    summary = pd.read_csv(tmp_path / "summary.csv", index_col=0)
    assert summary.loc["gen-0001", "predictions"] == 4
    assert "Latest vs previous" in (tmp_path / "report.md").read_text()


def test_review_widget_marks_transactions(demo_ws):
    img = demo_ws.root / "served" / "x.png"
    img.parent.mkdir()
    Image.new("RGB", (8, 8)).save(img)
    first = log(demo_ws, 0, "gen-0001", "lion", 0.9, image="served/x.png")
    second = log(demo_ws, 1, "gen-0001", "zebra", 0.5)
    widget = ReviewWidget(demo_ws, reviewer="anna", mode="recent")
    assert f"#{second}" in widget.info.value and widget.grid.items == []  # no image kept
    widget.true_class.value = "okapi"
    widget.wrong.click()
    assert f"#{first}" in widget.info.value
    assert widget.grid.tiles[0].image.value == thumbnail(str(img), 224)  # the shared grid
    widget.correct.click()
    assert widget.correct.disabled
    ev = translog.joined(demo_ws).set_index("id")
    assert ev.loc[second, "true_class"] == "okapi" and not ev.loc[second, "correct"]
    assert ev.loc[first, "true_class"] == "lion" and ev.loc[first, "correct"]
    assert set(ev["reviewer"]) == {"anna"}
    empty = ReviewWidget(demo_ws, reviewer="anna", mode="unreviewed")
    assert "Nothing" in empty.info.value or "No transactions" in empty.info.value
