"""The default small-image recipe side by side with airbench94 (issue 27).

Both train on the same images: the first `--per-class` files (sorted by name) of
each of the six animal classes of cifar10/train, as the anchor
(`../shared/anchors/airbench_cpu.py`) takes them. zoolib's library also holds the
last `--valid-per-class` files of the first 5,000 of each class, pinned to its
valid split (the content-hash split is overridden by pins), so with the defaults
4,500 images per class train and the other 500 validate. The final figure is
accuracy on the 6,000 cifar10/test images of the six classes, with and without
each recipe's TTA (zoolib: `inference.tta_views`; the anchor: its level 2, the
same six views).

Minutes compared: the anchor's `total_training_minutes` (whitening init +
training epochs; its data decoding and test passes are not counted) against
zoolib's `train_seconds` (whitening init + `fit`, which also validates every
epoch, a cost the anchor does not pay; the library scan, split and pixel cache
are not counted).

    .venv/bin/python bench/train_recipe.py                     # the goal run (hours)
    .venv/bin/python bench/train_recipe.py --max-minutes 120   # as much of it as fits
    .venv/bin/python bench/train_recipe.py --anchor --seeds 0  # one seed side by side
    .venv/bin/python bench/train_recipe.py --anchor --on-valid --per-class 1500 \\
        --seeds 0 --run tune    # tuning: the anchor tested on zoolib's valid images
    .venv/bin/python bench/train_recipe.py --per-class 300 --epochs 2 --no-test  # smoke

The default run (`--anchor --seeds 0,1 --long`, nothing else changed but
`--max-minutes` and `--run`; the long preset with the first seed only, its goal
is not a mean) takes about four hours on 2 cores: it keeps each finished
run in bench/results/train_recipe_parts/ (commit them) and reads them back on the
next start, on a machine with the same CPU model and flags, until all are there;
then it writes bench/results/train_recipe.json with its goals. Every run writes
reports/recipe/<run>/metrics.json and summary.md. The CPU model and flags are
printed first and recorded.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from benchinfo import commit, cpu
from cifar import ANIMALS, DATA, REPO, EpochLog, link_library, peak_rss_mb, place, test_rows

from zoolib import curate, evaluate, pipeline, splits, workspace
from zoolib.train import TrainConfig, train
from zoolib.workspace import ZoolibError

ANCHOR = REPO.parent / "shared" / "anchors" / "airbench_cpu.py"
RESULTS = REPO / "bench" / "results" / "train_recipe.json"
PARTS = REPO / "bench" / "results" / "train_recipe_parts"
GOALS = {"anchor_gap": 0.005, "minutes_ratio": 1.1, "long_test_accuracy": 0.90,
         "long_minutes_ratio": 3.0}
FRACTIONS = {"train": 0.9, "valid": 0.1, "test": 0.0, "benchmark": 0.0}
FIRST = 5000  # the valid images are the last --valid-per-class of the first 5,000
# The longer preset: airbench95's widths (128/384/384) at its rate 10 for 13 epochs.
LONG = {"arch": "zoo_cnn_wide", "recipe": "long"}


def files(data: Path, cls: str, per_class: int, valid: int) -> tuple[list[Path], list[Path]]:
    """The training files (the first `per_class`, sorted) and the valid ones of a class:
    the last `valid` of the first 5,000 (of all, in a smaller folder), the same
    whatever `per_class` is."""
    names = sorted((data / "train" / cls).glob("*.jpg"))
    first = min(FIRST, len(names))
    if per_class > first - valid:
        raise ZoolibError(f"{data / 'train' / cls} holds {len(names)} images: --per-class "
                          f"{per_class} and --valid-per-class {valid} do not both fit")
    return names[:per_class], names[first - valid:first]


def build_workspace(root: Path, data: Path, per_class: int, valid: int) -> workspace.Workspace:
    """A library of the training and valid files, each pinned to its split."""
    if root.exists() and any(root.iterdir()):
        raise ZoolibError(f"workspace {root} is not empty: choose another --run")
    ws = workspace.create(root)
    splits.set_fractions(ws, FRACTIONS)
    pins = {"train": [], "valid": []}
    for cls in ANIMALS:
        tr, va = files(data, cls, per_class, valid)
        link_library(ws, cls, tr + va)
        pins["train"] += [f"{cls}/{f.name}" for f in tr]
        pins["valid"] += [f"{cls}/{f.name}" for f in va]
    for split, paths in pins.items():
        curate.pin(ws, paths, split)
    return ws


def valid_data(root: Path, data: Path, valid: int) -> Path:
    """A data folder for the anchor whose `test` is zoolib's valid images (tuning)."""
    for cls in ANIMALS:
        (root / "train").mkdir(parents=True, exist_ok=True)
        link = root / "train" / cls
        if not link.exists():
            link.symlink_to((data / "train" / cls).resolve())
        (root / "test" / cls).mkdir(parents=True, exist_ok=True)
        for f in files(data, cls, 0, valid)[1]:
            place(f.resolve(), root / "test" / cls / f.name)
    return root


