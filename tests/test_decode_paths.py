"""One decode path: camera photos give the same pixels to training, evaluation, bulk
identification and serving; the training cache decodes each image once; model.json
keeps each generation's decode mode."""
import hashlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY
from zoolib import bulkid, inference, loaders, models, pixel_cache, preprocess, serving, train
from zoolib.loaders import make_dataloaders, prepare_data
from zoolib.train import TrainConfig

ORIENTATIONS = (1, 3, 6, 8)


def _inventory(ws) -> dict[str, str]:
    return {p.relative_to(ws.library).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ws.library.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def camera_jpegs() -> list[bytes]:
    """4032x3024 JPEGs (quality 90), one per EXIF orientation."""
    rng = np.random.default_rng(5)
    out = []
    for orientation in ORIENTATIONS:
        small = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((4032, 3024), Image.BICUBIC)
        exif = img.getexif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
        out.append(buf.getvalue())
    return out


@pytest.mark.parametrize("decode", ["full", "reduced"])
def test_large_photos_get_the_same_pixels_everywhere(demo_ws, camera_jpegs, decode):
    files = []
    for k, data in enumerate(camera_jpegs):
        files.append(demo_ws.library / "lion" / f"camera_{k}.jpg")
        files[-1].write_bytes(data)
    info = {"img_size": 224, "interpolation": "bilinear", "decode": decode,
            "mean": list(models.IMAGENET_MEAN), "std": list(models.IMAGENET_STD)}
    expected = [inference.file_tensor(f, info) for f in files]  # evaluation's path
    # training, with and without the cache: the uint8 pixels its batches normalise
    cache = pixel_cache.PixelCache(demo_ws, 224, "bilinear", decode)
    for loader in (loaders._SquishLoader(224, "bilinear", decode),
                   loaders._SquishLoader(224, "bilinear", decode, cache)):
        for f, want in zip(files, expected):
            row = {"file": str(f), "hash": hashlib.sha256(f.read_bytes()).hexdigest()}
            got = preprocess.pixels_tensor(np.asarray(loader(row)), info)
            assert torch.equal(got, want), f.name
    # bulk identification's dataset, then its batch normalisation
    ds = bulkid.ImageFiles(files, 224, "bilinear", decode=decode)
    batch = bulkid.normalise(torch.stack([ds[i][0] for i in range(len(files))]), info)
    assert all(ds[i][2] == "" for i in range(len(files)))
    assert torch.allclose(batch, torch.stack(expected), atol=1e-6)
    # serving: an upload's bytes
    for data, want in zip(camera_jpegs, expected):
        assert torch.equal(serving.predictor._decode(data, info)[0], want)
    # upright: a photo turned by EXIF is not its raw pixels
    assert not torch.equal(expected[0], expected[2])


def test_reduced_decode_differs_from_full_on_a_camera_photo(tmp_path, camera_jpegs):
    f = tmp_path / "photo.jpg"
    f.write_bytes(camera_jpegs[0])
    info = {"img_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
    full = inference.file_tensor(f, {**info, "decode": "full"})
    assert not torch.equal(full, inference.file_tensor(f, {**info, "decode": "reduced"}))
    assert (full - inference.file_tensor(f, {**info, "decode": "reduced"})).abs().mean() < 0.05


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        inference.file_tensor(bad, {"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                                    "interpolation": "bilinear", "decode": "reduced"})


class _Counting:
    """Wraps squished_pixels where the cache calls it, counting decodes."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = pixel_cache.squished_pixels

        def counted(*args, **kw):
            self.calls += 1
            return real(*args, **kw)
        monkeypatch.setattr(pixel_cache, "squished_pixels", counted)
        monkeypatch.setattr(loaders, "squished_pixels", counted)


def test_the_cache_is_filled_once_and_hit_in_every_epoch(demo_ws, monkeypatch):
    decodes = _Counting(monkeypatch)
    cfg = TrainConfig(**{**TINY, "img_size": 32})
    data, classes = prepare_data(demo_ws, cfg, progress=False)
    prep = models.preprocessing(None, pretrained=False)
    dls = make_dataloaders(demo_ws, data, classes, cfg, prep, progress=False)
    images = data[data["split"].isin(["train", "valid"])]["hash"].nunique()
    assert decodes.calls == images  # filled before the first epoch, once per content
    for _ in range(2):  # two epochs of training batches, then validation
        for _batch in dls.train:
            pass
        for _batch in dls.valid:
            pass
    assert decodes.calls == images
    make_dataloaders(demo_ws, data, classes, cfg, prep, progress=False)  # a later run
    assert decodes.calls == images
    uncached = TrainConfig(**{**TINY, "img_size": 32, "cache": False})
    dls = make_dataloaders(demo_ws, data, classes, uncached, prep, progress=False)
    for _batch in dls.train:
        pass
    assert decodes.calls > images  # without the cache every epoch decodes


def test_training_uses_the_cache_records_the_decode_and_leaves_the_library(demo_ws,
                                                                          monkeypatch):
    before = _inventory(demo_ws)
    decodes = _Counting(monkeypatch)
    result = train.train(demo_ws, TrainConfig(**{**TINY, "epochs": 3}), progress=False)
    used = result.splits[result.splits["split"].isin(["train", "valid"])]["hash"].nunique()
    assert decodes.calls == used  # 3 epochs, one decode per image
    assert result.info["decode"] == "reduced"
    assert (demo_ws.cache / "pixels" / "32-bilinear-reduced-v2").is_dir()
    assert _inventory(demo_ws) == before
    # a warm start keeps its parent's mode; a parent from before modes decoded in full
    info_path = demo_ws.models / result.name / "model.json"
    info = json.loads(info_path.read_text())
    del info["decode"]
    info_path.write_text(json.dumps(info))
    assert models.read_info(demo_ws, result.name)["decode"] == "full"  # what it did then
    child = train.train(demo_ws, TrainConfig(**{**TINY, "init_from": result.name,
                                                "freeze_epochs": 1}), progress=False)
    assert child.info["decode"] == "full"
    assert (demo_ws.cache / "pixels" / "32-bilinear-full-v2").is_dir()
