"""int8 against float ONNX on a generation's own test split: accuracy and speed.

The export gate of `runtime="onnx-int8"` (zoolib.onnx_export.INT8_MAX_DROP)
measured on a workspace of your choice, with the forward speed of both graphs
on one batch of its test images, side by side in one run.

    .venv/bin/python -m pip install -e '.[onnx]'
    .venv/bin/python bench/int8_accuracy.py build/demo-workspace --generation last
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from zoolib import inference, library, models, onnx_export, splits
from zoolib.workspace import open_workspace


def images_per_second(graph: onnx_export.OnnxModel, x: torch.Tensor, rounds: int = 5) -> float:
    """Best of `rounds` forward passes of the batch."""
    graph.run(x, ("probs",))  # warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        graph.run(x, ("probs",))
        best = min(best, time.perf_counter() - start)
    return len(x) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspace")
    ap.add_argument("--generation", default="last")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    ws = open_workspace(args.workspace)
    name = models.resolve_generation(ws, args.generation, include_throwaway=True)
    loaded = inference.load(ws, name, runtime="onnx")
    info = loaded.info
    with tempfile.TemporaryDirectory(prefix="zoolib-int8-") as tmp:
        int8 = Path(tmp) / onnx_export.INT8_FILE  # the gate's steps, outside the workspace
        onnx_export.quantise(loaded.onnx.path, int8, name)
        full, q, n = onnx_export.int8_accuracies(ws, name, info, loaded.onnx.path, int8)
        rows = splits.test_rows(ws, name, library.scan(ws, progress=False), info["classes"])
        x = torch.stack([inference.file_tensor(ws.library / p, info)
                         for p in rows["path"][:args.batch_size]])
        speed = {"float": images_per_second(loaded.onnx, x),
                 "int8": images_per_second(onnx_export.OnnxModel(int8), x)}
    kept = 100 * (full - q) < onnx_export.INT8_MAX_DROP
    print(json.dumps({"generation": name, "arch": info["arch"], "img_size": info["img_size"],
                      "test_images": n, "accuracy_float": round(full, 4),
                      "accuracy_int8": round(q, 4), "drop_points": round(100 * (full - q), 2),
                      "kept_by_gate": kept, "images_per_s": {k: round(v, 1) for k, v in
                                                             speed.items()},
                      "int8_speedup": round(speed["int8"] / speed["float"], 2)}, indent=2))


if __name__ == "__main__":
    main()
