"""Inference with a generation's own preprocessing (no fastai), in one of two runtimes.

Bulk identification and serving use this module: it starts fast, and it applies
exactly what `model.json` records (input size, squish resize, bilinear
interpolation and normalisation) to upright RGB images, as training did.

Runtimes (RUNTIMES), chosen when a generation is loaded:

- "torch": the timm model in PyTorch, on the CPU or a GPU.
- "onnx": the same computation (`Heads`) exported once to
  `models/<gen>/model.onnx` and run by ONNX Runtime on the CPU (see
  `zoolib.onnx_export`); needs the `onnx` extra (`pip install -e '.[onnx]'`).
- "onnx-int8": that graph with dynamically quantised int8 weights
  (`model.int8.onnx`), kept only if it loses less than 0.5 accuracy points on
  the generation's test split (`onnx_export.INT8_MAX_DROP`).

Bulk identification and serving take `default_runtime()` when given no runtime:
"onnx" where its extra is installed, else "torch", and torch on a GPU (ONNX
Runtime runs here on the CPU only). Every other caller of `load` (evaluation,
cleaning, curation) gets torch unless it asks.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm
import torch.nn.functional as F

from .heads import Heads
from .preprocess import file_batches, file_tensor, to_tensor  # noqa: F401 - public calls
from .models import load_generation, resolve_generation
from .workspace import Workspace, ZoolibError

if TYPE_CHECKING:  # onnx_export is imported only when an ONNX runtime is asked for
    from .onnx_export import OnnxModel

RUNTIMES = ("torch", "onnx", "onnx-int8")


@dataclass
class Loaded:
    """A generation ready for inference.

    Attributes:
        name: the generation.
        model: its torch model (kept with every runtime: the knn reference and
            the ONNX export are computed with it).
        info: its model.json.
        device: where inputs go (the CPU for the ONNX runtimes).
        runtime: one of RUNTIMES.
        onnx: the exported graph and its sessions (ONNX runtimes only).
        tta: `outputs` averages the multi-crop views (`tta_views`).
    """

    name: str
    model: torch.nn.Module
    info: dict
    device: torch.device
    runtime: str = "torch"
    onnx: OnnxModel | None = None
    tta: bool = False

    @property
    def classes(self) -> list[str]:
        return self.info["classes"]


def default_runtime() -> str:
    """The CPU runtime of bulk identification and serving when none is given.

    ONNX Runtime where the `onnx` extra is installed: measured end to end on 2
    cores (bench/bulkid_throughput.py, resnet18), 1.24x the torch runtime on
    CIFAR files at 32 px, 1.15x on photos at 224 px, 1.10x and 0.98x on camera
    photos at 224 and 299 px (where decoding is most of the work), with
    probabilities within 1e-4 (checked at export). Without the extra, torch.
    """
    from . import onnx_export

    try:
        onnx_export.require()  # the one check of the extra's packages
    except ZoolibError:
        return "torch"
    return "onnx"


def resolve_runtime(runtime: str | None, device: str | None = None) -> str:
    """The runtime to use: `runtime`, or `default_runtime()` when None (torch on a GPU).

    Raises:
        ZoolibError: an unknown runtime (the known ones are listed).
    """
    if runtime is None:
        on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu"
        return "torch" if on_gpu else default_runtime()
    if runtime not in RUNTIMES:
        raise ZoolibError(f"runtime must be one of {', '.join(map(repr, RUNTIMES))}, "
                          f"not {runtime!r}")
    return runtime


def load(ws: Workspace, name: str = "last", device: str | None = None,
         runtime: str | None = "torch", tta: bool = False) -> Loaded:
    """Load a generation (a name, or "last") for inference.

    Args:
        ws: the workspace.
        name: a generation name, or "last" (throw-away runs included).
        device: torch device ("cpu", "cuda"); auto by default (the CPU for ONNX).
        runtime: one of RUNTIMES; an ONNX one exports the generation on first use
            (see `zoolib.onnx_export`) and runs on the CPU. None: `default_runtime()`,
            falling back to torch with a warning when the export fails (an
            architecture ONNX cannot express must not stop a default run).

    Raises:
        ZoolibError: unknown generation or runtime; an ONNX runtime on a GPU
            device, without its packages installed, or whose export fails its
            parity check.

    `tta`: every pass of the loaded generation averages the multi-crop views
    (`outputs`).
    """
    chosen, runtime = runtime is None, resolve_runtime(runtime, device)
    if runtime != "torch":
        if device not in (None, "cpu"):
            raise ZoolibError(f"runtime={runtime!r} runs on the CPU only, not device="
                              f"{device!r}: use runtime='torch' on a GPU")
        from . import onnx_export

        onnx_export.require()  # before the model loads: a missing package fails fast
        device = "cpu"
    name = resolve_generation(ws, name, include_throwaway=True)
    model, info = load_generation(ws, name)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = Loaded(name, model.to(dev).eval(), info, dev, runtime, tta=bool(tta))
    if runtime != "torch":
        try:
            loaded.onnx = onnx_export.open_model(ws, name, loaded.model, info,
                                                 int8=runtime == "onnx-int8")
        except ZoolibError as exc:
            if not chosen:
                raise
            warnings.warn(f"{name} runs on torch: {exc}", stacklevel=2)
            loaded.runtime = "torch"
    return loaded


# airbench's multi-crop test-time augmentation: the image and its mirror (weight 1/2
# together), and both of them shifted one pixel up-left and down-right (1/4 each pair).
TTA_VIEWS = (((0, 0), False, 0.25), ((0, 0), True, 0.25),
             ((-1, -1), False, 0.125), ((-1, -1), True, 0.125),
             ((1, 1), False, 0.125), ((1, 1), True, 0.125))
TTA_NAME = "mirror x {0, (-1,-1), (+1,+1)} px, weights 1/4 1/4 1/8 1/8 1/8 1/8, logits averaged"


def shift(batch: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The batch moved by (dy, dx) whole pixels, the edge reflected into the gap."""
    if dy == 0 and dx == 0:
        return batch
    p = max(abs(dy), abs(dx))
    h, w = batch.shape[-2:]
    padded = F.pad(batch, (p, p, p, p), mode="reflect")
    return padded[..., p - dy:p - dy + h, p - dx:p - dx + w]


