"""A run's data: the classes above the cutoff, their splits, and fastai DataLoaders.

`prepare_data` scans the library, keeps the classes with at least MIN_IMAGES
readable images and splits them by content hash (`splits.py`); `make_dataloaders`
turns the train and valid rows into fastai DataLoaders whose items are the model
input pixels inference sees too (`images.squished_pixels`, through the pixel
cache), with the recipe's augmentation on whole training batches.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import torch
from fastai.data.core import TfmdDL
from fastai.torch_core import TensorCategory
from fastai.vision.all import (CategoryBlock, ColReader, DataBlock, IntToFloatTensor, Normalize,
                               TensorImage, TransformBlock)
from fastcore.basics import chunked

from . import augment, library, models, recipe, splits
from .config import TrainConfig
from .images import read_file, squished_pixels
from .pixel_cache import PixelCache
from .workspace import Workspace, ZoolibError, check_class_name, class_folders


def prepare_data(ws: Workspace, cfg: TrainConfig, progress: bool = True
                 ) -> tuple[pd.DataFrame, list[str]]:
    """Scan, select the classes above the cutoff and split them.

    Returns:
        The split manifest (train, valid, test and benchmark rows) and the class list.

    Raises:
        ZoolibError: a class folder without readable images, or too few classes.
    """
    manifest = library.scan(ws, progress=progress)
    empty = sorted(set(p.name for p in class_folders(ws)) - set(manifest["label"]))
    if empty:
        raise ZoolibError(f"class folder(s) with no readable image: {', '.join(map(repr, empty))}"
                          " (no files at all); add images or remove the folder")
    classes = library.training_classes(manifest, cfg.min_images, library.discarded_paths(ws))
    for name in classes:  # class names become folder names and labels everywhere
        check_class_name(name)
    if len(classes) < 2:
        raise ZoolibError(f"only {classes} reach MIN_IMAGES={cfg.min_images}: "
                          "a classifier needs at least 2 classes")
    conflicts = splits.conflicting_labels(ws, manifest, classes)
    if len(conflicts):  # left out by split_manifest; say which, so curation can fix them
        print(f"left out {len(conflicts)} image(s) whose content is filed under two classes: "
              + ", ".join(conflicts["path"]))
    if not cfg.throwaway:  # a class's benchmark freezes when it first trains for real
        splits.freeze_benchmark(ws, manifest, classes)
    data = splits.split_manifest(ws, manifest, classes)
    if cfg.folds:
        data = splits.apply_fold(data, cfg.folds, cfg.fold)
    for part in ("train", "valid"):
        if not (data["split"] == part).any():
            raise ZoolibError(f"the {part} split is empty: add images")
    return data, classes


def data_hash(data: pd.DataFrame) -> str:
    """A hash of the training data (content hash, label, split), for model.json."""
    rows = data.sort_values("hash")[["hash", "label", "split"]].to_csv(index=False)
    return hashlib.blake2b(rows.encode(), digest_size=16).hexdigest()


class _SquishLoader:
    """Item loader: an image's model-input pixels (upright RGB, squish-resized, uint8).

    The pixels come from `images.squished_pixels`, the decode path inference uses
    too, with the filter and decode mode model.json records, so training and
    serving see the same pixels; resizing before fastai's item transforms is also
    about 1.5x cheaper per image than its Resize, which matters when data loading
    shares two CPU cores with the model. With a `PixelCache` each image is decoded
    once per input size, not once per epoch.
    """

    def __init__(self, size: int, interpolation: str = "bilinear", decode: str = "full",
                 cache: PixelCache | None = None, flip: augment.AlternatingFlip | None = None):
        self.size, self.interpolation, self.decode, self.cache = size, interpolation, decode, cache
        self.flip = flip

    def __call__(self, row):
        pixels = self.pixels(row)
        if self.flip is not None and row.get("train"):  # never a validation image
            pixels = self.flip(pixels, row["hash"])
        return pixels

    def pixels(self, row):
        """The image's pixels as inference sees them (no augmentation)."""
        try:
            if self.cache is not None:
                return self.cache.get(row["file"], row["hash"])
            return squished_pixels(read_file(row["file"]), self.size, self.interpolation,
                                   self.decode)
        except Exception as exc:  # noqa: BLE001 - say which file, whatever the decoder raised
            raise ZoolibError(f"cannot decode training image {row['file']}: "
                              f"{type(exc).__name__}: {exc}; rescan the library (01_curate) "
                              "or move the file out") from exc


