"""Reading image files the same way everywhere: scan, training and inference."""
from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    import simplejpeg
except ImportError:  # an environment without it only decodes JPEGs more slowly
    simplejpeg = None

# Pillow's resize filters by the names model.json stores (timm's data-config names)
RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR,
            "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}
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


_CHUNK = 1 << 16  # one read takes a whole small image (a 32 px JPEG is ~1-2 KB)


def read_file(path: str | os.PathLike) -> bytes:
    """A file's bytes in as few system calls as possible.

    open + read + close: `Path.read_bytes` and `open().read()` add an fstat and
    a confirming read, ~3 us per file, which is a tenth of the cost of a 32 px
    image in bulk identification. A read shorter than asked for ends the file
    (POSIX regular files read in full up to their end).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        data = os.read(fd, _CHUNK)
        if len(data) < _CHUNK:
            return data
        # A larger file: read the rest in one call sized by fstat, then to the end.
        chunks = [data, os.read(fd, max(os.fstat(fd).st_size - len(data), 0) + 1)]
        while chunks[-1]:
            chunks.append(os.read(fd, _CHUNK))
        return b"".join(chunks)
    finally:
        os.close(fd)


def is_candidate(path: Path) -> bool:
    """Whether a file in an image folder should be looked at (not hidden)."""
    return path.is_file() and not path.name.startswith(".")


def probe(data: bytes) -> dict:
    """Decode an image fully and describe it; never raises for a bad file.

    "Readable" means the bytes decode and convert to upright RGB through the same
    functions training uses (`open_image`, `to_rgb`).

    Args:
        data: the file's bytes.

    Returns:
        A dict with width, height, mode, format, orientation (EXIF tag, 1 if none),
        phash (perceptual hash of the upright image, see `perceptual_hash`; empty
        when unreadable), readable and error (empty string when readable).
    """
    info = {"width": 0, "height": 0, "mode": "", "format": "", "orientation": 1,
            "phash": "", "readable": False, "error": ""}
    if not data:
        info["error"] = "empty file (0 bytes)"
        return info
    try:
        with warnings.catch_warnings():
            # Pillow warns before it raises on oversized images; we want the error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_image(io.BytesIO(data)) as img:
                info.update(width=img.width, height=img.height, mode=img.mode,
                            format=img.format or "")
                info["orientation"] = int(img.getexif().get(0x0112, 1) or 1)
                # JPEG: decode straight to small greyscale (DCT scaling); every
                # coefficient is still entropy-decoded, so truncation is caught.
                img.draft("L", (2 * _GRID, 2 * _GRID))
                img.load()
                to_rgb(img)  # the conversion training uses: "readable" means "trainable"
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


def load_rgb(path: str | Path | io.BytesIO, draft: int | None = None) -> Image.Image:
    """Open an image as upright RGB: EXIF orientation applied, alpha dropped.

    Args:
        path: the image file (or a file-like object).
        draft: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that
            leaves both sides at least this long (Pillow's `draft`); None: full size.

    Returns:
        A decoded RGB PIL image.

    Raises:
        UnreadableImageError: not an image Pillow can read (the format named where
            it is known), or a mode with no RGB conversion (the mode named).
    """
    with open_image(path) as img:
        if draft and img.format == "JPEG":
            img.draft(img.mode if img.mode in ("CMYK", "L") else "RGB", (draft, draft))
        return to_rgb(ImageOps.exif_transpose(img))


class UnreadableImageError(ValueError):
    """A file that is not an image zoolib can decode, with a message saying what it is."""


# Leading bytes of common files Pillow cannot open, so the error says what the file is.
_SIGNATURES = (
    (b"ftypheic", 4, "a HEIC photo (iPhone): install pillow-heif or export it as JPEG"),
    (b"ftypheix", 4, "a HEIC photo: install pillow-heif or export it as JPEG"),
    (b"ftypmif1", 4, "a HEIF image: install pillow-heif or export it as JPEG"),
    (b"ftypavif", 4, "an AVIF image: install pillow-avif-plugin or export it as JPEG"),
    (b"ftypqt", 4, "a QuickTime video, not an image"),
    (b"ftypisom", 4, "an MP4 video, not an image"),
    (b"ftypmp4", 4, "an MP4 video, not an image"),
    (b"%PDF", 0, "a PDF document, not an image"),
    (b"PK\x03\x04", 0, "a ZIP archive, not an image"),
    (b"<svg", 0, "an SVG drawing (vector), not a raster image"),
    (b"<?xml", 0, "an XML file (an SVG drawing?), not a raster image"),
    (b"<!DOCTYPE html", 0, "an HTML page, not an image"),
    (b"<html", 0, "an HTML page, not an image"),
)


def what_is(data: bytes) -> str:
    """A short description of a file Pillow cannot identify, from its first bytes."""
    head = data[:64].lstrip()
    for magic, offset, text in _SIGNATURES:
        if head[offset:offset + len(magic)].lower() == magic.lower():
            return text
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file, not an image"
    return "not an image format Pillow can read"


def open_image(source: str | Path | io.BytesIO) -> Image.Image:
    """`Image.open`, with an error that says what a non-image file is (HEIC, PDF, ...).

    Raises:
        UnreadableImageError: Pillow cannot identify the file.
    """
    try:
        return Image.open(source)
    except UnidentifiedImageError:
        if isinstance(source, io.BytesIO):
            data = source.getvalue()
        else:
            with open(source, "rb") as f:
                data = f.read(64)
        raise UnreadableImageError(what_is(data)) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, the one conversion scan, training and inference share.

    16- and 32-bit greyscale (I;16, I;16B, I;16L, I) are scaled to 8 bits by
    dropping the low byte, as dividing by 256 did before (the same pixels for
    old generations), instead of clipping; every other mode goes through
    Pillow's own conversion.

    Raises:
        UnreadableImageError: a mode Pillow cannot convert to RGB (named).
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        # Pillow's point() has no I;16B form; numpy reads every byte order.
        deep = np.asarray(img).astype(np.int64) // 256
        img = Image.fromarray(np.clip(deep, 0, 255).astype(np.uint8), mode="L")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise UnreadableImageError(f"image mode {img.mode} has no RGB conversion: {exc}") from exc


def resample_filter(interpolation: str) -> int:
    """The Pillow filter of an interpolation name ("bilinear", "bicubic", ...).

    Raises:
        ValueError: a name Pillow's resize has no filter for.
    """
    if interpolation not in RESAMPLE:
        raise ValueError(f"interpolation {interpolation!r} is not one of {', '.join(RESAMPLE)}")
    return RESAMPLE[interpolation]


def squish(img: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """An image squish-resized to size x size (aspect ratio not kept), as training does."""
    return img.resize((size, size), resample_filter(interpolation))


DECODES = ("full", "reduced")  # model.json "decode": how a generation's JPEGs are decoded
# New generations from scratch decode reduced (warm starts keep their parent's mode;
# generations without the key were trained on full decodes and keep them).
DECODE = "reduced"


def dct_scale(width: int, height: int, size: int) -> int:
    """The JPEG DCT reduction (1, 2, 4 or 8) Pillow's `draft` picks for a `size` square:
    the largest that leaves both sides at least `size` pixels."""
    room = min(width // size, height // size)
    return next((f for f in (8, 4, 2) if room >= f), 1)


def squished_pixels(data: bytes, size: int, interpolation: str = "bilinear",
                    decode: str = "full") -> np.ndarray:
    """A file's bytes -> upright RGB pixels squish-resized to `size`, as uint8 HWC.

    The one decode path of training, evaluation, bulk identification and
    serving. With `decode="full"` it is exactly
    ``np.asarray(squish(load_rgb(file), size, interpolation))``. With
    `decode="reduced"` a JPEG is first decoded at the smallest DCT scale that
    leaves both sides at least `size` (libjpeg's scaled IDCT: a 12-megapixel
    photo costs a seventh of a full decode), then resized the same way; the
    mode a generation trained with is stored in its model.json, so old
    generations keep their pixels.

    A plain JPEG (see `plain_jpeg_size`) is decoded by simplejpeg (libjpeg-turbo
    with Pillow's settings: accurate IDCT, smooth chroma upsampling, the same
    DCT scale) instead of Pillow, and turned upright by the EXIF or XMP
    orientation as `ImageOps.exif_transpose` does: the same pixels (tests check
    the equality); a 32 px file decodes in a sixth of Pillow's time. Anything
    else goes through Pillow, decompression-bomb check included.

    Raises:
        ValueError: `decode` is not one of DECODES.
        Image.DecompressionBombError: more than twice Pillow's MAX_IMAGE_PIXELS;
            between once and twice, the warning is raised as an error too.
        Exception: whatever the decoder raises for a broken or non-image file.
    """
    if decode not in DECODES:
        raise ValueError(f"decode {decode!r} is not one of {', '.join(DECODES)}")
    reduced = decode == "reduced"
    header = _plain_jpeg(data)
    fast = None
    if header is not None:
        width, height, app1 = header
        scale = dct_scale(width, height, size) if reduced else 1
        fast = _fast_jpeg(data, app1, -(-width // scale), -(-height // scale))
    if isinstance(fast, np.ndarray) and fast.shape[:2] == (size, size):
        return fast  # nothing to turn or resize (CIFAR-like files)
    if fast is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = load_rgb(io.BytesIO(data), draft=size if reduced else None)
    else:
        img = fast if isinstance(fast, Image.Image) else Image.fromarray(fast)
    return np.array(squish(img, size, interpolation), dtype=np.uint8)


# ImageOps.exif_transpose's table: EXIF orientation -> the transposition making it upright
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                   6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                   8: Image.Transpose.ROTATE_90}


def _fast_jpeg(data: bytes, app1: bool, min_width: int = 0, min_height: int = 0
               ) -> np.ndarray | Image.Image | None:
    """A plain JPEG's upright RGB pixels decoded by simplejpeg, or None to leave it to Pillow.

    Returns an HWC array, or a PIL image when it had to be turned. None when
    simplejpeg is not installed, when the orientation cannot be read, or when
    libjpeg-turbo warns of corrupt data (strict mode raises): Pillow, which
    training uses, then decides what the file looks like or whether it is an error.

    Args:
        data: the file's bytes.
        app1: the file has an APP1 block (EXIF or XMP), which may hold an orientation.
        min_width, min_height: the DCT-scaled size to decode at (0: full size);
            asking for exactly ceil(side / scale) makes libjpeg pick that scale.
    """
    if simplejpeg is None:
        return None
    method = None
    if app1:  # Pillow reads the orientation as exif_transpose does (EXIF, else XMP)
        try:
            with Image.open(io.BytesIO(data)) as probe_img:
                method = _EXIF_TRANSPOSE.get(probe_img.getexif().get(0x0112, 1))
        except Exception:  # noqa: BLE001 - a broken header is Pillow's to report
            return None
    try:
        hwc = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False,
                                     fastupsample=False, strict=True, min_width=min_width,
                                     min_height=min_height)
    except ValueError:
        return None
    return hwc if method is None else Image.fromarray(hwc).transpose(method)


_SOF_PLAIN = (0xC0, 0xC1, 0xC2)  # Huffman-coded baseline, extended and progressive frames
_NOT_SOF = (0xC4, 0xC8, 0xCC)  # DHT, JPG and DAC share the SOF marker range


def plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG that simplejpeg decodes exactly as Pillow does, else None.

    Plain: 8-bit Huffman-coded baseline or progressive, one or three components,
    no Adobe block (CMYK and colour transforms stay with Pillow), complete (it
    ends with the end-of-image marker) and within Pillow's MAX_IMAGE_PIXELS.
    """
    header = _plain_jpeg(data)
    return None if header is None else header[:2]


def _plain_jpeg(data: bytes) -> tuple[int, int, bool] | None:
    """(width, height, has an APP1 block) of a plain JPEG (see `plain_jpeg_size`), else None.

    Only the markers before the first scan are read, a few microseconds where
    Pillow's header parser takes fifteen.
    """
    if not data.startswith(b"\xff\xd8") or not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    i, n, size, app1 = 2, len(data), None, False
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte before a marker
            i += 1
            continue
        if marker == 0xDA:  # start of scan: the header is over
            return None if size is None else (*size, app1)
        app1 = app1 or marker == 0xE1
        if marker == 0xEE and data.startswith(b"Adobe", i + 4):
            return None
        if 0xC0 <= marker <= 0xCF and marker not in _NOT_SOF:
            if marker not in _SOF_PLAIN or size is not None or i + 10 > n:
                return None
            bits, height, width, parts = struct.unpack_from(">BHHB", data, i + 4)
            limit = Image.MAX_IMAGE_PIXELS
            if bits != 8 or parts not in (1, 3) or not width or not height or \
                    (limit and width * height > limit):
                return None
            size = (width, height)
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None
