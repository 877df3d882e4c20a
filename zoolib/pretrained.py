"""A new model's starting weights: random, timm's pretrained ones by tag, or a file.

`PRETRAINED` (02_train; `TrainConfig.pretrained`) is one of

- `""`: random weights, the practitioner's path for generation 1 and the default;
- a timm pretrained name, `"<arch>.<tag>"` (e.g. "tf_efficientnet_lite0.in1k"), the
  bare tag, or the architecture's name for its default tag: timm downloads the
  weights from its hub (needs internet; cached by huggingface_hub);
- a weights file in timm's key names (`.safetensors`, or a `.pth`/`.pt`/`.bin`
  state dict): for machines that reach no hub. It is loaded strictly into
  `timm.create_model(ARCH)`, every key but the output layer's, which stays random
  for the run's class list.

The normalisation and resize filter a pretrained model trains with come from timm's
pretrained config of the architecture (or of the tag): `models.preprocessing`. The
run is then a fine-tune (`train`: the head alone first, then the body at its own
rate), and model.json records the start (`start_record`).

A pretrained start's new output layer starts at zero (weights and bias; model.json
`head_init` "zeros"), the usual fine-tuning init: its logits start at 0 and its loss
at log(classes), and no gradient reaches the body until the head has learned
something. timm's random init (uniform in +-1/sqrt(fan_in)) gave Lite0's 1,280
ImageNet features logits up to +-6 and a loss of 3.75 on one photo of each of
animals10-mini's 10 classes (chance: 2.3): large, meaningless gradients that undo
the body's weights once it trains.
Random weights keep timm's init: a zero head there would add nothing.

Its batch norm stays as the weights came (scale, shift and statistics) for the
whole run (model.json `body_norm` "frozen"), as detection fine-tunes do (timm's
`freeze_batch_norm_2d`, detectron2's FrozenBN): a few hundred photos in batches of
16 are too few to re-estimate ImageNet's statistics. Its parameters are fixed, so
`recipe.split_groups` leaves them out of every group (the unfreeze never turns them
on) and `callbacks.NormFreeze`, which every fine-tune runs (`train`), keeps such
layers in eval mode. On animals10-mini (bench/pretrained.py, seeds 0-2, valid
images) the same fine-tune with it reached 0.907 against 0.880 with the statistics
re-estimated, whose valid loss rose once the body trained.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from . import models
from .workspace import ZoolibError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
SHOWN_KEYS = 4  # keys named per kind of mismatch in an error


def is_file(value: str) -> bool:
    """Whether a PRETRAINED value names a weights file rather than timm weights."""
    return Path(value).suffix.lower() in WEIGHT_SUFFIXES or "/" in value or "\\" in value


def default_name(arch: str) -> str:
    """`"<arch>.<tag>"` of the architecture's default pretrained weights (legacy
    PRETRAINED=True), or `arch` itself when timm knows none (then `hub_name` says so)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(arch)
    except RuntimeError:  # an unknown name: the run's check names it
        return arch
    return f"{arch}.{cfg.tag}" if cfg is not None and cfg.tag else arch


def hub_name(arch: str, value: str) -> str:
    """The full timm name ("<arch>.<tag>") of a PRETRAINED value that is not a file.

    Raises:
        ZoolibError: the name is of another architecture, or timm has no such tag
            (the known ones are listed).
    """
    import timm
    from timm.models import get_pretrained_cfg

    name = default_name(arch) if value == arch else value if "." in value else f"{arch}.{value}"
    if name.partition(".")[0] != arch:
        raise ZoolibError(f"PRETRAINED={value!r} names weights of {name.partition('.')[0]}, "
                          f"but ARCH={arch!r}: set ARCH to match, or a tag of {arch}")
    try:
        known = get_pretrained_cfg(name, allow_unregistered=False) is not None
    except RuntimeError:
        known = False
    if not known:
        tags = timm.list_pretrained(f"{arch}.*")
        raise ZoolibError(f"timm knows no pretrained weights {name!r} for PRETRAINED="
                          f"{value!r}; {arch} has: {', '.join(tags) or 'none'}")
    return name


def new_model(arch: str, num_classes: int, source: str,
              model_args: dict) -> tuple[torch.nn.Module, dict, dict]:
    """A new model for a scratch run: random weights, or pretrained ones with a new head.

    From pretrained weights the new head starts at zero and the batch norm is fixed
    (`zero_head`, `freeze_norms`); from random weights every layer is timm's.

    Args:
        arch: the timm architecture.
        num_classes: size of the new output layer (random from random weights,
            zero from pretrained ones).
        source: PRETRAINED: "" (random), a timm pretrained name or a weights file.
        model_args: constructor arguments (the recipe's).

    Returns:
        (model, the start's record for model.json, its preprocessing for model.json).

    Raises:
        ZoolibError: unknown tag, failed download, missing or unfitting file (named).
    """
    if not source:
        model = models.create_model(arch, num_classes, **model_args)
        record = {"parent": None, "init": "scratch", "head_init": "random"}
        return model, record, models.preprocessing(model, pretrained=False)
    if is_file(source):
        model = models.create_model(arch, num_classes, **model_args)
        detail = load_file_into(model, Path(source).expanduser(), arch)
    else:
        name = hub_name(arch, source)
        model = download(name, num_classes, model_args)
        detail = {"tag": name}
    # whose statistics the inputs are normalised with: the architecture's (or tag's) config
    tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag")
    detail["preprocessing_from"] = f"{arch}.{tag}" if tag else arch
    zero_head(model)
    freeze_norms(model)
    record = {"parent": None, "init": "pretrained", "head_init": "zeros",
              "body_norm": "frozen", "pretrained": detail, "fine_tune": True}
    return model, record, models.preprocessing(model, pretrained=True)


