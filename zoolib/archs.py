"""Compact CNNs for small inputs, registered in timm's registry as `zoo_cnn*`.

Why our own network: timm's registered models are ImageNet designs whose stems
downsample 4x before the first block, so at 32 px resnet18's last stage sees a
1x1 map and wastes most of its compute (it reached 0.65 on the six CIFAR animal
classes). Adapting a stem would still leave an 11M-parameter network to train on
two CPU cores. This network follows the shape that trains fastest on CIFAR-sized
images (Page's ResNet-9 for DAWNBench, Keller Jordan's airbench 2024): a 2x2
stem, then three groups of (conv, max-pool, batch norm, GELU, conv, batch norm,
GELU), each halving the map, a global max pool and one linear layer. It has no
fixed input size (global pooling), so 32-96 px inputs all work; above that a
timm ImageNet model is the better choice.

Registered once, a `zoo_cnn` is a timm model like any other: `timm.create_model`
builds it, and it has `get_classifier`, `reset_classifier`, `forward_features`
and `forward_head(pre_logits=True)`, which warm starts, bulk identification and
serving rely on. There are no pretrained weights.
"""
from __future__ import annotations

import torch
from torch import nn
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["ScaledLinear", "ZooCNN"]


def _group(in_ch: int, out_ch: int, bn_eps: float, bn_momentum: float) -> nn.Sequential:
    """conv, pool, norm, act, conv, norm, act: one stage at half the resolution."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.MaxPool2d(2),
        nn.BatchNorm2d(out_ch, eps=bn_eps, momentum=bn_momentum), nn.GELU(),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch, eps=bn_eps, momentum=bn_momentum), nn.GELU())


class ScaledLinear(nn.Linear):
    """A linear output layer whose logits are multiplied by a constant `scale`.

    airbench94 ends in `Linear(bias=False)` then `Mul(1/9)`: the small scale keeps
    the first logits near zero, so label smoothing and a large learning rate do
    not saturate the softmax early. The scale is part of the layer (not of
    `forward_head`) so that every caller of `get_classifier()` sees the same logits.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 scale: float = 1.0):
        super().__init__(in_features, out_features, bias=bias)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.scale == 1.0 else out * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:g}"


class ZooCNN(nn.Module):
    """A stem and three conv groups; see the module docstring.

    Args:
        num_classes: outputs of the classifier (0 = no classifier, features only).
        in_chans: input channels.
        widths: output channels of the three groups.
        stem_width: output channels of the 2x2 stem.
        global_pool: timm pool type over the last map ("max" as in airbench).
        drop_rate: dropout before the classifier.
        head_bias: the output layer has a bias (airbench's has none).
        logit_scale: constant factor on the logits (airbench: 1/9; `ScaledLinear`).
        bn_eps, bn_momentum: batch norm's epsilon and PyTorch momentum (airbench:
            1e-12 and 0.4, i.e. its "momentum 0.6").
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3,
                 widths: tuple[int, int, int] = (64, 256, 256), stem_width: int = 24,
                 global_pool: str = "max", drop_rate: float = 0.0, head_bias: bool = True,
                 logit_scale: float = 1.0, bn_eps: float = 1e-5, bn_momentum: float = 0.1,
                 **kwargs):
        super().__init__()
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.head_bias, self.logit_scale = bool(head_bias), float(logit_scale)
        self.num_features = self.head_hidden_size = widths[-1]
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_width, 2, bias=True), nn.GELU())
        chans = (stem_width, *widths)
        self.stages = nn.Sequential(*(_group(a, b, bn_eps, bn_momentum)
                                      for a, b in zip(chans, chans[1:])))
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(num_classes)

    def _new_head(self, num_classes: int) -> nn.Module:
        if not num_classes:
            return nn.Identity()
        return ScaledLinear(self.num_features, num_classes, bias=self.head_bias,
                            scale=self.logit_scale)

    def get_classifier(self) -> nn.Module:
        """The output layer (timm's convention; warm starts replace it)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, randomly initialised output layer for `num_classes`."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head = self._new_head(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (batch, widths[-1], h, w)."""
        return self.stages(self.stem(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              intermediates_only: bool = False, **kwargs):
        """timm's interface: the maps of the stages asked for (an int n: the last n).

        Returns:
            The list of maps, or (the last map, the list) unless `intermediates_only`.
        """
        n = len(self.stages)
        if indices is None:
            wanted = set(range(n))
        elif isinstance(indices, int):
            wanted = set(range(n - indices, n))
        else:
            wanted = {i % n for i in indices}
        maps, x = [], self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in wanted:
                maps.append(x)
        return maps if intermediates_only else (x, maps)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool and classify a feature map; `pre_logits` stops before the output layer."""
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 32, 32), "pool_size": None,
            "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "first_conv": "stem.0", "classifier": "head",
            **kwargs}


default_cfgs = generate_default_cfgs({"zoo_cnn": _cfg(), "zoo_cnn_small": _cfg(),
                                     "zoo_cnn_wide": _cfg()})


def _create(variant: str, pretrained: bool, **kwargs) -> ZooCNN:
    return build_model_with_cfg(ZooCNN, variant, pretrained, **kwargs)


@register_model
def zoo_cnn(pretrained: bool = False, **kwargs) -> ZooCNN:
    """Widths 64/256/256 (airbench94's): the default for 32-96 px images."""
    return _create("zoo_cnn", pretrained, **{"widths": (64, 256, 256), **kwargs})


@register_model
def zoo_cnn_small(pretrained: bool = False, **kwargs) -> ZooCNN:
    """Widths 32/64/128: about 8x cheaper, for tests, demos and quick looks."""
    return _create("zoo_cnn_small", pretrained, **{"widths": (32, 64, 128), **kwargs})


@register_model
def zoo_cnn_wide(pretrained: bool = False, **kwargs) -> ZooCNN:
    """Widths 128/384/384 (airbench95's): about 2.5x zoo_cnn's compute, for longer runs."""
    return _create("zoo_cnn_wide", pretrained, **{"widths": (128, 384, 384), **kwargs})
