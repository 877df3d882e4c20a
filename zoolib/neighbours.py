"""Nearest neighbours in a generation's feature space: how far an image is from the library.

The out-of-distribution score of Sun et al. 2022 ("Out-of-distribution detection
with deep nearest neighbors"): L2-normalise an image's features and score it by
the distance to the k-th nearest of the generation's own training images. An
image unlike anything the model was trained on (junk, a new species) sits far
from all of them, even where the softmax happens to be peaked.

Which features: those of the stage before the last (timm's
`forward_intermediates`), its map pooled to channel means and maxima. The paper
uses the penultimate layer; measured on a tuning inbox of CIFAR-10 images
disjoint from the replication's library and inbox (animals against vehicles,
generation 1 of bench/replicate.py, 5,000 images), the penultimate features gave
a ROC AUC of 0.74 (max-softmax 0.74, energy 0.72), the stage before them 0.82,
and no streaming mix of the two beat that stage alone (the mean of their
distances scaled by the training images' own: 0.76 and 0.81). A classifier
trained on a few classes keeps little in its last stage that is not about those
classes; the stage before still describes what is in the picture. k = 10 (the
tuning inbox preferred it slightly to the paper's 50).

The reference set is the generation's train split (`models/<gen>/splits.parquet`,
written by training), embedded once and cached beside the generation as
`train_neighbours.npy` (float16; a derived file, rebuilt when missing). The search is
exact: one matrix product per batch on the model's device; an approximate index
(faiss) would pay off only for libraries of about a million images.
"""
from __future__ import annotations

import io
import numpy as np
import pandas as pd
import torch

from . import inference, library, splits
from .heads import STAGE, features, pooled, unit  # noqa: F401 - the score's features
from .workspace import Workspace, write_atomic

K = 10
CACHE = "train_neighbours.npy"


def train_rows(ws: Workspace, generation: str, classes: list[str]) -> pd.DataFrame:
    """The generation's training images still in the library (path, label, hash), found as
    evaluation finds its test rows (`splits.generation_rows`)."""
    manifest = library.scan(ws, progress=False)
    rows = splits.generation_rows(ws, generation, manifest, classes, "train")
    return rows[["path", "label", "hash"]]


# Rows per matrix product in kth_distance, the last block padded with zeros: one shape
# whatever the batch. BLAS splits the sum of a product of a few rows across threads,
# so a last batch of 6 rounded differently with 2 threads than inside a batch of 64,
# and a run's scores depended on its batch boundaries (the Ray engine's differ).
BLOCK = 32


def kth_distance(ref: torch.Tensor, feats: torch.Tensor, k: int = K) -> torch.Tensor:
    """Distance (1 - cosine similarity) from each row to its k-th nearest reference row.

    Args:
        ref: unit-length reference rows (N, D); k is clipped to N.
        feats: rows (n, D), any scale.

    Returns:
        (n,) float32, in [0, 2]; NaN everywhere when the reference is empty.
    """
    if len(ref) == 0:
        return torch.full((len(feats),), float("nan"), device=feats.device)
    rows = unit(feats)
    n = len(rows)
    if n == 0:
        return rows.new_zeros(0)
    rows = torch.cat([rows, rows.new_zeros(-n % BLOCK, rows.shape[1])])
    kth = [(block @ ref.T).topk(min(k, len(ref)), dim=1).values[:, -1]
           for block in rows.split(BLOCK)]
    return (1.0 - torch.cat(kth))[:n]


def reference(ws: Workspace, loaded: inference.Loaded, batch_size: int = 256) -> torch.Tensor:
    """Pooled STAGE rows of the generation's training images, on the model's device.

    Computed once per generation (decoding and a forward pass per image) and cached.
    """
    path = ws.models / loaded.name / CACHE
    if path.exists():
        ref = torch.from_numpy(np.load(path).astype(np.float32))
    else:
        ref = _embed(ws, loaded, batch_size).half().float()  # cached precision: reruns agree
        buf = io.BytesIO()
        np.save(buf, ref.half().numpy())
        write_atomic(path, buf.getvalue())
    return ref.to(loaded.device)


def _embed(ws: Workspace, loaded: inference.Loaded, batch_size: int) -> torch.Tensor:
    rows = train_rows(ws, loaded.name, loaded.classes)
    if rows.empty:
        return torch.zeros((0, 1))
    return torch.from_numpy(inference.library_outputs(
        ws, loaded, rows["path"], batch_size, stage=True, tta=False, keys=("stage",))["stage"])