def zero_head(model: torch.nn.Module) -> None:
    """Set the output layer's weights and bias to zero (see the module docstring).

    Raises:
        ZoolibError: the model has no output layer with parameters to set.
    """
    params = list(model.get_classifier().parameters())
    if not params:
        raise ZoolibError(f"{type(model).__name__} has no output layer to initialise")
    with torch.no_grad():
        for param in params:
            param.zero_()


def freeze_norms(model: torch.nn.Module) -> int:
    """Fix every batch-norm layer's scale and shift (see the module docstring).

    Returns:
        The number of layers fixed.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.requires_grad_(False)
    return len(norms)


def freeze_stages(model: torch.nn.Module, stages: int) -> int:
    """Fix the layers of the first `stages` feature stages for the whole run.

    A stage is one of timm's `feature_info` entries (Lite0: the stride-2, 4, 8, 16 and 32
    blocks); the stem and everything registered before the stage's last parameter
    are fixed too. Their gradients are never needed, so autograd skips the backward
    pass through the model's widest, costliest layers: on Lite0 at 96 px (fp32, an
    AVX2 CPU) two stages train 1.8x faster. Early filters are the most generic, the
    reason fine-tunes often fix them (fastai's `freeze_to`, timm's `freeze`), and
    fixing them here (not a parameter group) keeps fastai's unfreeze off them.

    Returns:
        The number of parameter tensors fixed (0 for `stages` 0).

    Raises:
        ZoolibError: the model names no feature stages, or fewer than `stages`.
    """
    if not stages:
        return 0
    info = getattr(model, "feature_info", None)
    names = [entry["module"] for entry in info] if info else []
    if stages > len(names):
        raise ZoolibError(f"FROZEN_STAGES={stages}, but {type(model).__name__} has "
                          f"{len(names)} feature stages{': ' + ', '.join(names) if names else ''}")
    params = list(model.named_parameters())
    last = max(i for i, (name, _) in enumerate(params) if name.startswith(names[stages - 1] + "."))
    for _, param in params[:last + 1]:
        param.requires_grad_(False)
    return last + 1


def download(name: str, num_classes: int, model_args: dict) -> torch.nn.Module:
    """timm's model `name` with its hub weights (the output layer new and random).

    Raises:
        ZoolibError: the download failed (no internet, no such file on the hub).
    """
    try:
        return models.create_model(name, num_classes, pretrained=True, **model_args)
    except ZoolibError:
        raise
    except Exception as exc:  # noqa: BLE001 - huggingface_hub and urllib raise many kinds
        raise ZoolibError(f"cannot download the pretrained weights {name!r} ({type(exc).__name__}: "
                          f"{exc}); without internet, set PRETRAINED to a weights file in "
                          "timm's key names (.safetensors or .pth)") from exc


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file (a `.pth` checkpoint may wrap it in "state_dict").

    Raises:
        ZoolibError: the file is missing, unreadable or holds no tensors by name.
    """
    if not path.is_file():
        raise ZoolibError(f"PRETRAINED weights file {path} does not exist")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:  # weights_only: a pickle may run code, a state dict needs none
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors and pickle raise their own types
        raise ZoolibError(f"PRETRAINED weights file {path} is unreadable "
                          f"({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if (not isinstance(state, dict) or not state
            or not all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ZoolibError(f"PRETRAINED weights file {path} holds no state dict of tensors")
    return state


def load_file_into(model: torch.nn.Module, path: Path, arch: str) -> dict:
    """Load a weights file's body strictly into `model`, leaving its output layer.

    Every body key of the model must be in the file with its shape, and the file
    may hold nothing else but an output layer (of any size: ImageNet's 1,000
    classes). A missing batch-norm counter (`num_batches_tracked`) is allowed.

    Returns:
        The record for model.json: the file, its sha256 and how many tensors loaded.

    Raises:
        ZoolibError: naming the file and a few keys that do not fit.
    """
    state = read_weights(path)
    head = set(models.classifier_keys(model))
    own = model.state_dict()
    body = {k: v for k, v in state.items() if k not in head}
    problems = _mismatches(own, body, head)
    if problems:
        raise ZoolibError(f"PRETRAINED weights file {path} does not fit {arch}: "
                          + "; ".join(problems) + f" (it must hold a {arch} in timm's key "
                          "names: convert it, or set ARCH to its architecture)")
    model.load_state_dict({**own, **body}, strict=True)
    return {"file": str(path.resolve()), "sha256": file_sha256(path), "tensors": len(body)}


def _mismatches(own: dict, body: dict, head: set[str]) -> list[str]:
    """What keeps `body` from loading into a model whose state dict is `own`."""
    def named(what: str, keys: list[str]) -> str:
        more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
        return f"{len(keys)} {what}: {', '.join(keys[:SHOWN_KEYS])}{more}"

    missing = sorted(k for k in own.keys() - body.keys() - head
                     if not k.endswith("num_batches_tracked"))
    extra = sorted(body.keys() - own.keys())
    shapes = [f"{k} {tuple(body[k].shape)} not {tuple(own[k].shape)}"
              for k in sorted(body.keys() & own.keys()) if body[k].shape != own[k].shape]
    return [named(what, keys) for what, keys in (("keys missing from the file", missing),
                                                 ("keys the model lacks", extra),
                                                 ("tensors of another shape", shapes)) if keys]


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