def pixels_image(pixels: np.ndarray) -> TensorImage:
    """(H, W, C) uint8 pixels as fastai's (C, H, W) uint8 `TensorImage`.

    fastai's `ImageBlock` would make a PIL image of each item and then a tensor of
    that: a third of the loading time of an epoch from the pixel cache, which on
    two cores competes with the model's steps. The copy keeps the cache's arrays
    out of reach of anything that writes in place.
    """
    return TensorImage(torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1))


def PixelBlock() -> TransformBlock:
    """`ImageBlock` for items that are already pixels (`pixels_image`), scaled to
    [0, 1] per batch as ImageBlock does."""
    return TransformBlock(type_tfms=pixels_image, batch_tfms=IntToFloatTensor)


# the most pixels (MB) a DataLoader gathers into one in-memory array (`PixelDL`)
STACK_MB = 1024


class PixelDL(TfmdDL):
    """fastai's `TfmdDL`, but its batches are gathered whole from one uint8 array.

    fastai builds a batch item by item (the item loader, the type transforms'
    dispatch, then collation): about a quarter of an airbench epoch at 32 px on two
    CPU cores, where the anchor indexes one tensor. When every item's pixels fit in
    STACK_MB and the loader runs in this process, the first epoch stacks them (from
    the pixel cache) with their labels, and each batch is then one indexing, the
    alternating flip one more: the same tensors, types and order as fastai's path
    (tested), which it falls back to otherwise. `pixel_source` (set by
    `make_dataloaders`) is the item loader; without it, fastai's path.
    """

    pixel_source: _SquishLoader | None = None
    _stack: tuple | None = None

    def create_batches(self, samps):
        stack = self._stacked()
        if stack is None:
            yield from super().create_batches(samps)
            return
        pixels, labels, coins, train = stack
        flip = self.pixel_source.flip
        for chunk in chunked(samps, self.bs, self.drop_last):
            idx = torch.as_tensor(chunk)
            x = pixels[idx]
            if flip is not None:  # as `_SquishLoader` does: training items only
                mirror = torch.as_tensor(train[chunk] & (coins[chunk] ^ bool(flip.epoch & 1)))
                x[mirror] = x[mirror].flip(-1)
            yield TensorImage(x), TensorCategory(labels[idx])

    def _stacked(self) -> tuple | None:
        """(pixels (N, C, H, W), labels, flip coins, training flags), or None."""
        loader = self.pixel_source
        if loader is None or self.fake_l.num_workers or not self.indexed:
            return None
        items = self.dataset.items
        if len(items) * loader.size ** 2 * 3 > STACK_MB * 2**20:
            return None
        if self._stack is None or len(self._stack[1]) != len(items):
            pixels = torch.from_numpy(np.stack([loader.pixels(it) for it in items]))
            o2i = self.dataset.vocab.o2i
            labels = torch.tensor([o2i[it["label"]] for it in items])
            flip = loader.flip
            coins = np.array([flip is not None and flip.coin(it["hash"]) for it in items])
            train = np.array([bool(it.get("train")) for it in items])
            self._stack = (pixels.permute(0, 3, 1, 2).contiguous(), labels, coins, train)
        return self._stack


def _workers(cfg: TrainConfig) -> dict:
    """DataLoader workers: none on a machine of 2 cores or fewer (they would only
    take cores from the model's threads), else fastai's default."""
    if cfg.num_workers is not None:
        return {"num_workers": cfg.num_workers}
    return {"num_workers": 0} if (torch.get_num_threads() <= 2
                                  and not torch.cuda.is_available()) else {}