def config(args, seed: int, **over) -> TrainConfig:
    """The recipe's defaults, with the flags given on the command line."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    return TrainConfig(**{"img_size": 32, "resume": False, **given, **over, "seed": seed})


def run_zoolib(args, out: Path, seed: int, label: str, **over) -> dict:
    """Train one generation; its figures on cifar10/test (or valid with --on-valid)."""
    ws = build_workspace(out / f"{label}-workspace", Path(args.data), args.per_class,
                         args.valid_per_class)
    cfg = config(args, seed, **over)
    print(f"[{label}] training: {asdict(cfg)}", flush=True)
    t0 = time.perf_counter()
    result = train(ws, cfg, progress=False, extra_cbs=[EpochLog(label)])
    total = time.perf_counter() - t0
    m = {"generation": result.name, "config": result.info["config"],
         "recipe": result.info["recipe"], "split_counts": result.info["split_counts"],
         "train": result.info["metrics"], "history": result.history.to_dict(orient="list"),
         "minutes": result.info["metrics"]["train_seconds"] / 60,
         "minutes_total": total / 60}
    if args.on_valid:
        rows = result.splits[result.splits["split"] == "valid"][["path", "label"]]
        rows = rows.assign(path=[str(ws.library / p) for p in rows["path"]])
    elif not args.no_test:
        rows = test_rows(Path(args.data))
    else:
        return m
    plain = evaluate.predict_rows(ws, result.name, rows)
    tta = evaluate.predict_rows(ws, result.name, rows, tta=True)
    m["test"] = {"set": "valid" if args.on_valid else "cifar10/test", "images": len(rows),
                 "accuracy": float((plain["pred"] == plain["label"]).mean()),
                 "accuracy_tta": float((tta["pred"] == tta["label"]).mean()),
                 "per_class_tta": {c: float((g["pred"] == c).mean())
                                   for c, g in tta.groupby("label")}}
    print(f"[{label}] {m['test']['set']}: {m['test']['accuracy']:.4f}, TTA "
          f"{m['test']['accuracy_tta']:.4f}; {m['minutes']:.1f} training minutes", flush=True)
    return m


def run_anchor(args, out: Path, seed: int, data: Path) -> dict:
    """The anchor script on the same training images, in a child process."""
    path = out / f"anchor-{seed}.json"
    cmd = [sys.executable, args.anchor_script, "--per-class", str(args.per_class), "--seed",
           str(seed), "--data", str(data), "--out", str(path)]
    print(f"[anchor] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    a = json.loads(path.read_text())
    return {"test": {"set": "valid" if args.on_valid else "cifar10/test",
                     "images": a["settings"]["n_test"], "accuracy": a["test_acc"],
                     "accuracy_tta": a["test_acc_tta"],
                     "per_class_tta": a["per_class_test_acc_tta"]},
            "minutes": a["total_training_minutes"], "train_images_per_s": a["train_images_per_s"],
            "settings": {k: a["settings"][k] for k in ("precision", "channels_last", "epochs",
                                                        "batch_size", "total_train_steps")}}


def mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def goals(m: dict) -> dict:
    """value, goal and met of each of the issue's goals that this run measured."""
    def goal(name, value, higher=True):
        met = value is not None and (value >= GOALS[name] if higher else value <= GOALS[name])
        return {"value": None if value is None else round(value, 4), "goal": GOALS[name],
                "met": met}

    ours, anchor = m.get("zoolib", []), m.get("anchor", [])
    acc = lambda runs: mean([r.get("test", {}).get("accuracy_tta") for r in runs])  # noqa: E731
    mins = lambda runs: mean([r["minutes"] for r in runs])  # noqa: E731
    out = {}
    if ours and anchor:
        out["anchor_gap"] = goal("anchor_gap", None if acc(ours) is None or acc(anchor) is None
                                 else acc(ours) - acc(anchor))
        out["minutes_ratio"] = goal("minutes_ratio", mins(ours) / mins(anchor), higher=False)
    if m.get("long"):
        out["long_test_accuracy"] = goal("long_test_accuracy", acc(m["long"]))
        if anchor:
            out["long_minutes_ratio"] = goal("long_minutes_ratio",
                                             mins(m["long"]) / mins(anchor), higher=False)
    return out