def tta_views(batch: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
    """The views of `TTA_VIEWS` of a normalised NCHW batch, with their weights (sum 1)."""
    views = []
    for (dy, dx), mirror, weight in TTA_VIEWS:
        x = shift(batch, dy, dx)
        views.append((x.flip(3) if mirror else x, weight))
    return views


def _one_pass(loaded: Loaded, batch: torch.Tensor, stage: bool) -> dict[str, torch.Tensor]:
    if loaded.onnx is not None:
        names = ("probs", "logits", "embedding", "stage") if stage else (
            "probs", "logits", "embedding")
        return loaded.onnx.run(batch, names)
    x = batch.to(loaded.device, non_blocking=True)
    if x.device.type == "cpu" and x.dim() == 4:
        # oneDNN's convolutions run much faster on channels-last memory (resnet18
        # 1.5x at 224 px, inception_v4 1.6x at 299 px), for the same values up to
        # float rounding.
        x = x.contiguous(memory_format=torch.channels_last)
    values = Heads(loaded.model, stage=stage)(x)
    return dict(zip(("probs", "logits", "embedding", "stage"), values))


@torch.inference_mode()
def outputs(loaded: Loaded, batch: torch.Tensor, stage: bool = False,
            tta: bool | None = None) -> dict[str, torch.Tensor]:
    """One forward pass of a normalised NCHW batch, with the loaded runtime.

    Args:
        loaded: the generation.
        batch: normalised NCHW images.
        stage: also return the pooled stage features of the knn score.
        tta: average the `tta_views` (6 passes): logits and embeddings by the views'
            weights, probabilities the softmax of the averaged logits (airbench
            averages logits). The stage features stay those of the image itself, so
            the knn reference is the same with and without TTA. None: `loaded.tta`.

    Returns:
        {"probs", "logits", "embedding"} and, with `stage`, "stage" (the pooled
        stage features of the knn score): on the model's device for torch, on
        the CPU for ONNX.
    """
    if not (loaded.tta if tta is None else tta):
        return _one_pass(loaded, batch, stage)
    out = None
    for i, (view, weight) in enumerate(tta_views(batch)):
        one = _one_pass(loaded, view.contiguous(), stage and i == 0)
        if out is None:
            out = {k: v.float() * weight if k in ("logits", "embedding") else v
                   for k, v in one.items()}
        else:
            out["logits"] += one["logits"].float() * weight
            out["embedding"] += one["embedding"].float() * weight
    out["probs"] = out["logits"].softmax(dim=1)
    return out


@torch.inference_mode()
def forward(loaded: Loaded, batch: torch.Tensor, tta: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and pre-logit embeddings of a batch (both on CPU).

    On a CPU the torch runtime gives the model the batch in channels-last memory
    order (see `outputs`).

    Args:
        loaded: the generation.
        batch: normalised NCHW images.
        tta: multi-crop test-time augmentation (`tta_views`: the image, its mirror
            and both shifted a pixel each way), for six times the compute.
    """
    out = outputs(loaded, batch, tta=tta or loaded.tta)
    return out["probs"].float().cpu(), out["embedding"].float().cpu()


def library_outputs(ws: Workspace, loaded: Loaded, paths, batch_size: int = 64,
                    stage: bool = False, tta: bool | None = None,
                    keys: tuple[str, ...] = ("probs", "embedding"), progress: bool = False,
                    desc: str = "images") -> dict[str, np.ndarray]:
    """`outputs` of library images, batch by batch: the one loop that feeds library
    files through a generation (evaluation, the kNN reference, cleaning, curation).

    Args:
        ws: the workspace.
        loaded: the generation (`load`).
        paths: library-relative image paths, in the order of the returned rows.
        batch_size: images per forward pass.
        stage: also compute the pooled stage features ("stage" in `keys`).
        tta: as for `outputs`.
        keys: which outputs to keep ("probs", "logits", "embedding", "stage").
        progress: show a progress bar (`desc` names what it counts).

    Returns:
        {key: float32 array with one row per path}.

    Raises:
        UnreadableImageError: an image cannot be decoded (named).
    """
    paths = list(paths)
    kept: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    batches = file_batches(ws.library, paths, loaded.info, batch_size)
    for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch",
                      total=-(-len(paths) // batch_size)):
        out = outputs(loaded, batch, stage=stage, tta=tta)
        for k in keys:
            kept[k].append(out[k].float().cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for k, v in kept.items()}


def embed(ws: Workspace, generation: str, paths, batch_size: int = 64) -> np.ndarray:
    """Pre-logit embeddings of library images (`library_outputs`), one row per path."""
    loaded = load(ws, generation)
    return library_outputs(ws, loaded, paths, batch_size, keys=("embedding",))["embedding"]
