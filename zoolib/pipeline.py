"""Running notebooks with papermill and collecting what they report.

Every notebook takes a `REPORT_DIR` parameter and writes its figures and a
`metrics.json` there; `run_notebook` executes one into that folder and returns
its metrics, so pipelines (the demo, sweeps) chain notebooks in batch.

The demo job (`make demo`) is `python -m zoolib.pipeline demo --workspace W --reports R`.
This module calls `demo`; `demo` never imports this one.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import demo
from .workspace import write_atomic

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def report_dir(path: str | Path) -> Path:
    """Create (if needed) and return a notebook's report folder."""
    out = Path(path).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_metrics(folder: str | Path, metrics: dict) -> Path:
    """Write `metrics.json` into a report folder (atomically) and return its path."""
    path = report_dir(folder) / "metrics.json"
    write_atomic(path, json.dumps(metrics, indent=2, default=str))
    return path


def read_metrics(folder: str | Path) -> dict:
    """The `metrics.json` of a report folder."""
    return json.loads((Path(folder) / "metrics.json").read_text())


def run_notebook(notebook: str, out_dir: str | Path, parameters: dict | None = None,
                 notebooks: Path = NOTEBOOKS) -> dict:
    """Execute a notebook with papermill into `out_dir` and return its metrics.

    Args:
        notebook: notebook name without suffix, e.g. "02_train".
        out_dir: report folder; receives the executed notebook, figures, metrics.json.
        parameters: values for the notebook's `parameters` cell.
        notebooks: folder holding the notebooks.

    Returns:
        The notebook's metrics.json content.
    """
    import papermill as pm

    out = report_dir(out_dir)
    source = notebooks / f"{notebook}.ipynb"
    if not source.exists():
        raise FileNotFoundError(f"no notebook {source}")
    params = {**(parameters or {}), "REPORT_DIR": str(out)}
    pm.execute_notebook(str(source), str(out / source.name), parameters=params,
                        cwd=str(notebooks), progress_bar=False)
    return read_metrics(out)


def run_demo(workspace: str | Path, reports: str | Path) -> dict:
    """The main job on the demo workspace; returns a summary (also written to
    `<reports>/metrics.json` and `summary.md`).

    The story: generation 1 from scratch, evaluated and deployed; a throw-away
    generation (cutoff 35) and its bulk identification, which surfaces inbox images
    of the class just under 40; a class labelled into the library; generation 2
    warm-started from 1 and compared with it; bulk identification of the inbox;
    the library cleaned with out-of-fold predictions (label issues, overlapping
    classes, the embedding map of library and inbox); real traffic through the
    Predictor; the usage and accuracy report.
    """
    started = time.perf_counter()
    ws = demo.build(workspace)
    reports = report_dir(reports)
    summary: dict = {}

    def step(name: str, notebook: str, **params) -> dict:
        t0 = time.perf_counter()
        print(f"running {notebook} -> {reports / name}")
        summary[name] = run_notebook(notebook, reports / name, {"WORKSPACE": str(ws.root), **params})
        print(f"  done in {time.perf_counter() - t0:.0f} s")
        return summary[name]

    step("01_curate-gen1", "01_curate")
    step("02_train-gen1", "02_train", INIT_FROM="scratch")
    step("03_evaluate-gen1", "03_evaluate", PROMOTE=True)
    throwaway = step("02_train-throwaway", "02_train", INIT_FROM="last", MIN_IMAGES=35,
                     THROWAWAY=True)
    step("04_bulk_identify-throwaway", "04_bulk_identify", GENERATION=throwaway["generation"],
         LOOKALIKE_CLASS=demo.LOOKALIKE_OF)
    demo.add_class(ws)
    print(f"added class {demo.ADDED_CLASS!r} to the library")
    step("01_curate-gen2", "01_curate")
    step("02_train-gen2", "02_train", INIT_FROM="last")
    step("03_evaluate-gen2", "03_evaluate", PROMOTE=True)
    step("04_bulk_identify-gen2", "04_bulk_identify",
         GENERATION=summary["02_train-gen2"]["generation"], LOOKALIKE_CLASS=demo.LOOKALIKE_OF)
    step("06_clean-gen2", "06_clean", GENERATION=summary["02_train-gen2"]["generation"],
         BULKID_RUN=summary["04_bulk_identify-gen2"]["run"])
    labels = json.loads((ws.root / "demo_truth.json").read_text())["inbox"]
    summary["traffic"] = demo.simulate_traffic(ws, labels)
    print(f"served demo traffic through the Predictor: {summary['traffic']}")
    step("05_report", "05_report")
    summary["seconds"] = round(time.perf_counter() - started, 1)
    write_metrics(reports, summary)
    write_atomic(reports / "summary.md", _demo_markdown(summary))
    print((reports / "summary.md").read_text())
    return summary


def _demo_markdown(summary: dict) -> str:
    lines = ["# Demo run", "",
             "| generation | init | parent | classes | plateau epoch | epochs | valid acc "
             "| test acc | benchmark acc | promoted |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k in ("1", "2"):
        g, e = summary[f"02_train-gen{k}"], summary.get(f"03_evaluate-gen{k}", {})
        promoted = e.get("decision", {}).get("promoted")
        lines.append(
            f"| {g['generation']} | {g['init']} | {g['parent'] or '-'} | {g['n_classes']} | "
            f"{g['plateau_epoch']} | {g['epochs_run']} | {g['valid_accuracy']:.3f} | "
            f"{e.get('test_accuracy', float('nan')):.3f} | "
            f"{e.get('benchmark_accuracy', float('nan')):.3f} | {promoted} |")
    for k in ("1", "2"):
        reasons = summary.get(f"03_evaluate-gen{k}", {}).get("decision", {}).get("reasons", [])
        if reasons:
            lines.append(f"\nGeneration {k} promotion decision: " + "; ".join(map(str, reasons)))
    t, b = summary.get("02_train-throwaway"), summary.get("04_bulk_identify-throwaway")
    if t and b:
        lines.append(f"\nThrow-away {t['generation']} (MIN_IMAGES 35, never promoted) trains "
                     f"{', '.join(t['classes_added'] or []) or 'the same classes'}; bulk "
                     f"identification predicts rare classes: {b['rare_classes']}")
    if "traffic" in summary:
        lines.append(f"\nServed traffic: {summary['traffic']}")
    lines.append(f"\nWhole run: {summary['seconds']} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m zoolib.pipeline demo [--workspace W] [--reports R]`.

    `demo` builds the demo workspace at W (replacing it) and runs the main job
    on it, with the reports in R; `make demo` runs it with the defaults.
    """
    parser = argparse.ArgumentParser(description="Run notebook pipelines in batch.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="build the demo workspace and run the notebooks on it")
    d.add_argument("--workspace", default="build/demo-workspace",
                   help="where to build the demo workspace (an existing one is replaced)")
    d.add_argument("--reports", default="reports/demo", help="report folder of the run")
    args = parser.parse_args(argv)
    run_demo(args.workspace, args.reports)


if __name__ == "__main__":
    main()