def run(args) -> dict:
    """Every run asked for, then the goals; writes the report (and the results file).

    With `--parts DIR` (the default run: bench/results/train_recipe_parts/) each
    finished run is kept there as `<side>-<seed>.json` with the CPU, date and commit,
    and a run found there for the same CPU and sample is read instead of trained
    again: the default run takes several hours on 2 cores, more than one working
    session, so it can be finished over several sessions on machines of one kind.
    `--max-minutes` stops starting new runs after that much wall time.
    """
    out = pipeline.report_dir(Path(args.out) / args.run)
    m = {"run": args.run, "cpu": cpu(), "per_class": args.per_class,
         "valid_per_class": args.valid_per_class, "on_valid": args.on_valid,
         "seeds": args.seeds, "zoolib": [], "anchor": [], "long": []}
    print(f"CPU: {m['cpu']}", flush=True)
    data = valid_data(out / "anchor-data", Path(args.data), args.valid_per_class) \
        if args.on_valid else Path(args.data)
    started, complete = time.monotonic(), True
    # the pairs first, the long preset last and with the first seed only (its goal is not
    # a mean): a run stopped by --max-minutes leaves whole pairs
    jobs = [(side, seed) for seed in args.seeds for side, wanted in
            (("anchor", args.anchor), ("zoolib", True)) if wanted]
    jobs += [("long", args.seeds[0])] if args.long else []
    for side, seed in jobs:
        kept = read_part(args, m, side, seed)
        if kept is None and (time.monotonic() - started) / 60 > args.max_minutes:
            print(f"[{side}-{seed}] not started: past --max-minutes", flush=True)
            complete = False
            continue
        if kept is None:
            kept = {"anchor": lambda: run_anchor(args, out, seed, data),
                    "zoolib": lambda: run_zoolib(args, out, seed, f"zoolib-{seed}"),
                    "long": lambda: run_zoolib(args, out, seed, f"long-{seed}", **LONG)}[side]()
            write_part(args, m, side, seed, kept)
        m[side].append(kept)
        m["goals"] = goals(m)
        pipeline.write_metrics(out, m)  # after each run: a stopped benchmark keeps what it did
    m["peak_rss_mb"] = round(peak_rss_mb())
    m["goals"] = goals(m)
    m["complete"] = complete
    pipeline.write_metrics(out, m)
    (out / "summary.md").write_text(summary(m))
    print(summary(m), flush=True)
    if args.default_run and complete:
        write_results(m)
    return m


def _part_path(args, side: str, seed: int) -> Path | None:
    return Path(args.parts) / f"{side}-{seed}.json" if args.parts else None


def read_part(args, m: dict, side: str, seed: int) -> dict | None:
    """A run kept by an earlier session for this CPU and sample, or None."""
    path = _part_path(args, side, seed)
    if path is None or not path.is_file():
        return None
    part = json.loads(path.read_text())
    same = (part.get("cpu", {}).get("model"), part.get("cpu", {}).get("flags"),
            part.get("per_class"), part.get("on_valid")) == (
        m["cpu"]["model"], m["cpu"]["flags"], args.per_class, args.on_valid)
    if not same:
        print(f"[{side}-{seed}] {path} was measured on another CPU or sample: run again",
              flush=True)
        return None
    print(f"[{side}-{seed}] read from {path} ({part['date']}, commit {part['commit'][:8]})",
          flush=True)
    return part["result"]


