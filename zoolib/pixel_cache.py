"""The training image cache: each library image decoded once per input size, not once per epoch.

A 12-megapixel photo costs ~190 ms to decode in full (~26 ms at a reduced DCT
scale) and a training run reads it every epoch. The cache keeps the pixels the
model sees (upright RGB, squish-resized, uint8, before augmentation) as one
small file per image under

    WORKSPACE/.zoolib/pixels/<size>-<interpolation>-<decode>-v2/<hash[:2]>/<hash>.px

holding the CRC32 of the pixels (4 bytes, little-endian) and then the raw uint8
pixels, so an entry with the right length and the wrong pixels (zeros, flipped
bytes) is caught and decoded again, never trained on.

keyed by the image's content hash, so a changed image is a new entry, an
unchanged one is reused across epochs and generations, and a deleted cache is
rebuilt on the next run. It only ever reads the library. Augmentation still runs
per epoch, on the cached pixels.

One file per image rather than one big array: entries are added and found
independently (a new image needs no rewrite), a broken entry is one decode to
repair, and reading a 150 KB file costs a fraction of a millisecond.

Each object also keeps the entries it has read in memory, up to `memory_mb`: at
32 px an epoch of 27,000 images otherwise spends about 4% of its time in np.load
(measured with py-spy on 2 cores), and the whole set is 83 MB. The in-memory
copies are read-only, so no caller can change what a later epoch reads.
"""
from __future__ import annotations

import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .machine import cores
from .images import read_file, squished_pixels
from .workspace import Workspace, ZoolibError, write_atomic


class Entries:
    """Fixed-size records kept one file per content hash, each behind its CRC32.

    `<folder>/<hash[:2]>/<hash><suffix>` holds the CRC32 of the payload (4 bytes,
    little-endian) and then the payload: a record of the wrong length or with the
    wrong bytes reads as missing, so it is computed again rather than used. The
    pixel cache and the embedding cache (`embedder`) keep their records this way.

    Args:
        folder: where the records live (a derived cache folder).
        suffix: the files' suffix.
        nbytes: the payload's length.
        what: the cache's name in error messages.
    """

    def __init__(self, folder: Path, suffix: str, nbytes: int, what: str):
        self.folder, self.suffix, self.nbytes, self.what = Path(folder), suffix, int(nbytes), what

    def path(self, digest: str) -> Path:
        """Where the record of `digest` is kept."""
        return self.folder / digest[:2] / f"{digest}{self.suffix}"

    def put(self, digest: str, payload: bytes) -> None:
        """Keep a record (atomically: a reader never sees half of one)."""
        path = self.path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, zlib.crc32(payload).to_bytes(4, "little") + payload)

    def load(self, digest: str) -> bytes | None:
        """The payload, or None when missing, of another length or failing its CRC.

        Raises:
            ZoolibError: the record is not a file (a folder in its place): the cache's
                problem, not the image's; delete the cache folder (named).
        """
        path = self.path(digest)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except (IsADirectoryError, PermissionError) as exc:
            raise ZoolibError(f"the {self.what} entry {path} cannot be read ({exc}): delete "
                              f"{self.folder} (a derived cache, rebuilt on the next run)") from exc
        if len(raw) != 4 + self.nbytes or zlib.crc32(raw[4:]).to_bytes(4, "little") != raw[:4]:
            return None
        return raw[4:]


class PixelCache:
    """Cached model-input pixels of library images for one preprocessing.

    Args:
        ws: the workspace (the cache lives in its `.zoolib/` folder).
        size: the square input size.
        interpolation: the resize filter (model.json's).
        decode: "full" or "reduced" (model.json's, see `images.squished_pixels`).
        memory_mb: how much of what it reads it keeps in memory for the next epoch.
    """

    def __init__(self, ws: Workspace, size: int, interpolation: str = "bilinear",
                 decode: str = "full", memory_mb: float = 1024):
        self.size, self.interpolation, self.decode = int(size), interpolation, decode
        self._memo: dict[str, np.ndarray] = {}
        self._room = int(memory_mb * 2**20)
        self.folder = ws.cache / "pixels" / f"{self.size}-{interpolation}-{decode}-v2"
        self.entries = Entries(self.folder, ".px", self.size * self.size * 3, "pixel cache")
        self.decodes = 0  # images decoded by this object (tests count cache misses)
        self._count = threading.Lock()

    def path(self, digest: str) -> Path:
        """Where an image's pixels are kept."""
        return self.entries.path(digest)

    def _decode(self, file: str | Path) -> np.ndarray:
        with self._count:
            self.decodes += 1
        return squished_pixels(read_file(file), self.size, self.interpolation, self.decode)

    def _put(self, digest: str, pixels: np.ndarray) -> None:
        self.entries.put(digest, np.ascontiguousarray(pixels, np.uint8).tobytes())

    def _load(self, digest: str) -> np.ndarray | None:
        """The cached pixels, or None when missing or not what this cache holds."""
        raw = self.entries.load(digest)
        if raw is None:
            return None
        return np.frombuffer(raw, np.uint8).reshape(self.size, self.size, 3)

    def get(self, file: str | Path, digest: str) -> np.ndarray:
        """An image's pixels (read-only): from memory or the cache, else decoded and kept."""
        pixels = self._memo.get(digest)
        if pixels is not None:
            return pixels
        pixels = self._load(digest)
        if pixels is None:
            pixels = self._decode(file)
            self._put(digest, pixels)
        pixels.setflags(write=False)
        if pixels.nbytes <= self._room:
            self._memo[digest] = pixels
            self._room -= pixels.nbytes
        return pixels

    def fill(self, files: list[str], digests: list[str], progress: bool = True) -> int:
        """Decode and keep every image not cached yet, in parallel (decoders release the GIL).

        Returns:
            How many images were decoded.
        """
        todo = [(f, d) for f, d in zip(files, digests) if not self.path(d).exists()]
        todo = list(dict(zip((d for _, d in todo), (f for f, _ in todo))).items())  # one per hash
        if not todo:
            return 0
        before = self.decodes

        def one(item):
            digest, file = item
            self._put(digest, self._decode(file))

        with ThreadPoolExecutor(max_workers=cores()) as pool:
            list(tqdm(pool.map(one, todo), total=len(todo), desc="caching training images",
                      unit="img", disable=not progress))
        return self.decodes - before
