"""The curation embedding's parts of bench/pretrained.py: its speed and its junk score.

Part "speed" (goal `embed_speed`): images/s of the cached embedding pass
(`embedder.EmbeddingCache.get` on files not yet cached: decoding, the backbone and
writing the records) over the bare forward pass of the same backbone on the same
images already decoded, in one process one after the other (goal >= 0.85x); and
the second pass over the same files (every vector a cache hit) against the first
(goal >= 20x). On the 320 photos of animals10-mini, at the backbone's 224 px.

Part "junk" (goal `embedding_junk_auc`): bench/replicate.py's first generation of
seed 0 (four animal classes of cifar10/train, 340 images each, the default
recipe) and its inbox (500 unseen images of each of the ten classes; the four
vehicle classes are junk), identified twice: with the model's own scores and with
the embedder's knn score (`bulkid.run(embedder=...)`). ROC AUC at telling junk
from animals, side by side (goal for the embedder: >= 0.90).
"""
from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import torch

from zoolib import embedder as embedders
from zoolib import workspace
from zoolib.preprocess import file_tensor

SPEED_BATCH = 32


def photos(data: Path) -> list[Path]:
    """Every file under the class folders, sorted."""
    return sorted(p for p in data.rglob("*") if p.is_file())


def speed(ws: workspace.Workspace, value: str, files: list[Path]) -> dict:
    """Images/s of the bare forward, the cached pass's first and second runs."""
    e = embedders.embedder_for(value)
    digests = [hashlib.sha1(f.read_bytes()).hexdigest() for f in files]
    batches = [torch.stack([file_tensor(f, e.info) for f in files[i:i + SPEED_BATCH]])
               for i in range(0, len(files), SPEED_BATCH)]
    e.forward(batches[0])  # warm-up: oneDNN picks its kernels on the first call
    t = time.perf_counter()
    for batch in batches:
        e.forward(batch)
    bare = len(files) / (time.perf_counter() - t)
    cache = embedders.EmbeddingCache(ws, e)
    shutil.rmtree(cache.folder, ignore_errors=True)
    cache.entries()  # its width probe is a forward pass of its own, not of the images
    t = time.perf_counter()
    cache.get(files, digests, SPEED_BATCH, progress=False)
    first = len(files) / (time.perf_counter() - t)
    again = embedders.EmbeddingCache(ws, e)
    t = time.perf_counter()
    again.get(files, digests, SPEED_BATCH, progress=False)
    second = len(files) / (time.perf_counter() - t)
    return {"images": len(files), "bare_per_s": round(bare, 1),
            "cached_first_per_s": round(first, 1), "cached_second_per_s": round(second, 1),
            "first_over_bare": round(first / bare, 3), "second_over_first": round(second / first, 1),
            "recomputed_on_second": again.computed}


def junk(root: Path, value: str, data: Path, seed: int = 0) -> dict:
    """Generation 1 of bench/replicate.py and its inbox, scored by the model and the embedder."""
    import replicate
    from cifar import link_inbox
    from replicate_inbox import inbox_part

    from zoolib.train import train

    args = replicate.parse_args(["--seeds", str(seed), "--data", str(data)])
    plan = replicate.library_plan(args)
    # replicate's own sample of this seed: the same library, inbox and arriving images
    need = {c: max(p.get(c, 0) for p in plan.values()) for c in replicate.ANIMALS}
    files, inbox_files = replicate.sample_files(data, need, args.inbox_per_class, seed)
    ws = workspace.create(root)
    truth = link_inbox(ws, inbox_files, seed)
    replicate.grow_library(ws, files, plan[1])
    t = time.perf_counter()
    result = train(ws, replicate.config(args, seed, "scratch", None), progress=False)
    train_minutes = (time.perf_counter() - t) / 60
    first = min(args.arrivals, key=lambda c: (args.arrivals[c], replicate.ANIMALS.index(c)))
    out = root / "report"
    out.mkdir()
    arrive = files[first][:plan[args.arrivals[first]][first]]
    part = inbox_part(ws, result.name, truth, first, arrive, args.threshold, args.workers, out,
                      f"s{seed}", value)
    model = {r["score"]: round(r["auc"], 4) for r in part["junk_scores"]}
    return {"library": plan[1], "inbox": len(truth), "train_minutes": round(train_minutes, 1),
            "model_auc": model, "embedder_auc": round(part["embedder_junk"]["auc"], 4),
            "embedder": part["embedder_junk"]["embedder"],
            "bulkid_seconds": part["seconds"], "embedder_seconds": part["embedder_seconds"]}
