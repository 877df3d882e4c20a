"""Camera-sized photos for the benchmarks: animals10-mini upscaled to 4032x3024 JPEGs.

Phones and camera traps save 8-12 megapixel JPEGs; the benchmarks on 32 px CIFAR
files hide what decoding them costs. `camera_photos` makes such a set once in a
temporary folder (upscaled with bicubic resampling, saved at quality 90, every
fifth with an EXIF orientation of 6, 8 or 3) and reuses it on later runs.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from PIL import Image

ANIMALS10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "animals10-mini"
SIZE = (4032, 3024)
_ORIENTATIONS = (1, 6, 1, 8, 1, 3, 1, 1, 1, 1)


def camera_photos(n: int = 200, folder: Path | None = None, source: Path = ANIMALS10
                  ) -> list[Path]:
    """`n` 12-megapixel JPEGs in class folders (`<folder>/<class>/<name>.jpg`).

    Args:
        n: how many (the 320 source photos are reused in turn beyond that).
        folder: where; a fixed folder in the temp directory by default, reused.
        source: the animals10-mini folder.

    Returns:
        The files, sorted.

    Raises:
        FileNotFoundError: the source folder holds no photo.
    """
    sources = sorted(p for p in source.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not sources:
        raise FileNotFoundError(f"no photos in {source}: the camera-photo set needs "
                                "../shared/datasets/animals10-mini")
    folder = folder or Path(tempfile.gettempdir()) / f"zoolib-camera-photos-{n}"
    files = []
    for i in range(n):
        src = sources[i % len(sources)]
        dest = folder / src.parent.name / f"{src.stem}-{i:04d}.jpg"
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as img:
                big = img.convert("RGB").resize(SIZE, Image.BICUBIC)
            exif = big.getexif()
            exif[0x0112] = _ORIENTATIONS[i % len(_ORIENTATIONS)]
            tmp = dest.with_suffix(".tmp")
            big.save(tmp, "JPEG", quality=90, exif=exif.tobytes())
            tmp.replace(dest)
        files.append(dest)
    return sorted(files)
