"""Training augmentation: fastai's batch transforms plus whole-pixel translation.

fastai's `aug_transforms` has the practitioner's flip, slight rotation and slight
zoom (and warp and lighting); it has no plain translation, which small-image
recipes rely on (airbench: 2 px at 32 px). `Translate` adds it as one more affine
transform, so fastai merges it with the others into a single resampling of the
batch. Shifts are whole pixels: with no rotation or zoom drawn for an image, the
resampling lands on pixel centres and the image stays sharp. Every transform here
runs on training batches only; validation batches are left as inference sees them.
"""
from __future__ import annotations

import hashlib
from functools import partial

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.vision.augment import AffineCoordTfm, PadMode, affine_mat, aug_transforms


def translate_mat(x: torch.Tensor, max_pixels: int, size: int) -> torch.Tensor:
    """Affine matrices shifting each image by whole pixels, up to `max_pixels` each way.

    Args:
        x: the batch (only its length and device are used).
        max_pixels: largest shift in pixels, along each axis independently.
        size: the images' side in pixels.

    Returns:
        A (batch, 3, 3) tensor in fastai's coordinates, where -1..1 spans the centres
        of the edge pixels (align_corners), so one pixel is 2 / (size - 1).
    """
    n = x.size(0)
    shift = torch.randint(-max_pixels, max_pixels + 1, (2, n), device=x.device).to(x.dtype)
    tx, ty = shift * (2.0 / max(size - 1, 1))
    one, zero = torch.ones_like(tx), torch.zeros_like(tx)
    return affine_mat(one, zero, tx, zero, one, ty)


class Translate(AffineCoordTfm):
    """Random whole-pixel translation of every training image (reflection padding)."""

    def __init__(self, max_pixels: int, size: int, pad_mode=PadMode.Reflection):
        super().__init__(aff_fs=partial(translate_mat, max_pixels=max_pixels, size=size),
                         pad_mode=pad_mode, align_corners=True)


def batch_augmentation(cfg) -> list:
    """The batch transforms of a (resolved) TrainConfig: fastai's `aug_transforms` plus
    `Translate`. Random flips only for FLIP="random": an alternating flip happens as
    items load (`AlternatingFlip`)."""
    cfg = cfg.resolved()
    pixels = round(cfg.max_shift * cfg.img_size)
    extra = [Translate(pixels, cfg.img_size)] if pixels else []
    return aug_transforms(do_flip=cfg.flip == "random", flip_vert=False, max_rotate=cfg.max_rotate,
                          min_zoom=1.0, max_zoom=cfg.max_zoom, max_warp=cfg.max_warp,
                          max_lighting=cfg.max_lighting,
                          p_lighting=0.75 if cfg.max_lighting else 0.0, xtra_tfms=extra)


class AlternatingFlip:
    """airbench's alternating flip: each training image mirrored on every other epoch.

    A random flip leaves an image unmirrored in two epochs running a quarter of
    the time; here each image is seen once each way in every two consecutive
    epochs, which airbench measured worth about 10% fewer epochs. Which of the two
    comes first is a fixed coin per image, drawn from its content hash and the
    seed (so a resumed run flips as the interrupted one would have). The item
    loader calls it on training images only: validation and inference images are
    never flipped. `FlipEpoch` tells it the epoch.

    Args:
        seed: the run's seed.
    """

    def __init__(self, seed: int = 0):
        self.seed, self.epoch = int(seed), 0

    def coin(self, key: str) -> bool:
        """Whether the image with content hash `key` is mirrored in even epochs."""
        digest = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=1).digest()
        return bool(digest[0] & 1)

    def flipped(self, key: str) -> bool:
        """Whether the image with content hash `key` is mirrored this epoch."""
        return self.coin(key) ^ bool(self.epoch & 1)

    def __call__(self, pixels: np.ndarray, key: str) -> np.ndarray:
        """The (H, W, C) pixels, mirrored left-right when `flipped(key)`."""
        return np.ascontiguousarray(pixels[:, ::-1]) if self.flipped(key) else pixels


class FlipEpoch(Callback):
    """Tell an `AlternatingFlip` which epoch is starting."""

    def __init__(self, flip: AlternatingFlip):
        self.flip = flip

    def before_epoch(self):
        self.flip.epoch = self.epoch
