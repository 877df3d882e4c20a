"""Reading image files the same way everywhere: scan, training and inference."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


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
        readable and error (empty string when readable).
    """
    import io

    info = {"width": 0, "height": 0, "mode": "", "format": "", "orientation": 1,
            "readable": False, "error": ""}
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
                img.load()  # a full decode catches truncated files
        info["readable"] = True
    except Exception as exc:  # noqa: BLE001 - any decoder failure is reported, not raised
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


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
