"""The training image cache: decoded once, reused, invalidated by content, rebuilt, read-only."""
import hashlib
import shutil

import numpy as np
import pytest

from zoolib import library
from zoolib.images import read_file, squished_pixels
from zoolib.pixel_cache import PixelCache
from zoolib.workspace import ZoolibError


def _library_inventory(ws) -> dict[str, str]:
    return {p.relative_to(ws.library).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ws.library.rglob("*")) if p.is_file()}


def _rows(ws, n=12):
    m = library.scan(ws, progress=False)
    m = m[m["readable"]].drop_duplicates("hash").head(n)
    return [str(ws.library / p) for p in m["path"]], m["hash"].tolist()


def test_filled_once_then_hit_with_the_same_pixels(demo_ws):
    files, digests = _rows(demo_ws)
    before = _library_inventory(demo_ws)
    cache = PixelCache(demo_ws, 32, "bilinear", "reduced")
    assert cache.fill(files, digests, progress=False) == len(files)
    assert cache.fill(files, digests, progress=False) == 0  # a second epoch decodes nothing
    for f, d in zip(files, digests):
        assert np.array_equal(cache.get(f, d), squished_pixels(read_file(f), 32, decode="reduced"))
    assert cache.decodes == len(files)
    assert _library_inventory(demo_ws) == before  # the library is only read
    assert cache.folder.is_relative_to(demo_ws.cache)


def test_changed_image_is_a_new_entry_and_a_deleted_cache_is_rebuilt(demo_ws):
    files, digests = _rows(demo_ws, 3)
    cache = PixelCache(demo_ws, 32)
    cache.fill(files, digests, progress=False)
    changed = demo_ws.library / "lion" / "changed.jpg"
    shutil.copy(files[0], changed)
    with open(changed, "ab") as f:
        f.write(b"\0")  # new bytes, new content hash, new entry
    m = library.scan(demo_ws, progress=False).set_index("path")
    new_hash = m.loc["lion/changed.jpg", "hash"]
    assert new_hash not in digests and not cache.path(new_hash).exists()
    cache.get(str(changed), new_hash)
    assert cache.path(new_hash).exists() and cache.decodes == 4
    shutil.rmtree(demo_ws.cache / "pixels")
    assert cache.fill(files, digests, progress=False) == 3  # rebuilt


def test_a_broken_or_foreign_entry_is_decoded_again(demo_ws):
    files, digests = _rows(demo_ws, 2)
    cache = PixelCache(demo_ws, 32)
    cache.fill(files, digests, progress=False)
    cache.path(digests[0]).write_bytes(b"garbage")
    np.save(cache.path(digests[1]).open("wb"), np.zeros((8, 8, 3), np.uint8))
    decodes = cache.decodes
    for f, d in zip(files, digests):
        assert cache.get(f, d).shape == (32, 32, 3)
    assert cache.decodes == decodes + 2


def test_each_preprocessing_has_its_own_folder(demo_ws):
    a, b = PixelCache(demo_ws, 32, "bilinear", "full"), PixelCache(demo_ws, 48, "bicubic", "reduced")
    assert a.folder != b.folder and a.folder.name == "32-bilinear-full-v2"


def test_entries_read_once_are_kept_in_memory_read_only(demo_ws):
    files, digests = _rows(demo_ws, 3)
    cache = PixelCache(demo_ws, 32, memory_mb=1)
    cache.fill(files, digests, progress=False)
    first = [cache.get(f, d) for f, d in zip(files, digests)]
    shutil.rmtree(demo_ws.cache / "pixels")  # a second epoch reads memory, not the files
    again = [cache.get(f, d) for f, d in zip(files, digests)]
    assert all(a is b for a, b in zip(first, again)) and cache.decodes == 3
    assert not any(a.flags.writeable for a in again)  # no caller can change a later epoch


def test_memory_is_bounded(demo_ws):
    files, digests = _rows(demo_ws, 3)
    cache = PixelCache(demo_ws, 32, memory_mb=32 * 32 * 3 * 2 / 2**20)  # room for two
    cache.fill(files, digests, progress=False)
    for f, d in zip(files, digests):
        cache.get(f, d)
    assert len(cache._memo) == 2


def test_the_decoding_pool_follows_the_cpu_affinity(demo_ws, monkeypatch):
    """One core counter (`machine.cores`): a process pinned to one core of 64 (a
    container, taskset, CI) decodes with one thread, not 64."""
    import os

    from zoolib import pixel_cache

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    sizes = []
    real = pixel_cache.ThreadPoolExecutor
    monkeypatch.setattr(pixel_cache, "ThreadPoolExecutor",
                        lambda max_workers: sizes.append(max_workers) or real(max_workers))
    files, digests = _rows(demo_ws, 2)
    PixelCache(demo_ws, 32).fill(files, digests, progress=False)
    assert sizes == [1]


def test_an_entry_of_the_right_size_with_wrong_pixels_is_decoded_again(demo_ws):
    """Each entry carries a CRC32 of its pixels: zeros or flipped bytes are caught."""
    files, digests = _rows(demo_ws, 2)
    PixelCache(demo_ws, 32).fill(files, digests, progress=False)
    cache = PixelCache(demo_ws, 32)
    zeros = cache.path(digests[0])
    zeros.write_bytes(zeros.read_bytes()[:4] + bytes(32 * 32 * 3))
    flipped = cache.path(digests[1])
    raw = bytearray(flipped.read_bytes())
    raw[100] ^= 0xFF
    flipped.write_bytes(bytes(raw))
    for f, d in zip(files, digests):
        assert np.array_equal(cache.get(f, d), squished_pixels(read_file(f), 32))
    assert cache.decodes == 2


def test_an_entry_that_is_a_folder_is_the_caches_problem(demo_ws):
    files, digests = _rows(demo_ws, 1)
    cache = PixelCache(demo_ws, 32)
    cache.path(digests[0]).mkdir(parents=True)
    with pytest.raises(ZoolibError, match="pixel cache entry .* delete"):
        cache.get(files[0], digests[0])
