"""Architectures by timm name; saving and loading a generation.

A generation is a folder `models/gen-NNNN/` with `weights.safetensors` (the timm
model's state_dict), `model.json` (everything needed to rebuild and use it) and
`history.csv`. It is written to a temporary folder and renamed into place, so a
crash mid-save never leaves a half-written generation. The temporary folder's
name carries the writer's process id (`.gen-NNNN.<pid>-<random>.tmp`): one left
by a killed process is removed by the next save (`remove_dead_temps`).
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from . import archs  # noqa: F401 - registers zoo_cnn* in timm's registry before any lookup
from .images import DECODE, DECODES, RESAMPLE
from .workspace import Workspace, ZoolibError, write_atomic

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# model.json keys added after the first generations were saved, with what those
# generations did before the key existed: read_info fills them, so no reader guesses
INFO_DEFAULTS = {"interpolation": "bilinear", "decode": "full"}
_GEN = re.compile(r"^gen-(\d{4,})$")
SPLITS_FILE = "splits.parquet"  # a generation's own train/valid/test/benchmark rows
# A temporary of write_atomic (".<name>.<pid>-<thread>-<tag>.tmp", `workspace.temp_path`) or of
# save_generation (".<name>.<pid>-<random>.tmp"): the writer's process id follows the last dot
# but one.
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[^.]*\.tmp$")
# Temporary folders of save_generation before they carried a process id (mkdtemp's
# 8 random characters); removed once this old: no save takes an hour.
_OLD_TEMP = re.compile(r"^\.gen-\d{4,}\.[a-z0-9_]{8}$")
_OLD_TEMP_SECONDS = 3600.0


def create_model(arch: str, num_classes: int, pretrained: bool = False,
                 **model_args) -> torch.nn.Module:
    """Build a timm model by name.

    Args:
        arch: a timm architecture name, e.g. "resnet18" or "inception_v4".
        num_classes: size of the output layer.
        pretrained: download ImageNet weights (needs internet); off by default
            because generation 1 trains from random weights.
        model_args: keyword arguments of the model's constructor (model.json
            `model_args`: a zoo_cnn trained with the airbench recipe has no head
            bias and scaled logits, see `archs.ZooCNN`).

    Raises:
        ZoolibError: unknown architecture, with the closest names.
    """
    import timm

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ZoolibError(f"unknown architecture {arch!r}{hint}")
    if num_classes < 2:
        raise ZoolibError(f"a classifier needs at least 2 classes, got {num_classes}")
    return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **model_args)


def preprocessing(model: torch.nn.Module, pretrained: bool) -> dict:
    """Input normalisation and resize interpolation a new model should train with.

    A pretrained model must see its inputs as its weights were trained on, so its
    timm data config decides (inception_v4: mean and std 0.5, bicubic). A model
    from random weights keeps the ImageNet statistics and bilinear resizing, the
    cheapest Pillow filter; any statistics work when the body learns them anyway.

    A new model's JPEGs are decoded at reduced DCT scale (`images.DECODE`): the
    same pixels as a full decode for files near the input size, a seventh of the
    cost for camera photos.

    Returns:
        {"mean": [r, g, b], "std": [r, g, b], "interpolation": name, "decode": mode},
        for model.json.
    """
    if not pretrained:
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "interpolation": "bilinear", "decode": DECODE}
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return {"mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
            "interpolation": str(cfg["interpolation"]), "decode": DECODE}


def classifier_keys(model: torch.nn.Module) -> list[str]:
    """state_dict keys of the model's output layer (as timm names it)."""
    head = model.get_classifier()
    prefixes = [name for name, mod in model.named_modules() if mod is head]
    if not prefixes:
        raise ZoolibError(f"cannot find the output layer of {type(model).__name__}")
    return [k for k in model.state_dict() if k.startswith(prefixes[0] + ".")]


def generation_names(ws: Workspace) -> list[str]:
    """Saved generations, oldest first."""
    if not ws.models.is_dir():
        return []
    return sorted((p.name for p in ws.models.iterdir() if p.is_dir() and _GEN.match(p.name)),
                  key=lambda n: int(_GEN.match(n).group(1)))


def next_generation_name(ws: Workspace) -> str:
    """The name the next saved generation gets (gen-0001, gen-0002, ...)."""
    names = generation_names(ws)
    last = int(_GEN.match(names[-1]).group(1)) if names else 0
    return f"gen-{last + 1:04d}"


