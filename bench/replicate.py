"""Warm chains against scratch runs over a slowly growing CIFAR-10 animal library (issue 28).

The practitioner's library does not grow in three big jumps but a little at a time,
generation after generation, each warm-started from the last. This replicates that
with the workbench's own `train` and default recipe on the six animal classes of
`../shared/datasets/cifar10` (bird cat deer dog frog horse):

- Generation 1 holds four classes (`--initial` images each); `--arrivals` names
  the classes that arrive later and when (default `cat:2,horse:4`: cat, today's
  held-out class, at generation 2, so the look-alike figure stays comparable with
  the earlier runs; horse at 4: the output layer really changes twice). Every
  generation adds `--growth` (default 20%; 10-25% is the practitioner's pace) to
  each class already there; an arriving class starts with `--new-class` images.
  Each class's cifar10/train files are shuffled with the seed and a generation
  holds the first ones, so it keeps every image of the one before.
- At every generation a scratch run (`INIT_FROM="scratch"`) and, for each chain of
  `--methods` (a `WARM_METHOD`, optionally `:WARM_SCHEDULE`), the chain's next
  generation, warm-started from the chain's previous one, never from a scratch
  run. Generation 1 is the shared scratch start of every chain; the scratch runs
  are shared by all chains. Same splits (by content hash) and the recipe's budget
  for all, validating every epoch (epochs to reach need each).
- Per run: epochs to reach the same generation's scratch best validation accuracy
  (None if never), plateau epoch, best validation accuracy, cifar10/test accuracy
  (plain for every run; with the workbench's six-view TTA at the last generation
  only: `--tta`), training seconds, and the chain's cumulative training seconds
  beside the scratch runs'. cifar10/test gives figures only, never a decision.
- The inbox, once per seed with that seed's generation 1 (replicate_inbox.py):
  look-alike enrichment of the class arriving first, junk-removal ROC AUC.
- Each seed (`--seeds`) is a whole replicate: its own sample, workspace and
  training seed; figures are the mean and spread (max - min) over the seeds.

Sizing of the default run (90 minutes on 2 cores of an AVX2-only AMD EPYC, fp32,
where zoo_cnn at 32 px under the default recipe trains ~130 training images/s,
its overheads included: train_recipe's 13,500-image run 132/s, its 27,000-image
part in bench/results/train_recipe_parts 124/s, which would make it 80 minutes):

    library per generation (340 per class at gen 1, +20% a generation, 300 new):
        1,360  1,932  2,320  3,084  3,702  4,442 images (gen 6: 847 a class for
        the four first classes, 622 cat, 432 horse)
    runs: seeds x (generations + chains x (generations - 1)) = 2 x (6 + 5) = 22
    per seed: 1,360 + 2 x (1,932 + 2,320 + 3,084 + 3,702 + 4,442) = 32,320 images
    training: 2 seeds x 32,320 x 0.7 (train split) x 10 epochs = 452,480 images
        / 130 per s = 3,480 s = 58 minutes
    the rest, at a conservative ~400 images/s for inference (bulkid measured 962):
        plain test, 120,000 images: 5 min; TTA at gen 6, 4 runs x 6,000 x 6
        views: 6 min; validation every epoch (10% of the library): 3 min; the
        inbox, 2 x 5,000: 0.5 min; ~10 s a run for scan, split, cache, save: 4 min
    total about 77 minutes: 13 minutes (15%) of margin under the goal.

Each more chain adds 2 x 15,480 x 0.7 x 10 / 130 s = 28 minutes of training and
~4 of testing: `--methods copy,dash` takes about 1 h 50 min (not the default run:
it writes no results file). `estimate` prints the training part before a run starts.

    .venv/bin/python bench/replicate.py --quick              # smoke run
    nohup nice .venv/bin/python bench/replicate.py > /tmp/replicate.log 2>&1 &  # default
    .venv/bin/python bench/replicate.py --methods copy,shrink_perturb,dash:rewarm --run m3

Output: `reports/replicate/<run>/` with summary.md, metrics.json (with `goals`:
value, goal and met each), runs.csv, generations.csv, plots. The default run
(no flags but --run, --out and --workspace) also writes bench/results/replicate.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from cifar import (ANIMALS, DATA, REPO, VEHICLES, EpochLog, link_inbox, link_library,
                   peak_rss_mb, shuffled, test_rows)
from replicate_inbox import enrichment, inbox_part, junk_scores  # noqa: F401 (the test's)
from replicate_report import GOALS, goals, write_report, write_results  # noqa: F401
from benchinfo import commit, cpu
from zoolib import evaluate, metrics, pipeline, workspace
from zoolib.config import WARM_METHODS, WARM_SCHEDULES, TrainConfig
from zoolib.train import train
from zoolib.workspace import ZoolibError

IMAGES_PER_S = 130  # zoo_cnn, 32 px, default recipe, 2 AVX2 cores (see the docstring)
TRAIN_SHARE = 0.7  # the workspace's default split: 70% train
DEFAULTS = dict(generations=6, arrivals="cat:2,horse:4", initial=340, growth="0.2",
                new_class=300, methods="copy", warm_schedule="rewarm", seeds="0,1",
                epochs=None, arch="zoo_cnn", size=32, batch_size=None, lr=None, lr_warm=None,
                inbox_per_class=500, test_per_class=0, threshold=0.7, tta="last")
QUICK = dict(generations=3, arrivals="cat:2", initial=60, new_class=50, inbox_per_class=20,
             test_per_class=40, epochs=3, batch_size=32, seeds="0")
SESSION_FLAGS = {"--run", "--out", "--workspace"}  # the default run may still name these


class Chain(NamedTuple):
    """A warm chain: the warm method and schedule of every generation after the first."""

    method: str
    schedule: str

    @property
    def label(self) -> str:
        return f"{self.method}:{self.schedule}"


# ----------------------------------------------------------------------------- the plan

def grown(n: int, rate: float) -> int:
    """`n` images grown by `rate` (rounded half up; at least one more when rate > 0)."""
    return max(n + 1, math.floor(n * (1 + rate) + 0.5)) if rate > 0 else n


def library_plan(args) -> dict[int, dict[str, int]]:
    """Images per class of each generation (1-based): growth, then arrivals."""
    counts = {c: args.initial for c in ANIMALS if c not in args.arrivals}
    plan = {1: dict(counts)}
    for gen in range(2, args.generations + 1):
        counts = {c: grown(n, args.growth[gen - 2]) for c, n in counts.items()}
        counts.update({c: args.new_class for c, g in args.arrivals.items() if g == gen})
        plan[gen] = {c: counts[c] for c in ANIMALS if c in counts}
    return plan


def estimate(plan: dict[int, dict[str, int]], chains: int, seeds: int, epochs: int) -> dict:
    """Training images and minutes the plan costs at IMAGES_PER_S (the docstring's sum)."""
    per_seed = sum(sum(c.values()) * (1 if g == 1 else 1 + chains) for g, c in plan.items())
    images = seeds * per_seed * TRAIN_SHARE * epochs
    return {"library_images_per_seed": per_seed, "train_images": round(images),
            "training_minutes": round(images / IMAGES_PER_S / 60, 1),
            "runs": seeds * (len(plan) + chains * (len(plan) - 1))}


def sample_files(data: Path, need: dict[str, int], inbox_per_class: int, seed: int
                 ) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Each animal class's library order and every class's inbox (disjoint, seeded).

    Args:
        data: the cifar10 folder.
        need: the most library images each animal class takes (its last generation).
        inbox_per_class: inbox images of each of the ten classes.
        seed: the shuffle's seed.

    Returns:
        (the first need[cls] shuffled files per animal class, inbox files per class).

    Raises:
        ZoolibError: a class folder is missing or holds too few images.
    """
    library, inbox = {}, {}
    for cls in ANIMALS + VEHICLES:
        files = shuffled(data, cls, need.get(cls, 0) + inbox_per_class, seed)
        library[cls] = files[:need.get(cls, 0)]
        inbox[cls] = files[len(files) - inbox_per_class:]  # the far end: never in the library
    return {c: library[c] for c in ANIMALS}, inbox


def grow_library(ws, files: dict[str, list[Path]], counts: dict[str, int]) -> None:
    """Link the first `counts[cls]` files of each class (the links already there stay)."""
    for cls, n in counts.items():
        link_library(ws, cls, files[cls][:n])


# ----------------------------------------------------------------------------- training

def config(args, seed: int, init_from: str, chain: Chain | None) -> TrainConfig:
    """TrainConfig's defaults with the flags given; a warm run takes its chain's method."""
    given = {k: getattr(args, k) for k in ("batch_size", "lr", "lr_warm")
             if getattr(args, k) is not None}
    warm = {"warm_method": chain.method, "warm_schedule": chain.schedule} if chain else {}
    return TrainConfig(arch=args.arch, img_size=args.size, epochs=args.epochs,
                       min_images=args.min_images, init_from=init_from, seed=seed, resume=False,
                       num_workers=args.workers, validate="every", **given, **warm)


def first_reach(acc: pd.Series, target: float) -> int | None:
    """The first 1-based epoch whose accuracy is at least `target` (None if never)."""
    hits = np.flatnonzero(acc.to_numpy() >= target - 1e-12)
    return int(hits[0]) + 1 if len(hits) else None


def warm_vs_scratch(warm, scratch) -> dict:
    """How fast a warm run reaches its generation's scratch run (TrainResults).

    `epoch_ratio` = (first warm epoch whose valid accuracy reaches the scratch run's
    best) / (the epochs the scratch run took), the issue's goal; `ratio_vs_best_epoch`
    divides by the scratch run's epoch of that best instead.
    """
    s_acc = scratch.history["accuracy"]
    s_best, s_best_epoch = float(s_acc.max()), int(s_acc.idxmax()) + 1
    s_epochs = int(scratch.info["metrics"]["epochs_run"])
    reach = first_reach(warm.history["accuracy"], s_best)
    return {"scratch_best_valid": s_best, "scratch_best_epoch": s_best_epoch,
            "scratch_epochs": s_epochs, "epochs_to_scratch_best": reach,
            "epoch_ratio": reach / s_epochs if reach else None,
            "ratio_vs_best_epoch": reach / s_best_epoch if reach else None}


def test_figures(ws, generation: str, rows: pd.DataFrame, classes: list[str], tta: bool) -> dict:
    """cifar10/test accuracy of a generation on its classes (and with TTA when asked)."""
    rows = rows[rows["label"].isin(classes)].reset_index(drop=True)
    frame = evaluate.predict_rows(ws, generation, rows)
    summary = metrics.summarize(frame, classes)
    out = {"test_images": int(len(rows)), "test_accuracy": summary["accuracy"],
           "test_macro_f1": summary["macro_f1"], "test_accuracy_tta": None}
    if tta:
        views = evaluate.predict_rows(ws, generation, rows, tta=True)
        out["test_accuracy_tta"] = float((views["pred"] == views["label"]).mean())
    return out


def run_record(result, seed: int, gen: int, chain: Chain | None) -> dict:
    """The figures of one run from its TrainResult (model.json and history)."""
    info, m = result.info, result.info["metrics"]
    return {"seed": seed, "gen": gen, "chain": chain.label if chain else "scratch",
            "method": info.get("warm_method"), "schedule": info.get("warm_schedule"),
            "name": result.name, "parent": info.get("parent"), "classes": len(info["classes"]),
            "library": int(sum(info["split_counts"].values())),
            "train_images": int(info["split_counts"].get("train", 0)),
            **{k: m[k] for k in ("epochs_run", "plateau_epoch", "best_epoch", "valid_accuracy",
                                 "train_seconds", "train_images_per_s")},
            "best_valid": float(result.history["accuracy"].max())}


def train_one(ws, args, m: dict, seed: int, gen: int, chain: Chain | None, init_from: str,
              tests: pd.DataFrame, scratch=None):
    """Train one run, test it and append its record to `m`; returns its TrainResult.

    Args:
        scratch: the generation's scratch TrainResult for a warm run (None for scratch).
    """
    label = f"s{seed}-g{gen}-{chain.label if chain else 'scratch'}"
    log = EpochLog(label)
    cfg = config(args, seed, init_from, chain)
    print(f"[{label}] {cfg.arch} {cfg.img_size}px, init {init_from}", flush=True)
    result = train(ws, cfg, progress=False, extra_cbs=[log])
    rec = run_record(result, seed, gen, chain)
    if scratch is None:
        rec.update(warm_vs_scratch(result, result))  # its own best: the scratch row's reach
    elif scratch.info["data_hash"] != result.info["data_hash"]:
        raise ZoolibError(f"{label} and its scratch run saw different splits")
    else:
        rec.update(warm_vs_scratch(result, scratch))
    t = time.perf_counter()
    tta = args.tta == "all" or (args.tta == "last" and gen == args.generations)
    rec.update(test_figures(ws, result.name, tests, result.info["classes"], tta))
    m["seconds"]["test"] += time.perf_counter() - t
    m["runs"].append(rec)
    m["histories"][label] = result.history.to_dict(orient="list")
    m["memory"]["rss_per_epoch_mb"][label] = log.rss
    return result


# ----------------------------------------------------------------------------- the run

def run_seed(args, m: dict, seed: int, plan: dict, root: Path, tests: pd.DataFrame,
             out: Path) -> None:
    """Every generation of one seed: the scratch runs, the chains and the inbox."""
    need = {c: max(p.get(c, 0) for p in plan.values()) for c in ANIMALS}
    files, inbox_files = sample_files(Path(args.data), need, args.inbox_per_class, seed)
    ws = workspace.create(root)
    truth = link_inbox(ws, inbox_files, seed)
    truth.to_csv(out / f"inbox_truth_s{seed}.csv", index=False)
    first = min(args.arrivals, key=lambda c: (args.arrivals[c], ANIMALS.index(c)))
    parents: dict[str, str] = {}
    for gen in range(1, args.generations + 1):
        grow_library(ws, files, plan[gen])
        scratch = train_one(ws, args, m, seed, gen, None, "scratch", tests)
        if gen == 1:
            parents = {c.label: scratch.name for c in args.chains}
            arrive = files[first][:plan[args.arrivals[first]][first]]
            m["inbox"].append({"seed": seed, **inbox_part(
                ws, scratch.name, truth, first, arrive, args.threshold, args.workers, out,
                f"s{seed}", args.embedder)})
        for chain in args.chains if gen > 1 else ():
            warm = train_one(ws, args, m, seed, gen, chain, parents[chain.label], tests, scratch)
            parents[chain.label] = warm.name
        pipeline.write_metrics(out, m)  # after each generation: a stopped run keeps its runs


def settings(args, plan: dict) -> dict:
    """The run's settings as recorded (the resolved budget and the default chain)."""
    keep = {k: v for k, v in vars(args).items() if k not in ("chains",)}
    resolved = TrainConfig(arch=args.arch, img_size=args.size, epochs=args.epochs).resolved()
    default = Chain(resolved.warm_method, resolved.warm_schedule)
    chosen = default if default in args.chains else args.chains[0]
    return {**keep, "chains": [c.label for c in args.chains], "default_chain": chosen.label,
            "resolved_epochs": resolved.epochs, "plan": {str(g): c for g, c in plan.items()}}


def run(args) -> dict:
    """The whole replication; writes the report folder and returns its metrics."""
    t0 = time.perf_counter()
    out = pipeline.report_dir(Path(args.out) / args.run)
    root = Path(args.workspace) if args.workspace else out / "workspace"
    if root.exists() and any(root.iterdir()):
        raise ZoolibError(f"workspace {root} is not empty: choose another --run or --workspace")
    plan = library_plan(args)
    s = settings(args, plan)
    m = {"run": args.run, "settings": s, "cpu": cpu(), "commit": commit(),
         "date": time.strftime("%Y-%m-%d"),
         "estimate": estimate(plan, len(args.chains), len(args.seeds), s["resolved_epochs"]),
         "runs": [], "histories": {}, "inbox": [], "seconds": {"test": 0.0},
         "memory": {"rss_per_epoch_mb": {}}}
    print(f"CPU: {m['cpu']}\nplan: {s['plan']}\nestimate at {IMAGES_PER_S} img/s: "
          f"{m['estimate']}", flush=True)
    tests = test_rows(Path(args.data), args.test_per_class)
    for seed in args.seeds:
        run_seed(args, m, seed, plan, root / f"seed-{seed}", tests, out)
    m["seconds"].update(test=round(m["seconds"]["test"], 1),
                        bulkid=round(sum(i["seconds"] for i in m["inbox"]), 1),
                        total=round(time.perf_counter() - t0, 1))
    m["memory"]["peak_rss_mb"] = round(peak_rss_mb())
    write_report(m, out)
    if args.default_run:
        write_results(m)
    print(f"report: {out / 'summary.md'}", flush=True)
    return m


# ----------------------------------------------------------------------------- flags

def parse_arrivals(text: str, generations: int) -> dict[str, int]:
    """`cat:2,horse:4` as {class: generation}, each a later generation of the run."""
    arrivals = {}
    for item in filter(None, text.split(",")):
        cls, _, gen = item.partition(":")
        if cls not in ANIMALS or not gen.isdigit() or not 2 <= int(gen) <= generations:
            raise SystemExit(f"--arrivals: {item!r} is not CLASS:GENERATION with a class of "
                             f"{', '.join(ANIMALS)} and a generation in 2..{generations}")
        arrivals[cls] = int(gen)
    if len(ANIMALS) - len(arrivals) < 2:
        raise SystemExit("--arrivals leaves fewer than two classes for generation 1")
    return arrivals


def parse_chains(text: str, schedule: str) -> list[Chain]:
    """`copy,dash:rewarm` as chains; an entry without a schedule takes `schedule`."""
    chains = []
    for item in filter(None, text.split(",")):
        method, _, sched = item.partition(":")
        chain = Chain(method, sched or schedule)
        if method not in WARM_METHODS or chain.schedule not in WARM_SCHEDULES:
            raise SystemExit(f"--methods: {item!r}: a method of {', '.join(WARM_METHODS)}, "
                             f"optionally :{'|'.join(WARM_SCHEDULES)}")
        if chain in chains:
            raise SystemExit(f"--methods names {chain.label} twice")
        chains.append(chain)
    if not chains:
        raise SystemExit("--methods names no warm method")
    return chains


def parse_growth(text: str, generations: int) -> list[float]:
    """One growth rate for every generation after the first, or one each."""
    rates = [float(v) for v in str(text).split(",")]
    rates = rates * (generations - 1) if len(rates) == 1 else rates
    if len(rates) != generations - 1 or any(r < 0 for r in rates):
        raise SystemExit(f"--growth needs one rate or {generations - 1} (one per generation "
                         f"after the first), none negative; got {text!r}")
    return rates


def _flags(ap: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    ap.add_argument("--generations", type=int, default=d["generations"])
    ap.add_argument("--arrivals", default=d["arrivals"],
                    help="CLASS:GENERATION,... classes missing from generation 1 and when they "
                         "arrive")
    ap.add_argument("--initial", type=int, default=d["initial"],
                    help="images per class at generation 1")
    ap.add_argument("--growth", default=d["growth"],
                    help="share added to each class present, per generation (one or a list)")
    ap.add_argument("--new-class", type=int, default=d["new_class"],
                    help="images of a class when it arrives")
    ap.add_argument("--methods", default=d["methods"],
                    help="warm chains: METHOD[:SCHEDULE],... (methods: "
                         f"{', '.join(WARM_METHODS)})")
    ap.add_argument("--warm-schedule", default=d["warm_schedule"], choices=WARM_SCHEDULES,
                    help="the schedule of a chain that names none")
    ap.add_argument("--seeds", default=d["seeds"], help="comma-separated; each a replicate")
    ap.add_argument("--epochs", type=int, default=d["epochs"],
                    help="budget of every run (default: the recipe's)")
    ap.add_argument("--arch", default=d["arch"], help="timm architecture")
    ap.add_argument("--size", type=int, default=d["size"], help="input size in pixels")
    ap.add_argument("--batch-size", type=int, default=d["batch_size"])
    ap.add_argument("--lr", type=float, default=d["lr"], help="default: TrainConfig's")
    ap.add_argument("--lr-warm", type=float, default=d["lr_warm"], help="default: TrainConfig's")
    ap.add_argument("--inbox-per-class", type=int, default=d["inbox_per_class"],
                    help="other cifar10/train images per class (10 classes) in the inbox")
    ap.add_argument("--test-per-class", type=int, default=d["test_per_class"],
                    help="cifar10/test images per animal class (0 = all 1000)")
    ap.add_argument("--threshold", type=float, default=d["threshold"],
                    help="look-alike candidates: confidence below this")
    ap.add_argument("--tta", default=d["tta"], choices=("none", "last", "all"),
                    help="test figures with TTA too: at no, the last or every generation")
    ap.add_argument("--workers", type=int, default=None,
                    help="data-loading processes for training and bulkid (default: theirs)")
    ap.add_argument("--embedder", default="",
                    help="a pretrained EMBEDDER whose knn junk score is measured beside the "
                         "model's on the inbox (e.g. the file bench/lite0_weights.py writes)")
    ap.add_argument("--data", default=str(DATA), help="the cifar10 folder (train/ and test/)")
    ap.add_argument("--out", default=str(REPO / "reports" / "replicate"))
    ap.add_argument("--run", default=None, help="report folder name (default: a timestamp)")
    ap.add_argument("--workspace", default=None, help="default: <out>/<run>/workspace")
    ap.add_argument("--quick", action="store_true", help="tiny smoke settings")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; --quick swaps in tiny smoke-test settings."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _flags(ap)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    if args.quick:
        for k, v in QUICK.items():
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
    # only the default run writes bench/results/replicate.json
    args.default_run = given <= SESSION_FLAGS
    if args.generations < 2:
        raise SystemExit("--generations must be at least 2")
    args.arrivals = parse_arrivals(args.arrivals, args.generations)
    if not args.arrivals:
        raise SystemExit("--arrivals names no class: the inbox part needs one arriving class")
    args.growth = parse_growth(args.growth, args.generations)
    args.chains = parse_chains(args.methods, args.warm_schedule)
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    if min(args.initial, args.new_class) < 1 or len(set(args.seeds)) != len(args.seeds):
        raise SystemExit("--initial and --new-class must be positive, --seeds distinct")
    args.min_images = min(40, args.initial, args.new_class)  # every class takes part
    args.run = args.run or time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except ZoolibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, g in report["goals"].items():
        print(f"{'MET ' if g['met'] else 'MISS'} {name}: {g['value']} (goal {g['goal']}; "
              f"{g['what']})")
    print(json.dumps(report["seconds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
