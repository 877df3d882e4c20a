"""Nearest neighbours in a generation's embedding space: how far an image is from the library.

The out-of-distribution score of Sun et al. 2022 ("Out-of-distribution detection
with deep nearest neighbors"): L2-normalise the pre-logit features, and score an
image by its distance to the k-th nearest embedding of the generation's own
training images. An image unlike anything the model was trained on (junk, a new
species) sits far from all of them, even where the softmax happens to be peaked;
the paper's k = 50 for CIFAR-sized training sets (it is robust to k).

The reference set is the generation's train split (`models/<gen>/splits.parquet`,
written by training), embedded once and cached beside the generation as
`train_embeddings.npy` (float16; a derived file, rebuilt when missing). The search
is exact: one matrix product per batch on the model's device. An approximate
index (faiss) would pay off only for libraries of about a million images.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from . import inference, library, models, splits
from .images import load_rgb
from .workspace import Workspace, write_atomic

K = 50
CACHE = "train_embeddings.npy"


def train_rows(ws: Workspace, generation: str, classes: list[str]) -> pd.DataFrame:
    """The generation's training images that are still in the library (path, label).

    Read from its splits.parquet, found by content hash (a file may have moved); for
    a generation saved before splits were kept, the train split of today's library.
    """
    manifest = library.scan(ws, progress=False)
    ok = manifest[manifest["readable"]].drop_duplicates("hash")
    saved = models.read_splits(ws, generation)
    if saved is None:
        current = splits.split_manifest(ws, manifest, classes)
        return current[current["split"] == "train"][["path", "label"]].reset_index(drop=True)
    train = saved[saved["split"] == "train"][["hash", "label"]]
    return train.merge(ok[["hash", "path"]], on="hash")[["path", "label"]]


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (float32)."""
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def reference(ws: Workspace, loaded: inference.Loaded, batch_size: int = 256) -> torch.Tensor:
    """Unit-length embeddings of the generation's training images, on the model's device.

    Computed once per generation (decoding and a forward pass per image) and cached.
    """
    path = ws.models / loaded.name / CACHE
    if path.exists():
        emb = torch.from_numpy(np.load(path).astype(np.float32))
    else:
        rows = train_rows(ws, loaded.name, loaded.classes)
        parts = [inference.forward(loaded, torch.stack(
            [inference.to_tensor(load_rgb(ws.library / p), loaded.info)
             for p in rows["path"].iloc[i:i + batch_size]]))[1]
            for i in range(0, len(rows), batch_size)]
        emb = unit(torch.cat(parts)) if parts else torch.zeros((0, loaded.model.num_features))
        emb = emb.half().float()  # the cached precision, so a rerun scores the same
        write_atomic(path, _npy_bytes(emb.half().numpy()))
    return emb.to(loaded.device)


def kth_distance(ref: torch.Tensor, feats: torch.Tensor, k: int = K) -> torch.Tensor:
    """Distance (1 - cosine similarity) from each feature row to its k-th nearest reference.

    Args:
        ref: unit-length reference embeddings (N, D); k is clipped to N.
        feats: pre-logit features (n, D), any scale.

    Returns:
        (n,) float32, in [0, 2]; NaN everywhere when the reference is empty.
    """
    if len(ref) == 0:
        return torch.full((len(feats),), float("nan"), device=feats.device)
    sims = unit(feats) @ ref.T
    kth = sims.topk(min(k, len(ref)), dim=1).values[:, -1]
    return 1.0 - kth


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()