def write_part(args, m: dict, side: str, seed: int, result: dict) -> None:
    path = _part_path(args, side, seed)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = {k: result[k] for k in ("test", "minutes", "minutes_total", "recipe", "settings")
            if k in result}
    path.write_text(json.dumps({"cpu": m["cpu"], "per_class": args.per_class,
                                "on_valid": args.on_valid, "date": time.strftime("%Y-%m-%d"),
                                "commit": commit(), "result": keep}, indent=2) + "\n")


def write_results(m: dict) -> None:
    """bench/results/train_recipe.json: the goals, both runs' figures, CPU, date, commit."""
    keep = {k: m[k] for k in ("goals", "cpu", "per_class", "seeds")}
    for side in ("zoolib", "anchor", "long"):
        keep[side] = [{k: r[k] for k in ("test", "minutes") if k in r} for r in m[side]]
    keep.update(date=time.strftime("%Y-%m-%d"), commit=commit())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(keep, indent=2) + "\n")


def summary(m: dict) -> str:
    """The run's summary.md: a row per run, then the goals."""
    lines = [f"# Recipe benchmark `{m['run']}`", "",
             f"CPU: {m['cpu']['model']} ({', '.join(m['cpu']['flags'])}; native bf16: "
             f"{m['cpu']['native_bf16']}), {m['cpu']['cores']} cores.", "",
             f"{m['per_class']} training images per class; figures on "
             f"{'valid' if m['on_valid'] else 'cifar10/test'}.", "",
             "| run | seed | accuracy | with TTA | training minutes |", "|---|---|---|---|---|"]
    for side in ("anchor", "zoolib", "long"):
        for seed, r in zip(m["seeds"], m[side]):
            t = r.get("test", {})
            lines.append(f"| {side} | {seed} | {t.get('accuracy', float('nan')):.4f} | "
                         f"{t.get('accuracy_tta', float('nan')):.4f} | {r['minutes']:.1f} |")
    lines += ["", "| goal | value | target | met |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['value']} | {v['goal']} | {v['met']} |"
              for k, v in m.get("goals", {}).items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags: the sample, the runs, places, and any TrainConfig field."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=4500, help="training images per class")
    ap.add_argument("--valid-per-class", type=int, default=500)
    ap.add_argument("--seeds", default=None, help="comma-separated (default 0,1)")
    ap.add_argument("--anchor", action="store_true", help="run the anchor too")
    ap.add_argument("--long", action="store_true", help="run the longer preset too")
    ap.add_argument("--anchor-script", default=str(ANCHOR))
    ap.add_argument("--parts", default=None,
                    help="keep and reuse finished runs here (default run: " + str(PARTS) + ")")
    ap.add_argument("--max-minutes", type=float, default=float("inf"),
                    help="start no new run after this many minutes")
    ap.add_argument("--on-valid", action="store_true",
                    help="tuning: figures on the valid images, never cifar10/test")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=str(REPO / "reports" / "recipe"))
    ap.add_argument("--run", default=None, help="report folder name (default: a timestamp)")
    ap.add_argument("--no-test", action="store_true", help="no test figures (smoke)")
    for f in fields(TrainConfig):
        if f.name in ("seed",):
            continue
        kind = {"bool": lambda v: v.lower() in ("1", "true", "yes"), "int": int,
                "float": float}.get(str(f.type).replace(" | None", ""), str)
        ap.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    # only the default run (over as many sessions as it takes) writes bench/results
    session_flags = {"--max-minutes", "--run"}
    rest = [a for i, a in enumerate(argv) if a not in session_flags
            and not (i and argv[i - 1] in session_flags)]
    args.default_run = not rest
    if args.default_run:
        args.anchor, args.long, args.parts = True, True, str(PARTS)
    args.seeds = [int(s) for s in (args.seeds or "0,1").split(",")]
    args.run = args.run or time.strftime("%Y%m%d-%H%M%S")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        m = run(args)
    except ZoolibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if all(g["met"] for g in m["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