def read_info(ws: Workspace, name: str) -> dict:
    """The model.json of a generation, with `INFO_DEFAULTS` for keys it predates.

    Raises:
        ZoolibError: the generation does not exist (the saved ones are listed).
    """
    path = ws.models / name / "model.json"
    if not path.exists():
        have = ", ".join(generation_names(ws)) or "none"
        raise ZoolibError(f"generation {name!r} does not exist in {ws.models} (saved: {have})")
    info = {**INFO_DEFAULTS, **_read_json(path, "restore the generation's folder from a backup: "
                                                "without its model.json the generation cannot "
                                                "be loaded, served or evaluated")}
    _check_info(path, info)
    return info


def _check_info(path: Path, info: dict) -> None:
    """Refuse a model.json whose preprocessing or classes make no sense, naming the key:
    every reader (training, evaluation, bulk identification, serving) reads it here.

    Raises:
        ZoolibError: naming the file, the key and what was found.
    """
    def bad(key: str, want: str):
        return ZoolibError(f"{path}: {key!r} must be {want}, found {info.get(key)!r}; "
                           "restore the generation's model.json from a backup")

    def numbers(key: str, positive: bool = False) -> bool:
        v = info.get(key)
        return (isinstance(v, list) and len(v) == 3
                and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                        and math.isfinite(x) and (x > 0 or not positive) for x in v))

    size = info.get("img_size")
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 4096:
        raise bad("img_size", "a whole number of pixels from 8 to 4096")
    if not numbers("mean"):
        raise bad("mean", "three numbers (one per RGB channel)")
    if not numbers("std", positive=True):
        raise bad("std", "three positive numbers (one per RGB channel)")
    if info["interpolation"] not in RESAMPLE:
        raise bad("interpolation", f"one of {', '.join(RESAMPLE)}")
    if info["decode"] not in DECODES:
        raise bad("decode", f"one of {', '.join(DECODES)}")
    classes = info.get("classes")
    if (not isinstance(classes, list) or not classes
            or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)):
        raise bad("classes", "a list of distinct class names")
    if not isinstance(info.get("arch"), str) or not info["arch"]:
        raise bad("arch", "a timm architecture name")


def _read_json(path: Path, what_to_do: str) -> dict:
    """A JSON object from a side file, or a ZoolibError naming the file and what to do."""
    try:
        data = json.loads(path.read_bytes())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ZoolibError(f"{path} is not valid JSON ({exc}): {what_to_do}") from exc
    if not isinstance(data, dict):
        raise ZoolibError(f"{path} holds a JSON {type(data).__name__}, not an object: "
                          f"{what_to_do}")
    return data


def resolve_generation(ws: Workspace, name: str, include_throwaway: bool = False) -> str:
    """Turn "last" or a generation name into an existing generation name.

    "last" is the newest generation that is not a throw-away run (unless
    `include_throwaway`): throw-away generations are side branches.

    Raises:
        ZoolibError: no such generation.
    """
    if name != "last":
        read_info(ws, name)
        return name
    for gen in reversed(generation_names(ws)):
        if include_throwaway or not read_info(ws, gen).get("throwaway", False):
            return gen
    raise ZoolibError(f"INIT_FROM='last' but {ws.models} holds no generation yet: "
                      "train generation 1 with INIT_FROM='scratch'")


