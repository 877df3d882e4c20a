"""The augmentation does what the parameters say, on training batches only."""
import math

import numpy as np
import pytest
import torch
from fastai.vision.all import Pipeline, TensorImage

from zoolib import augment, inference
from zoolib.images import load_rgb
from zoolib.loaders import make_dataloaders, prepare_data
from zoolib.train import TrainConfig

NONE = dict(flip="none", max_rotate=0.0, max_zoom=1.0, max_shift=0.0)


def _apply(cfg: TrainConfig, x: torch.Tensor, split_idx: int = 0):
    tfms = augment.batch_augmentation(cfg)
    out = Pipeline(tfms, split_idx=split_idx)(TensorImage(x.clone()))
    mats = tfms[0].mat if tfms else None
    return out, mats


def _batch(n=32, size=32):
    torch.manual_seed(0)
    return torch.rand(n, 3, size, size)


def test_flip_mirrors_about_half_the_images_and_nothing_else():
    x = _batch()
    out, _ = _apply(TrainConfig(img_size=32, **{**NONE, "flip": "random"}), x)
    same = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x)]
    mirrored = [torch.allclose(o, i.flip(2), atol=1e-5) for o, i in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 4 <= sum(mirrored) <= 28


def test_rotation_stays_within_its_bound():
    x = _batch(256)
    _, mats = _apply(TrainConfig(img_size=32, **{**NONE, "max_rotate": 10.0}), x)
    angles = torch.atan2(mats[:, 0, 1], mats[:, 0, 0]).abs() * 180 / math.pi
    assert angles.max() <= 10.0 + 1e-4 and angles.max() > 5.0
    assert torch.allclose(mats[:, 0, 0] ** 2 + mats[:, 0, 1] ** 2, torch.ones(256), atol=1e-5)


def test_zoom_stays_within_its_bound():
    x = _batch(256)
    _, mats = _apply(TrainConfig(img_size=32, **{**NONE, "max_zoom": 1.2}), x)
    scale = 1 / mats[:, 0, 0]  # the sampling grid shrinks by the zoom factor
    assert scale.min() >= 1.0 - 1e-5 and scale.max() <= 1.2 + 1e-4 and scale.max() > 1.1
    assert torch.allclose(mats[:, 0, 1], torch.zeros(256))  # no rotation mixed in


def test_translation_is_whole_pixels_within_its_bound():
    x = _batch(256)
    out, mats = _apply(TrainConfig(img_size=32, **{**NONE, "max_shift": 0.0625}), x)
    pixels = mats[:, :, 2] * (32 - 1) / 2
    assert torch.allclose(pixels, pixels.round(), atol=1e-4)
    assert pixels.abs().max() == pytest.approx(2.0, abs=1e-4)  # 0.0625 * 32 px
    # a whole-pixel shift moves pixels without blurring them: the interior is a copy
    dx, dy = (int(v) for v in pixels[0].round())
    inner = out[0][:, 3:-3, 3:-3]
    assert torch.allclose(inner, x[0][:, 3 + dy:29 + dy, 3 + dx:29 + dx], atol=1e-5)


def test_validation_batches_are_not_augmented():
    x = _batch()
    cfg = TrainConfig(img_size=32, flip=True, max_rotate=30.0, max_zoom=1.5, max_shift=0.2)
    out, _ = _apply(cfg, x, split_idx=1)
    assert torch.allclose(out, x, atol=1e-5)
    moved, _ = _apply(cfg, x, split_idx=0)
    assert not torch.allclose(moved, x, atol=1e-2)


def test_a_validation_batch_is_the_inference_preprocessing_of_its_files(demo_ws):
    cfg = TrainConfig(img_size=40, batch_size=16, num_workers=0)
    data, classes = prepare_data(demo_ws, cfg, progress=False)
    prep = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic",
            "decode": "full"}
    dls = make_dataloaders(demo_ws, data, classes, cfg, prep)
    xb, yb = dls.valid.one_batch()
    items = dls.valid_ds.items[: len(xb)]
    info = {"img_size": 40, **prep}
    expected = torch.stack([inference.to_tensor(load_rgb(r["file"]), info) for r in items])
    assert torch.allclose(torch.as_tensor(xb), expected, atol=1e-5)
    assert [classes[i] for i in yb.tolist()] == [r["label"] for r in items]
    bilinear = inference.to_tensor(load_rgb(items[0]["file"]), {**info, "interpolation": "bilinear"})
    assert not torch.allclose(expected[0], bilinear, atol=1e-3)  # the filter really is used


@pytest.mark.parametrize("epoch", [0, 1])
def test_gathered_batches_are_fastais_item_by_item_batches(demo_ws, epoch):
    cfg = TrainConfig(img_size=32, batch_size=16, num_workers=0, flip="alternate")
    data, classes = prepare_data(demo_ws, cfg, progress=False)
    dls = make_dataloaders(demo_ws, data, classes, cfg, progress=False)
    dls.item_loader.flip.epoch = epoch
    for dl in (dls.train, dls.valid):
        order = list(np.random.default_rng(epoch).permutation(len(dl.dataset)))
        gathered = list(dl.create_batches(iter(order)))
        assert dl._stack is not None  # the in-memory path ran
        dl.pixel_source = None  # fastai's own, item by item
        own = list(dl.create_batches(iter(order)))
        dl.pixel_source = dls.item_loader
        assert len(gathered) == len(own) > 0
        for (x, y), (x0, y0) in zip(gathered, own):
            assert type(x) is type(x0) and type(y) is type(y0)
            assert torch.equal(x, x0) and torch.equal(y, y0)
    # not vacuous: some training images are mirrored this epoch, and the others the next
    mirrored = [dls.item_loader.flip.flipped(it["hash"]) for it in dls.train.dataset.items]
    assert any(mirrored) and not all(mirrored)
