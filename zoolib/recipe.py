"""The small-image recipe: airbench94's training tricks that fastai and timm lack.

Keller Jordan's airbench94 (github KellerJordan/cifar10-airbench, `legacy/airbench94.py`)
trains the network of `archs.zoo_cnn` to 94% on CIFAR-10 in 9.9 epochs; with a plain
recipe the same network needs about 34. Its ablation (the cifar10-zoo repository's
`airbench/ablations/README.md`) prices each trick in epochs to 94%: whitening init
34 -> 21, dirac init -> 18, 64x learning rate on batch-norm biases -> 13.5,
lookahead -> 12, multi-crop TTA -> 10.8, alternating flip -> 9.9.

Here are the pieces that act on the model and the optimizer; the others live where
their kind lives: the triangle schedule in `schedule.py`, lookahead in
`callbacks.py` (timm's `Lookahead` optimizer with airbench's rate schedule), the
alternating flip in `augment.py`, multi-crop TTA in `inference.py`.

Two recipes, chosen by `TrainConfig.recipe`:

- "airbench": zoo_cnn from random weights. Whitening and dirac init, batch norm
  with a frozen scale (eps 1e-12, momentum 0.4), no head bias and logits x 1/9,
  Nesterov SGD with batch-size-independent rates, the bias 64x, lookahead,
  alternating flip and 2-pixel translation, the triangle schedule. The 3x3
  filters take Muon steps (`zoolib.muon`, airbench94_muon's optimizer): on
  zoolib's valid images (9,000 CIFAR animals, 10 epochs) it ended 3 points above
  airbench94's SGD for the same time; `OPTIMIZER="sgd"` is airbench94 exactly.
- "long": airbench95's longer run: airbench at rate 10 for 13 epochs (airbench95:
  15), meant for `zoo_cnn_wide` (airbench95's widths, 128/384/384; 2.8x the
  compute per image), within 3x the airbench recipe's time.
- "classic": every other model (timm ImageNet designs, pretrained weights):
  fastai's Adam, an EMA of the weights, random flips, the plateau schedule.

"auto" picks airbench for `zoo_cnn*` without pretrained weights, else classic.
Settings that differ between the two are `None` in `TrainConfig` until `resolve`
fills them from `RECIPES`; model.json records the resolved values.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

RECIPE_NAMES = ("auto", "airbench", "long", "classic")

# What each recipe sets for the TrainConfig fields left at None.
RECIPES: dict[str, dict] = {
    "airbench": {
        "optimizer": "muon", "lr": 11.5, "weight_decay": 0.0153, "schedule": "triangle",
        "epochs": 10, "batch_size": None, "flip": "alternate", "lookahead": True,
        "ema_decay": 0.0, "whiten": True, "dirac": True, "bn_frozen_scale": True,
        "max_rotate": 0.0, "max_zoom": 1.0, "validate": "last",
        # bench/replicate.py (six generations, seed 0): copying the parent and training
        # on at a low body rate ended 2.6 points below scratch on cifar10/test; the
        # scratch rates again, warmed up and decayed, ended above it
        "warm_schedule": "rewarm",
    },
    "classic": {
        "optimizer": "adam", "lr": 0.01, "weight_decay": 0.05, "schedule": "plateau",
        "epochs": 40, "batch_size": 64, "flip": "random", "lookahead": False,
        "ema_decay": 0.9998, "whiten": False, "dirac": False, "bn_frozen_scale": False,
        "max_rotate": 10.0, "max_zoom": 1.1, "validate": "every",
        "warm_schedule": "fine_tune",  # pretrained weights: the head first, a low body rate
    },
}

# airbench's batch of 1,024 images, fewer on a small library so that an epoch is still
# at least MIN_STEPS steps (a 400-image library would otherwise train one step an epoch).
MAX_BATCH, MIN_STEPS, MIN_BATCH = 1024, 16, 32


def auto_batch(n_train: int) -> int:
    """The airbench recipe's batch size for `n_train` training images."""
    return max(1, min(MAX_BATCH, max(MIN_BATCH, n_train // MIN_STEPS), n_train))


# airbench95's longer run (with ARCH="zoo_cnn_wide", its widths) at its rate 10, for 13
# epochs rather than its 15: the wide network costs 2.8x zoo_cnn per image (fp32 on an
# AVX2 CPU, channels-last, measured). bench/train_recipe.py on its valid images (27,000
# training images, seed 0, bf16 Xeon): 11 epochs 0.8833 (0.8920 with TTA) in 2.1x the
# anchor's minutes, 13 epochs 0.8853 (0.8940) in about 2.5x; 15 would pass 3x.
RECIPES["long"] = {**RECIPES["airbench"], "epochs": 13, "lr": 10.0}
AIRBENCH_LIKE = ("airbench", "long")

# zoo_cnn's constructor arguments under airbench (recorded as model.json `model_args`).
AIRBENCH_MODEL_ARGS = {"head_bias": False, "logit_scale": 1 / 9, "bn_eps": 1e-12,
                       "bn_momentum": 0.4}


def recipe_name(cfg) -> str:
    """The recipe a config trains with ("auto" resolved: see the module docstring)."""
    if cfg.recipe != "auto":
        return cfg.recipe
    small = cfg.arch.startswith("zoo_cnn") and not cfg.pretrained
    return "airbench" if small else "classic"


def resolve(cfg):
    """A copy of `cfg` with the recipe named and every None setting filled from it."""
    name = recipe_name(cfg)
    filled = {k: v for k, v in RECIPES[name].items() if getattr(cfg, k) is None}
    return replace(cfg, recipe=name, **filled)


def model_args(cfg) -> dict:
    """Constructor arguments of a new model under the (resolved) config's recipe."""
    return dict(AIRBENCH_MODEL_ARGS) if cfg.recipe in AIRBENCH_LIKE else {}


# ------------------------------------------------------------------ init
def dirac_init(model: nn.Module) -> int:
    """Identity init of the first `in_channels` filters of each 3x3 convolution.

    airbench's `Conv.reset_parameters`: a fresh network then starts close to an
    identity through each conv, which trains faster than random filters alone.

    Only 3x3 convolutions: zoo_cnn's 2x2 stem is the whitening layer
    (`whiten_init`). Returns the number of convolutions changed.
    """
    changed = 0
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d) and mod.kernel_size == (3, 3):
                w = mod.weight
                nn.init.dirac_(w[:min(w.size(0), w.size(1))])
                changed += 1
    return changed


def patch_whitening(images: torch.Tensor, kernel: int, eps: float = 5e-4) -> torch.Tensor:
    """Filters that whiten the `kernel` x `kernel` patches of normalised images.

    The eigenvectors of the patch covariance, each divided by the square root of
    its eigenvalue (+ eps), largest first, then the same filters negated (so a
    GELU after them keeps both signs): 2 x channels x kernel^2 filters.

    Args:
        images: (N, C, H, W) float, normalised as the model sees them.
        kernel: patch side.
        eps: added to the eigenvalues (airbench: 5e-4).

    Returns:
        The (2 C k^2, C, k, k) weight.
    """
    c = images.shape[1]
    patches = images.float().unfold(2, kernel, 1).unfold(3, kernel, 1)
    patches = patches.transpose(1, 3).reshape(-1, c, kernel, kernel)
    flat = patches.reshape(len(patches), -1).double()
    cov = flat.T @ flat / len(flat)
    values, vectors = torch.linalg.eigh(cov)
    values, vectors = values.flip(0), vectors.T.flip(0)
    scaled = (vectors / torch.sqrt(values.clamp(min=0) + eps).view(-1, 1)).float()
    scaled = scaled.reshape(-1, c, kernel, kernel)
    return torch.cat([scaled, -scaled])


def whiten_init(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set `conv`'s weights to `patch_whitening` of `images` and freeze them.

    Raises:
        ValueError: the conv is not a square stem with 2 x in x k^2 filters.
    """
    k = conv.kernel_size[0]
    want = 2 * conv.in_channels * k * k
    if conv.kernel_size != (k, k) or conv.out_channels != want:
        raise ValueError(f"a whitening stem needs {want} filters of {k}x{k}, this one has "
                         f"{conv.out_channels} of {conv.kernel_size}")
    with torch.no_grad():
        conv.weight.copy_(patch_whitening(images, k, eps))
        if conv.bias is not None:
            conv.bias.zero_()
    conv.weight.requires_grad_(False)


def stem_conv(model: nn.Module) -> nn.Conv2d:
    """The first convolution of a zoo_cnn (the whitening layer)."""
    return model.stem[0]


def freeze_norm_scales(model: nn.Module) -> int:
    """Batch norm with its scale fixed at what it is (1 in a new model): only the
    bias (the shift) trains, as in airbench. Returns the number of layers."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.weight is not None:
            mod.weight.requires_grad_(False)
            n += 1
    return n


# ------------------------------------------------------------------ optimizer
def norm_bias_ids(model: nn.Module) -> set[int]:
    """ids of the batch-norm shift parameters (airbench's 64x learning-rate group)."""
    return {id(m.bias) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None}


def split_groups(model: nn.Module, bias_group: bool,
                 filter_group: bool = False) -> list[list[nn.Parameter]]:
    """fastai parameter groups: [conv filters,] body, [batch-norm biases,] output layer.

    Parameters frozen for the whole run (the whitening weights, frozen batch-norm
    scales) are left out, so fastai's `freeze_to` never turns them back on. With
    `bias_group`, the batch-norm shifts are a group of their own (their 64x rate);
    with `filter_group`, the 4-d conv weights come first (Muon's group). The output
    layer is always last, so `freeze_to(-1)` trains it alone.
    """
    head = {id(p) for p in model.get_classifier().parameters()}
    bias = norm_bias_ids(model) if bias_group else set()
    live = [p for p in model.parameters() if p.requires_grad or id(p) in head]
    filters = {id(p) for p in live if p.dim() == 4 and id(p) not in head} if filter_group else set()
    groups = [[p for p in live if id(p) in filters]] if filter_group else []
    groups.append([p for p in live if id(p) not in head | bias | filters])
    if bias_group:
        groups.append([p for p in live if id(p) in bias])
    groups.append([p for p in live if id(p) in head])
    return groups


def kilostep_scale(momentum: float) -> float:
    """airbench's 1024 x (1 + 1/(1 - momentum)): how much larger Nesterov steps are than
    the gradients that make them, per 1024 images, when gradients are steady."""
    return 1024 * (1 + 1 / (1 - momentum))


def sgd_rates(lr: float, weight_decay: float, momentum: float, batch_size: int,
              shares: list[float]) -> tuple[list[float], list[float]]:
    """PyTorch SGD learning rates and weight decays, from airbench's decoupled values.

    airbench states its rate and decay per 1024 images, independent of the batch
    size and the momentum; it sums the loss over the batch. fastai averages it, so
    the rate here is airbench's times the batch size. The decay is given to each
    group as `decay / rate`, so the weights shrink by the same amount per step
    whatever the group's rate (the 64x biases are not decayed 64x harder).

    Args:
        lr, weight_decay: per 1024 images (airbench: 11.5 and 0.0153).
        momentum: Nesterov momentum (airbench: 0.85).
        batch_size: images per step.
        shares: each group's rate as a share of `lr` (e.g. [1, 64, 1]).

    Returns:
        (learning rate per group, PyTorch weight_decay per group).
    """
    base = lr / kilostep_scale(momentum) * batch_size
    decay = weight_decay * batch_size / kilostep_scale(momentum)
    rates = [base * s for s in shares]
    return rates, [decay / r if r > 0 else 0.0 for r in rates]


def lookahead_alpha(step: int, total: int, decay: float = 0.95 ** 5) -> float:
    """airbench's lookahead rate: the slow weights move `1 - decay x (step/total)^3` of
    the way to the fast ones every 5 steps (all the way at first, 23% at the end)."""
    frac = min(max(step / max(total, 1), 0.0), 1.0)
    return 1.0 - decay * frac ** 3
