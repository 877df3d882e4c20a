"""The settings of a training run: `TrainConfig`, the 02_train notebook's parameters.

Every knob of `train.train` is a field here, named as the notebook's parameter in
lower case. Settings left at None take the recipe's value (`recipe.RECIPES`);
`resolved()` fills them, `check()` refuses nonsense naming the parameter, and
`from_params` reads a notebook's (or a YAML file's) UPPER_CASE parameters,
refusing names it does not know and values of the wrong type.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml

from . import pretrained as weights
from . import recipe
from .workspace import ZoolibError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("triangle", "plateau")
OPTIMIZERS = ("sgd", "muon", "adam")
FLIPS = ("alternate", "random", "none")
VALIDATES = ("every", "last")
WARM_METHODS = ("copy", "shrink_perturb", "dash")
WARM_SCHEDULES = ("fine_tune", "rewarm")
# UPPER_CASE names of the notebooks that train, read by the notebook, not by TrainConfig
NOTEBOOK_NAMES = frozenset({"WORKSPACE", "REPORT_DIR"})
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


@dataclass
class TrainConfig:
    """Every knob of a training run (the 02_train notebook's parameters, upper-cased).

    Settings left at None take the recipe's value (`recipe.RECIPES`; the comment
    gives airbench's); model.json records the resolved config.

    Attributes:
        arch: timm architecture name ("zoo_cnn" for 32-96 px, "inception_v4" at 299).
        img_size: square input size in pixels.
        recipe: "auto" (airbench for zoo_cnn* from random weights, else classic),
            "airbench", "long" (airbench95's rate, 13 epochs, for zoo_cnn_wide) or
            "classic" (see zoolib/recipe.py).
        epochs: the budget (airbench: 10): the triangle's length, or the most epochs
            a plateau run may take (classic: 40), anneal included.
        schedule: "triangle" (airbench's fixed budget) or "plateau" (warm up, hold,
            anneal at the plateau: for budgets that are not fixed).
        optimizer: "sgd" (Nesterov; LR and WEIGHT_DECAY per 1024 images, decoupled
            from the batch size, airbench94), "muon" (the same with the 3x3 filters
            taking Muon steps: the airbench recipe's default, measured) or "adam"
            (fastai's Adam, classic).
        lr: peak learning rate of a run from scratch (airbench: 11.5 per 1024
            images; classic: 0.01).
        lr_warm: peak rate of the new output layer in a warm start (None: LR / 2).
        lr_mult: in a warm start the body trains at lr_warm / lr_mult.
        momentum: Nesterov momentum of "sgd" (airbench: 0.85).
        muon_lr, muon_momentum: "muon" (Nesterov SGD with the 3x3 filters taking
            Muon steps, `zoolib.muon`): the filters' rate (a step's size relative to
            their norm) and momentum (airbench94_muon: 0.24 at 2,000 images a
            step, 0.6).
        bias_lr_scale: "sgd": batch-norm biases train at this multiple of the rate
            (airbench: 64; their weight decay is not scaled).
        freeze_epochs: head-only epochs that start a warm start.
        warmup_epochs: linear warmup at the start of each plateau phase.
        triangle_start, triangle_peak, triangle_end: the triangle's shape: the rate
            rises from start x peak rate to the peak over the first triangle_peak
            share of the steps, then falls to end x peak (airbench: 0.2, 0.23, 0.07).
        validate: "every" epoch (the curves of 02_train; classic) or the "last"
            only (airbench: a fixed-budget triangle reads nothing else, and
            validation is about 4% of a short run's time; the other epochs'
            validation values are NaN in history.csv). The plateau schedule needs
            "every". Not part of a run's identity (the weights are the same).
        patience: flat epochs without a better validation loss that make a plateau.
        min_improvement: a validation loss lower by this share of the best counts
            as better (0.005 = 0.5%).
        anneal_pct: anneal length as a share of the epochs before it.
        batch_size: images per batch, at most the training images (None, airbench's:
            1024, or fewer so that an epoch has at least 16 steps; classic: 64; per
            process under torchrun, see zoolib/distributed.py).
        weight_decay: airbench: 0.0153 per 1024 images ("sgd"); classic: 0.05
            (fastai's decoupled decay of Adam).
        label_smoothing: share of the target spread over the other classes.
        ema_decay: largest decay of an exponential weight average that validation
            and the saved model use (0 = none; airbench: 0, lookahead instead).
        lookahead: lookahead weight averaging (timm's `Lookahead`, airbench's rate
            schedule; `callbacks.LookaheadRate`).
        lookahead_every: steps between lookahead updates (airbench: 5).
        whiten: zoo_cnn's first layer set to whiten the training images' 2x2
            patches, weights frozen (`recipe.whiten_init`; scratch runs).
        whiten_bias_epochs: epochs the whitening layer's bias trains (airbench: 3).
        dirac: identity init of the first filters of each 3x3 conv (scratch runs).
        bn_frozen_scale: batch norm trains its shift only, scale fixed at 1.
        precision: "auto" (fp16 on CUDA, bf16 on CPUs that have it, else fp32),
            "fp32", "bf16" or "fp16" (CUDA only).
        min_images: readable images a class needs to take part.
        init_from: "scratch", "last" or a generation name to warm-start from.
        throwaway: mark the generation as a throw-away run (never promoted).
        seed: random seed for the model, the order of batches and augmentation.
        flip: "alternate" (each image mirrored on every other epoch, airbench),
            "random" (half the images each batch) or "none".
        max_rotate: largest rotation in degrees (airbench recipe: 0; classic: 10).
        max_zoom: largest zoom factor (1.0 = none; airbench recipe: 1.0; classic 1.1).
        max_shift: largest translation as a share of the side (whole pixels;
            0.0625 is airbench's 2 px at 32 px).
        max_warp: perspective warp (0 = off).
        max_lighting: brightness/contrast change (0 = off).
        carry_rows: on a warm start, keep output rows of shared classes.
        warm_method: what a warm start does to the copied body (`warmstart`):
            "copy" (kept as it is: the practitioner's), "shrink_perturb" (Ash &
            Adams 2020: `warm_shrink * parent + warm_perturb * fresh init`) or
            "dash" (Shin et al. 2024: each filter scaled by its agreement with the
            new data's gradient, at least `dash_lambda`).
        warm_schedule: "fine_tune" (the head alone for FREEZE_EPOCHS, then the body
            at LR_WARM / LR_MULT) or "rewarm" (the head alone, then the whole
            model at the scratch run's rates, warmed up and decayed again). None:
            the recipe's (airbench and long: "rewarm", measured by
            bench/replicate.py; classic: "fine_tune").
        warm_shrink, warm_perturb: "shrink_perturb" only (None: 0.4 and 0.1).
        dash_lambda: "dash": the smallest scale of a filter (their 0.3).
        frozen_stages: a fine-tune (pretrained or warm start) keeps its first
            FROZEN_STAGES feature stages (timm's `feature_info`, stem included) as
            they came for the whole run: their backward pass is skipped (0: none).
        pretrained: the weights a scratch run starts from (`zoolib.pretrained`): ""
            (random, the default), a timm pretrained name ("<arch>.<tag>", the bare
            tag, or the arch for its default tag; downloaded from timm's hub) or a
            weights file in timm's key names (.safetensors or .pth). A pretrained
            start is a fine-tune: FREEZE_EPOCHS of the head alone, then the body as
            WARM_SCHEDULE says. True/False (older parameter files) mean the
            architecture's default tag and "".
        num_workers: DataLoader workers; None = 0 on a small CPU machine, else fastai's.
        resume: continue an interrupted run with the same settings.
        folds: cross-validation: k folds of train+valid by content hash (0 = off).
        fold: which fold (0..folds-1) is the valid split; test/benchmark untouched.
        cache: decode each image once per input size into the workspace's pixel
            cache (`pixel_cache.PixelCache`) instead of once per epoch; the pixels
            are the same either way, so it is not part of a run's identity.
    """

    arch: str = "zoo_cnn"
    img_size: int = 64
    recipe: str = "auto"
    epochs: int | None = None
    schedule: str | None = None
    optimizer: str | None = None
    lr: float | None = None
    lr_warm: float | None = None
    lr_mult: float = 3.0
    momentum: float = 0.85
    muon_lr: float = 0.12
    muon_momentum: float = 0.6
    bias_lr_scale: float = 64.0
    freeze_epochs: int = 1
    warmup_epochs: float = 1.0
    triangle_start: float = 0.2
    triangle_peak: float = 0.23
    triangle_end: float = 0.07
    validate: str | None = None
    patience: int = 3
    min_improvement: float = 0.005
    anneal_pct: float = 0.25
    batch_size: int | None = None
    weight_decay: float | None = None
    label_smoothing: float = 0.2
    ema_decay: float | None = None
    lookahead: bool | None = None
    lookahead_every: int = 5
    whiten: bool | None = None
    whiten_bias_epochs: int = 3
    dirac: bool | None = None
    bn_frozen_scale: bool | None = None
    precision: str = "auto"
    min_images: int = 40
    init_from: str = "scratch"
    throwaway: bool = False
    seed: int = 42
    flip: str | None = None
    max_rotate: float | None = None
    max_zoom: float | None = None
    max_shift: float = 0.0625
    max_warp: float = 0.0
    max_lighting: float = 0.0
    carry_rows: bool = False
    warm_method: str = "copy"
    warm_schedule: str | None = None
    warm_shrink: float | None = None
    warm_perturb: float | None = None
    dash_lambda: float = 0.3
    frozen_stages: int = 0
    pretrained: str = ""
    num_workers: int | None = None
    resume: bool = True
    folds: int = 0
    fold: int = 0
    cache: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.pretrained, bool):  # PRETRAINED=True/False of older files
            self.pretrained = weights.default_name(self.arch) if self.pretrained else ""

    @classmethod
    def from_params(cls, params: dict, other=()) -> "TrainConfig":
        """The config from a notebook's (or a YAML file's) UPPER_CASE parameters.

        Names in lower case are ignored (a notebook's `globals()` holds its modules
        and variables); an UPPER_CASE name must be a field, one of NOTEBOOK_NAMES or
        one of `other` (the caller's own parameters): `EPOCH: 20` is refused,
        naming `EPOCHS`, rather than training the default budget. Values are
        coerced to the field's type (PyYAML reads `LR: 1e-3` as a string).

        Raises:
            ZoolibError: an unknown name or a value of the wrong type, named.
        """
        by_name = {f.name.upper(): f for f in fields(cls)}
        allowed = set(by_name) | NOTEBOOK_NAMES | set(other)
        unknown = [k for k in params if isinstance(k, str) and k.isupper() and k not in allowed]
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(by_name), n=1)
            hint = f": did you mean {close[0]}?" if close else ""
            raise ZoolibError(f"unknown training parameter {unknown[0]}{hint} (the parameters "
                              "are 02_train's; see zoolib/config.py)")
        return cls(**{f.name: _coerce(k, str(f.type), params[k])
                      for k, f in by_name.items() if k in params})

    def resolved(self) -> "TrainConfig":
        """This config with its recipe named and every None setting filled
        (`recipe.resolve`); FLIP=True means the recipe's kind of flip, False none."""
        cfg = self
        if isinstance(cfg.flip, bool):
            cfg = replace(cfg, flip=None if cfg.flip else "none")
        if cfg.recipe not in recipe.RECIPE_NAMES:
            raise ZoolibError(f"RECIPE must be one of {', '.join(recipe.RECIPE_NAMES)}, "
                              f"got {cfg.recipe!r}")
        cfg = recipe.resolve(cfg)
        if cfg.warm_method == "shrink_perturb":  # Ash & Adams' values
            cfg = replace(cfg, warm_shrink=0.4 if cfg.warm_shrink is None else cfg.warm_shrink,
                          warm_perturb=0.1 if cfg.warm_perturb is None else cfg.warm_perturb)
        return cfg if cfg.lr_warm is not None else replace(cfg, lr_warm=cfg.lr / 2)

    def check(self) -> None:
        """Raise ZoolibError naming the first parameter that makes no sense."""
        self.resolved()._check()

    def _check(self) -> None:
        for name in ("img_size", "epochs", "batch_size", "min_images", "patience",
                     "lookahead_every"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ZoolibError(f"{name.upper()} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "lr_warm", "lr_mult", "bias_lr_scale"):
            if not getattr(self, name) > 0:
                raise ZoolibError(f"{name.upper()} must be positive, got {getattr(self, name)}")
        for name, allowed in (("schedule", SCHEDULES), ("optimizer", OPTIMIZERS),
                              ("flip", FLIPS), ("validate", VALIDATES),
                              ("warm_method", WARM_METHODS), ("warm_schedule", WARM_SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ZoolibError(f"{name.upper()} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        if self.schedule == "plateau" and self.validate != "every":
            raise ZoolibError(f"SCHEDULE='plateau' watches the validation loss every epoch: "
                              f"VALIDATE must be 'every', got {self.validate!r}")
        if self.recipe in recipe.AIRBENCH_LIKE and (not self.arch.startswith("zoo_cnn")
                                                    or self.pretrained):
            raise ZoolibError(f"RECIPE={self.recipe!r} trains a zoo_cnn from random weights, not "
                              f"{self.arch}{' (pretrained)' if self.pretrained else ''}: "
                              "use RECIPE='classic' or 'auto'")
        if not (0 <= self.momentum < 1 and 0 < self.triangle_peak < 1
                and 0 <= self.triangle_start <= 1 and 0 <= self.triangle_end <= 1):
            raise ZoolibError("MOMENTUM must be in [0, 1), TRIANGLE_PEAK in (0, 1) and "
                              "TRIANGLE_START, TRIANGLE_END in [0, 1]; got "
                              f"{self.momentum}, {self.triangle_peak}, {self.triangle_start}, "
                              f"{self.triangle_end}")
        if self.whiten_bias_epochs < 0:
            raise ZoolibError(f"WHITEN_BIAS_EPOCHS must be at least 0, got "
                              f"{self.whiten_bias_epochs}")
        if self.freeze_epochs < 0:
            raise ZoolibError(f"FREEZE_EPOCHS must be at least 0, got {self.freeze_epochs}")
        self._check_pretrained()
        if self.frozen_stages < 0 or (self.frozen_stages and self.init_from == "scratch"
                                      and not self.pretrained):
            raise ZoolibError(f"FROZEN_STAGES={self.frozen_stages} fixes layers of trained "
                              "weights: it needs PRETRAINED or a warm start (INIT_FROM), and "
                              "is at least 0")
        if (self.init_from != "scratch" or self.pretrained) and self.freeze_epochs >= self.epochs:
            raise ZoolibError(f"FREEZE_EPOCHS={self.freeze_epochs} leaves no epoch to train the "
                              f"whole model in EPOCHS={self.epochs}: raise EPOCHS or lower it")
        if not 0 <= self.min_improvement < 1:
            raise ZoolibError(f"MIN_IMPROVEMENT is a share in [0, 1), got {self.min_improvement}")
        if not 0 < self.anneal_pct <= 1:
            raise ZoolibError(f"ANNEAL_PCT must be in (0, 1], got {self.anneal_pct}")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.ema_decay < 1:
            raise ZoolibError("LABEL_SMOOTHING and EMA_DECAY must be in [0, 1), got "
                              f"{self.label_smoothing} and {self.ema_decay}")
        self._check_warm()
        if not 0 <= self.max_shift < 0.5:
            raise ZoolibError(f"MAX_SHIFT is a share of the side in [0, 0.5), got {self.max_shift}")
        if self.precision not in PRECISIONS:
            raise ZoolibError(f"PRECISION must be one of {', '.join(PRECISIONS)}, "
                              f"got {self.precision!r}")
        if self.max_zoom < 1:
            raise ZoolibError(f"max_zoom must be at least 1.0, got {self.max_zoom}")
        if self.folds and not (self.folds >= 2 and 0 <= self.fold < self.folds):
            raise ZoolibError(f"FOLDS={self.folds}, FOLD={self.fold}: need FOLDS >= 2 "
                              "and 0 <= FOLD < FOLDS (FOLDS=0 turns folds off)")

    def _check_pretrained(self) -> None:
        if not isinstance(self.pretrained, str):
            raise ZoolibError(f"PRETRAINED must be a str (a timm tag or a weights file), got "
                              f"{self.pretrained!r}")
        if self.pretrained and self.init_from != "scratch":
            raise ZoolibError(f"PRETRAINED={self.pretrained!r} starts a run from scratch, but "
                              f"INIT_FROM={self.init_from!r} warm-starts from a generation: "
                              "set PRETRAINED='' or INIT_FROM='scratch'")
        if self.pretrained and not weights.is_file(self.pretrained):
            weights.hub_name(self.arch, self.pretrained)  # an unknown tag, named, before any data
        elif self.pretrained and not Path(self.pretrained).expanduser().is_file():
            raise ZoolibError(f"PRETRAINED weights file {self.pretrained} does not exist")

    def _check_warm(self) -> None:
        if self.warm_method != "shrink_perturb":
            if self.warm_shrink is not None or self.warm_perturb is not None:
                raise ZoolibError("WARM_SHRINK and WARM_PERTURB apply with WARM_METHOD="
                                  f"'shrink_perturb', not {self.warm_method!r}: set it or drop them")
        elif not 0 < self.warm_shrink <= 1 or self.warm_perturb < 0:
            raise ZoolibError(f"WARM_SHRINK must be in (0, 1] and WARM_PERTURB at least 0, got "
                              f"{self.warm_shrink} and {self.warm_perturb}")
        if not 0 < self.dash_lambda <= 1:
            raise ZoolibError(f"DASH_LAMBDA must be in (0, 1], got {self.dash_lambda}")


def _coerce(name: str, kind: str, value):
    """`value` as the type `kind` ("int | None", "float", "bool", "str", ...) says.

    Raises:
        ZoolibError: it cannot be read as that type; the message names `name`.
    """
    optional, base = "None" in kind, kind.replace(" | None", "").strip()
    bad = ZoolibError(f"{name} must be {'a' if base != 'int' else 'an'} {base}"
                      f"{' or None' if optional else ''}, got {value!r}")
    if value is None:
        if optional:
            return None
        raise bad
    if base == "str":
        if isinstance(value, str) or (name in ("FLIP", "PRETRAINED") and isinstance(value, bool)):
            return value  # FLIP=True/False: the recipe's flip or none; PRETRAINED: __post_init__
        raise bad
    if base == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE and not isinstance(value, float):
            return text in _TRUE
        raise bad
    if isinstance(value, bool):  # True is an int to Python, never a number here
        raise bad
    try:
        number = float(value.strip()) if isinstance(value, str) else value
        if base == "float":
            return float(number)
        if float(number) != int(number):
            raise bad
        return int(number)
    except (TypeError, ValueError, OverflowError):
        raise bad from None


def read_params(path: str | Path) -> dict:
    """A papermill parameter file (YAML or JSON) as a dict of UPPER_CASE names.

    Raises:
        ZoolibError: the file is missing, unreadable or not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text()
        params = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ZoolibError(f"cannot read the parameter file {path}: {exc}") from exc
    if not isinstance(params, dict):
        raise ZoolibError(f"the parameter file {path} holds no NAME: value mapping "
                          "(write it as for papermill -f, e.g. EPOCHS: 20)")
    return {str(k).upper(): v for k, v in params.items()}
