"""Reading image files the same way everywhere: scan, training and inference."""
from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_GRID = 32  # the perceptual hash looks at a 32x32 greyscale thumbnail
# The 8 lowest-frequency rows of the (unnormalised) DCT-II on 32 samples: the hash
# needs only the 8x8 low-frequency block, so two small products replace a full DCT.
_DCT_LOW = np.cos(np.pi * np.outer(np.arange(8), 2 * np.arange(_GRID) + 1) / (2 * _GRID))


def content_hash(data: bytes) -> str:
    """A short, stable hash of a file's bytes (hex).

    blake2b is faster than sha256 in CPython and 128 bits is plenty to tell
    images apart; splits and duplicates are keyed on it.
    """
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def is_candidate(path: Path) -> bool:
    """Whether a file in an image folder should be looked at (not hidden)."""
    return path.is_file() and not path.name.startswith(".")


def probe(data: bytes) -> dict:
    """Decode an image fully and describe it; never raises for a bad file.

    Args:
        data: the file's bytes.

    Returns:
        A dict with width, height, mode, format, orientation (EXIF tag, 1 if none),
        phash (perceptual hash of the upright image, see `perceptual_hash`; empty
        when unreadable), readable and error (empty string when readable).
    """
    import io

    info = {"width": 0, "height": 0, "mode": "", "format": "", "orientation": 1,
            "phash": "", "readable": False, "error": ""}
    if not data:
        info["error"] = "empty file (0 bytes)"
        return info
    try:
        with warnings.catch_warnings():
            # Pillow warns before it raises on oversized images; we want the error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                info.update(width=img.width, height=img.height, mode=img.mode,
                            format=img.format or "")
                info["orientation"] = int(img.getexif().get(0x0112, 1) or 1)
                # JPEG: decode straight to small greyscale (DCT scaling); every
                # coefficient is still entropy-decoded, so truncation is caught.
                img.draft("L", (2 * _GRID, 2 * _GRID))
                img.load()
                info["readable"] = True
                info["phash"] = _phash_or_empty(img, info["orientation"])
    except Exception as exc:  # noqa: BLE001 - any decoder failure is reported, not raised
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def _phash_or_empty(img: Image.Image, orientation: int) -> str:
    """The hash of a decoded image, or "" for an exotic mode: never marks it unreadable."""
    try:
        return perceptual_hash(img, orientation)
    except Exception:  # noqa: BLE001 - a missing hash only hides it from near-duplicate search
        return ""


def perceptual_hash(img: Image.Image, orientation: int | None = None) -> str:
    """The 64-bit DCT perceptual hash of an image, as 16 hex digits.

    The pHash of imagehash.phash (8x8 low-frequency DCT block of a 32x32
    greyscale thumbnail, thresholded at its median; same bit order and hex), on
    the upright image (EXIF orientation applied). Resizing, re-encoding,
    brightness changes and slight crops move few bits; `curate` compares hashes
    by Hamming distance.

    Args:
        img: a PIL image (for speed, JPEGs may be opened in draft mode).
        orientation: its EXIF orientation tag when already known (read if None).
    """
    if orientation is None:
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    thumb = img.convert("L").resize((_GRID, _GRID), Image.BILINEAR)
    low = _DCT_LOW @ np.asarray(thumb, dtype=np.float64) @ _DCT_LOW.T
    return np.packbits(low.ravel() > np.median(low)).tobytes().hex()


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as upright RGB: EXIF orientation applied, alpha dropped.

    Args:
        path: the image file.

    Returns:
        A decoded RGB PIL image.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit greyscale: scale to 8 bits instead of clipping.
            img = img.point(lambda v: v / 256).convert("L")
        return img.convert("RGB")


def squished_pixels(data: bytes, size: int) -> np.ndarray:
    """A file's bytes -> upright RGB pixels squish-resized to `size`, as uint8 HWC.

    Exactly ``np.asarray(load_rgb(file).resize((size, size), BILINEAR))``, the
    pixels training and inference see. A plain JPEG (complete, RGB or greyscale,
    no EXIF block, so no orientation to apply) is decoded by torchvision's
    libjpeg-turbo call instead of Pillow's, which gives the same pixels in about
    half the time (tests check the equality); anything else goes through Pillow.
    Pillow still reads the header first, so a decompression bomb is refused
    before any decoding.

    Raises:
        Image.DecompressionBombError: more than twice Pillow's MAX_IMAGE_PIXELS;
            between once and twice, the warning is raised as an error too.
        Exception: whatever the decoder raises for a broken or non-image file.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        if not _plain_jpeg(img, data):
            img = load_rgb(io.BytesIO(data))
            return np.array(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)
    import torch  # here: scanning and curation never need torch
    from torchvision.io import ImageReadMode, decode_jpeg

    hwc = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                      mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()
    if hwc.shape[:2] == (size, size):
        return np.ascontiguousarray(hwc)
    return np.array(Image.fromarray(hwc).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def _plain_jpeg(img: Image.Image, data: bytes) -> bool:
    """Whether `img` is a JPEG that torchvision decodes exactly as Pillow does: RGB or
    greyscale (not CMYK), no EXIF (so upright), ending in its end-of-image marker
    (a truncated file goes to Pillow, which refuses it)."""
    return (img.format == "JPEG" and img.mode in ("RGB", "L") and "exif" not in img.info
            and data.rstrip(b"\0").endswith(b"\xff\xd9"))