def make_dataloaders(ws: Workspace, data: pd.DataFrame, classes: list[str],
                     cfg: TrainConfig, prep: dict | None = None, progress: bool = True):
    """fastai DataLoaders over the train and valid rows of a split manifest.

    Args:
        prep: mean, std, interpolation and decode (`models.preprocessing`);
            a new scratch model's when None.
        progress: show the progress of filling the pixel cache (`cfg.cache`).

    Augmentation runs on whole training batches, as fastai does on a GPU (the
    alternating flip as items load); a validation batch is the inference
    preprocessing of its files, nothing more. The batch size is at most the number
    of training images (fastai drops a last short batch). The item loader is kept
    as `dls.item_loader` (the whitening init reads training pixels through it).
    """
    cfg = cfg.resolved()
    prep = prep or models.preprocessing(None, pretrained=False)
    rows = data[data["split"].isin(["train", "valid"])].reset_index(drop=True)
    rows = rows.assign(is_valid=rows["split"] == "valid", file=[str(ws.library / p)
                                                                  for p in rows["path"]])
    valid = rows["is_valid"].to_numpy()
    decode = prep["decode"]
    cache = None
    if cfg.cache:  # decoded once here, in parallel, rather than in the first epoch's loop
        cache = PixelCache(ws, cfg.img_size, prep["interpolation"], decode)
        cache.fill(rows["file"].tolist(), rows["hash"].tolist(), progress=progress)
    flip = augment.AlternatingFlip(cfg.seed) if cfg.flip == "alternate" else None
    loader = _SquishLoader(cfg.img_size, prep["interpolation"], decode, cache, flip)
    block = DataBlock(
        blocks=(PixelBlock(), CategoryBlock(vocab=classes)),
        get_x=loader,
        get_y=ColReader("label"),
        splitter=lambda items: ([i for i in range(len(items)) if not valid[i]],
                                [i for i in range(len(items)) if valid[i]]),
        batch_tfms=[*augment.batch_augmentation(cfg),
                    Normalize.from_stats(list(prep["mean"]), list(prep["std"]))],
    )
    # plain dicts as items: reading a DataFrame row per image costs more than decoding it
    records = rows.assign(train=~rows["is_valid"])[["file", "hash", "label", "train"]]
    bs = batch_size(cfg, int((~rows["is_valid"]).sum()))
    dls = block.dataloaders(records.to_dict("records"), bs=bs, seed=cfg.seed, dl_type=PixelDL,
                            **_workers(cfg))
    dls.item_loader = loader
    for dl in dls.loaders:
        dl.pixel_source = loader
    return dls


def batch_size(cfg: TrainConfig, n_train: int) -> int:
    """Images per step: BATCH_SIZE, or all training images when there are fewer;
    None (the airbench recipe's): `recipe.auto_batch`."""
    if cfg.batch_size is None:
        return recipe.auto_batch(n_train)
    return max(1, min(int(cfg.batch_size), n_train))


def whitening_images(dls, n: int = 5000, seed: int = 0) -> torch.Tensor:
    """Up to `n` training images, normalised as the model sees them, unaugmented:
    what the whitening init measures (airbench uses 5,000)."""
    items = dls.train_ds.items
    pick = np.random.default_rng(seed).permutation(len(items))[:n]
    pixels = np.stack([dls.item_loader.pixels(items[i]) for i in sorted(pick)])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255)
    norm = next(t for t in dls.after_batch if isinstance(t, Normalize))
    return (x - norm.mean.view(1, -1, 1, 1).cpu()) / norm.std.view(1, -1, 1, 1).cpu()


def dash_batches(dls, bs: int = 256):
    """Every training image with its label, unaugmented and unflipped, normalised as the
    model sees them, in batches: what DASH measures the gradient on."""
    items = [dict(item, train=False) for item in dls.train_ds.items]  # never flipped
    return dls.test_dl(items, with_labels=True, bs=bs)