def load_generation(ws: Workspace, name: str) -> tuple[torch.nn.Module, dict]:
    """Rebuild a saved generation's model (eval mode) and return it with its info."""
    info = read_info(ws, name)
    path = ws.models / name / "weights.safetensors"
    try:
        state = load_file(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ZoolibError(f"{path} is unreadable ({type(exc).__name__}: {exc}): the "
                          f"generation's weights are damaged or missing; restore {name}'s "
                          "folder from a backup, or train a new generation") from exc
    try:
        # Built on the meta device, the model skips a random initialisation that the
        # saved weights replace anyway (5-8x faster: bulkid and serving start sooner).
        args = info.get("model_args") or {}
        with torch.device("meta"):
            model = create_model(info["arch"], len(info["classes"]), **args)
        model.load_state_dict(state, assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            # A tensor the file does not hold (a non-persistent buffer) needs the real init.
            model = create_model(info["arch"], len(info["classes"]), **args)
            model.load_state_dict(state)
    except RuntimeError as exc:
        raise ZoolibError(f"{path} does not hold a {info['arch']} with "
                          f"{len(info['classes'])} classes, as model.json says: {exc}") from exc
    return model.eval(), info


def save_generation(ws: Workspace, model: torch.nn.Module, info: dict,
                    history: pd.DataFrame | None = None, name: str | None = None,
                    splits: pd.DataFrame | None = None) -> str:
    """Write a generation atomically and return its name.

    Args:
        ws: the workspace.
        model: the trained timm model.
        info: model.json content (arch, img_size, mean, std, classes, ...);
            `name` and `saved_at` are added.
        history: per-epoch metrics for history.csv.
        name: generation name; the next free one when None.
        splits: the rows the generation was trained and evaluated with (hash, path,
            label, split), saved as splits.parquet.

    Raises:
        ZoolibError: the generation already exists or `info` lacks required keys.
    """
    missing = {"arch", "img_size", "mean", "std", "classes"} - set(info)
    if missing:
        raise ZoolibError(f"model info lacks {sorted(missing)}")
    name = name or next_generation_name(ws)
    final = ws.models / name
    if final.exists():
        raise ZoolibError(f"generation {name} already exists in {ws.models}")
    ws.models.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(ws.models)
    _remove_old_save_folders(ws)
    info = {**info, "name": name, "saved_at": datetime.now(timezone.utc).isoformat()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}-", suffix=".tmp", dir=ws.models))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / "weights.safetensors")
        (tmp / "model.json").write_text(json.dumps(info, indent=2, default=str))
        (history if history is not None else pd.DataFrame()).to_csv(tmp / "history.csv",
                                                                     index=False)
        if splits is not None:
            splits.to_parquet(tmp / SPLITS_FILE, index=False)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return name


# ----------------------------------------------------------------------------- leftovers

def process_alive(pid: int) -> bool:
    """Whether process `pid` is running on this machine.

    True where that cannot be told (not POSIX): a leftover is then kept, never
    removed under a live writer. A process of another machine sharing the
    workspace folder looks dead here; zoolib assumes one machine per workspace.
    """
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True


def remove_dead_temps(folder: str | Path) -> list[Path]:
    """Remove the temporaries in `folder` whose writing process is dead, and say so.

    A process killed in the middle of `write_atomic` or `save_generation` leaves
    its temporary behind (hidden, named with its process id); nothing else ever
    removes it. Temporaries of live processes are kept: they may still be written.

    Returns:
        The removed paths (files and folders).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _TEMP.match(entry.name)
        if match and not process_alive(int(match.group("pid"))):
            _remove(entry)
            removed.append(entry)
    if removed:
        print(f"removed {len(removed)} leftover(s) of a killed process in {folder}: "
              + ", ".join(p.name for p in removed))
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_old_save_folders(ws: Workspace) -> None:
    """Remove temporary generation folders of zoolib versions that did not name the
    writer's process id, once they are old enough to be certainly dead."""
    now = time.time()
    for entry in ws.models.iterdir():
        if _OLD_TEMP.match(entry.name) and now - entry.stat().st_mtime > _OLD_TEMP_SECONDS:
            shutil.rmtree(entry, ignore_errors=True)
            print(f"removed the leftover of an interrupted save: {entry}")


def read_splits(ws: Workspace, name: str) -> pd.DataFrame | None:
    """The rows a generation was trained with (hash, path, label, split), or None for a
    generation saved before splits were kept."""
    path = ws.models / name / SPLITS_FILE
    if not path.exists():
        return None
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ZoolibError(f"{path} is not a readable Parquet table ({exc}): restore it from "
                          f"a backup. Deleting it loses the record of what {name} trained on: "
                          "it is then tested on today's test split, and its training images "
                          "are no longer left out when its descendants are evaluated") from exc


def update_info(ws: Workspace, name: str, **fields) -> dict:
    """Merge fields into a generation's model.json (written atomically)."""
    info = {**read_info(ws, name), **fields}
    path = ws.models / name / "model.json"
    write_atomic(path, json.dumps(info, indent=2, default=str), fsync=True)
    return info


def read_deployed(ws: Workspace) -> dict | None:
    """The content of `models/deployed.json` ({"generation": ..., ...}), or None."""
    if not ws.deployed_json.exists():
        return None
    return _read_json(ws.deployed_json, "restore it from a backup, or delete it and deploy a "
                                        "generation again (until then none is deployed)")


def deployed_name(ws: Workspace) -> str | None:
    """The deployed generation's name, or None."""
    record = read_deployed(ws)
    return record["generation"] if record else None


def write_deployed(ws: Workspace, name: str, **details) -> dict:
    """Make `name` the deployed generation (atomic write of deployed.json).

    Raises:
        ZoolibError: the generation does not exist or is a throw-away run.
    """
    info = read_info(ws, name)
    if info.get("throwaway"):
        raise ZoolibError(f"{name} is a throw-away generation and can never be deployed")
    record = {"generation": name, "deployed_at": datetime.now(timezone.utc).isoformat(),
              **details}
    write_atomic(ws.deployed_json, json.dumps(record, indent=2, default=str), fsync=True)
    return record
