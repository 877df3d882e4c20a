"""The airbench recipe's pieces: whitening, alternating flip, lookahead, multi-crop TTA,
the 64x bias rate, Muon, and a run that learns."""
import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from timm.optim import Lookahead

from tests.conftest import TINY
from zoolib import augment, inference, models, recipe
from zoolib.muon import MuonSGD, orthogonalise
from zoolib.schedule import triangle
from zoolib.loaders import make_dataloaders, prepare_data
from zoolib.train import TrainConfig, train


def _correlated_images(n=64, size=16, seed=0):
    """Images whose channels and neighbouring pixels are strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, size + 1, size + 1, generator=g)
    smooth = (base[..., 1:, 1:] + base[..., :-1, 1:] + base[..., 1:, :-1]) / 3
    mix = torch.tensor([[1.0], [0.8], [0.5]]).view(1, 3, 1, 1)
    return smooth * mix + 0.1 * torch.randn(n, 3, size, size, generator=g)


def test_whitening_gives_the_patches_identity_covariance():
    x = _correlated_images()
    conv = torch.nn.Conv2d(3, 24, 2, bias=True)
    recipe.whiten_init(conv, x, eps=0.0)
    with torch.no_grad():
        out = conv(x)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = out.T @ out / len(out)
    assert torch.allclose(cov, torch.eye(12, dtype=cov.dtype), atol=1e-3)
    assert not conv.weight.requires_grad and conv.bias.requires_grad
    # the other 12 filters are the same ones negated (both signs survive the GELU)
    assert torch.equal(conv.weight[12:], -conv.weight[:12])


def test_whitening_refuses_a_stem_of_another_shape():
    with pytest.raises(ValueError, match="24 filters"):
        recipe.whiten_init(torch.nn.Conv2d(3, 16, 2), _correlated_images())


class _StemLog(Callback):
    """The stem's weights and bias, and whether the bias trains, after every epoch."""

    def __init__(self):
        self.rows = []

    def after_epoch(self):
        stem = recipe.stem_conv(self.learn.model)
        self.rows.append((stem.weight.detach().clone(), stem.bias.detach().clone(),
                          stem.bias.requires_grad))


def test_whitening_weights_stay_frozen_and_the_bias_trains_for_its_epochs(demo_ws):
    log = _StemLog()
    train(demo_ws, TrainConfig(**{**TINY, "epochs": 3}, whiten_bias_epochs=1), progress=False,
          extra_cbs=[log])
    weights, biases, trains = zip(*log.rows)
    assert trains == (True, False, False)
    assert all(torch.equal(w, weights[0]) for w in weights)
    assert not torch.equal(biases[0], torch.zeros_like(biases[0]))  # it trained in epoch 1
    assert torch.equal(biases[1], biases[0]) and torch.equal(biases[2], biases[0])


def test_dirac_init_starts_each_conv_as_an_identity():
    m = models.create_model("zoo_cnn_small", 3)
    recipe.dirac_init(m)
    conv = m.stages[0][0]  # 24 -> 32 channels
    x = torch.randn(1, 24, 8, 8)
    with torch.no_grad():
        y = torch.nn.functional.conv2d(x, conv.weight, padding=1)
    assert torch.allclose(y[:, :24], x)


def test_alternating_flip_mirrors_each_image_on_every_other_epoch():
    flip = augment.AlternatingFlip(seed=3)
    keys = [f"hash{i}" for i in range(200)]
    for epoch in range(4):
        flip.epoch = epoch
        now = [flip.flipped(k) for k in keys]
        flip.epoch = epoch + 1
        after = [flip.flipped(k) for k in keys]
        assert all(a != b for a, b in zip(now, after))  # once each way in two epochs
    flip.epoch = 0
    assert 60 < sum(flip.flipped(k) for k in keys) < 140  # a coin per image, not all alike


def test_the_loader_flips_training_images_only(demo_ws):
    cfg = TrainConfig(**TINY, flip="alternate")
    data, classes = prepare_data(demo_ws, cfg, progress=False)
    dls = make_dataloaders(demo_ws, data, classes, cfg, progress=False)
    loader, flip = dls.item_loader, dls.item_loader.flip
    for items, train_split in ((dls.train_ds.items, True), (dls.valid_ds.items, False)):
        for row in items[:20]:
            raw = loader.pixels(row)
            seen = []
            for epoch in (0, 1):
                flip.epoch = epoch
                seen.append(loader(row))
            if train_split:  # one epoch as it is, the other mirrored
                assert {np.array_equal(s, raw) for s in seen} == {True, False}
                assert any(np.array_equal(s, raw[:, ::-1]) for s in seen)
            else:
                assert all(np.array_equal(s, raw) for s in seen)


def test_lookahead_slow_weights_are_the_documented_average():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Lookahead(torch.optim.SGD([w], lr=0.1), alpha=1.0, k=5)
    alpha = recipe.lookahead_alpha(5, 20)
    for group in opt.param_groups:
        group["lookahead_alpha"] = alpha
    start = w.detach().clone()
    # the slow copy starts at the first update; set it to the start as airbench does
    opt._base_optimizer.state[w]["lookahead_slow_buff"] = start.clone()
    grads = [torch.tensor([0.5, 1.0]), torch.tensor([-1.0, 2.0]), torch.tensor([0.0, 1.0]),
             torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])]
    fast = start.clone()
    for g in grads:
        w.grad = g.clone()
        opt.step()
        fast -= 0.1 * g
    assert torch.allclose(w.detach(), start + alpha * (fast - start))
    assert recipe.lookahead_alpha(0, 20) == 1.0
    assert recipe.lookahead_alpha(10, 20) == pytest.approx(1 - 0.95 ** 5 * 0.5 ** 3)
    assert recipe.lookahead_alpha(20, 20) == pytest.approx(1 - 0.95 ** 5)


def test_triangle_shape():
    assert triangle(0.0) == pytest.approx(0.2)
    assert triangle(0.23) == pytest.approx(1.0)
    assert triangle(1.0) == pytest.approx(0.07)
    assert triangle(0.115) == pytest.approx(0.6)


def test_tta_views_are_the_documented_ones():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    views = inference.tta_views(x)
    assert [w for _, w in views] == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    assert sum(w for _, w in views) == 1.0
    assert torch.equal(views[0][0], x) and torch.equal(views[1][0], x.flip(3))
    up_left, down_right = views[2][0], views[4][0]
    assert torch.equal(up_left[..., :-1, :-1], x[..., 1:, 1:])  # moved one pixel up-left
    assert torch.equal(down_right[..., 1:, 1:], x[..., :-1, :-1])
    assert torch.equal(views[3][0], up_left.flip(3)) and torch.equal(views[5][0], down_right.flip(3))


def test_tta_predictions_are_the_weighted_average_of_the_views():
    model = models.create_model("zoo_cnn_small", 3).eval()
    with torch.no_grad():
        model.head.weight.mul_(1000)  # views that differ a little give logits that differ
    loaded = inference.Loaded("gen-x", model, {"classes": ["a", "b", "c"]},
                              torch.device("cpu"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expect = sum(w * model(v) for v, w in inference.tta_views(x))
    out = inference.outputs(loaded, x, tta=True)
    assert torch.allclose(out["logits"], expect, atol=1e-3)
    assert torch.allclose(out["probs"], expect.softmax(1), atol=1e-5)
    probs, _ = inference.forward(loaded, x, tta=True)
    assert torch.allclose(probs, expect.softmax(1), atol=1e-5)
    plain = inference.outputs(loaded, x)
    assert not torch.allclose(plain["logits"], expect, atol=1e-2)


class _Rates(Callback):
    """Each parameter group's learning rate at the first step of each epoch."""

    def __init__(self):
        self.rates = []

    def before_step(self):
        if self.iter == 0:
            self.rates.append([h["lr"] for h in self.learn.opt.hypers])


SGD = {**TINY, "optimizer": "sgd"}  # airbench94's groups: body, batch-norm biases, head


def test_batch_norm_biases_train_at_64x_from_scratch_warm_start_and_resume(demo_ws):
    first = _Rates()
    train(demo_ws, TrainConfig(**SGD), progress=False, extra_cbs=[first])
    for body, bias, head in first.rates:
        assert bias == pytest.approx(64 * body) and head == pytest.approx(body)
    warm = _Rates()
    r = train(demo_ws, TrainConfig(**{**SGD, "epochs": 3}, init_from="last",
                                   warm_schedule="fine_tune"), progress=False, extra_cbs=[warm])
    body, bias, head = warm.rates[-1]  # after the head-only epoch
    assert bias == pytest.approx(64 * body) and head == pytest.approx(3 * body)
    assert r.info["recipe"]["lr_per_group"][1] == pytest.approx(
        64 * r.info["recipe"]["lr_per_group"][0])


def test_resumed_run_keeps_the_bias_group(demo_ws):
    from tests.test_train import _InterruptAfter, _Stop

    cfg = TrainConfig(**{**TINY, "epochs": 3})  # muon: filters, body, biases, head
    with pytest.raises(_Stop):
        train(demo_ws, cfg, progress=False, extra_cbs=[_InterruptAfter(1)])
    rates = _Rates()
    train(demo_ws, cfg, progress=False, extra_cbs=[rates])
    assert len(rates.rates) == 2  # epochs 2 and 3 ran again, with the same groups
    for _, body, bias, _ in rates.rates:
        assert bias == pytest.approx(64 * body)


def test_muon_takes_the_conv_filters_and_nothing_else(demo_ws):
    class _Groups(Callback):
        def before_fit(self):
            self.groups = [(g["muon"], [p.dim() for p in g["params"]])
                           for g in self.learn.opt.opt.param_groups]

    grab = _Groups()
    train(demo_ws, TrainConfig(**{**TINY, "epochs": 1}), progress=False, extra_cbs=[grab])
    (muon, dims), *others = grab.groups
    assert muon and set(dims) == {4} and len(dims) == 6  # the six 3x3 convs, not the stem
    assert not any(m for m, _ in others)
    assert all(d < 4 for _, ds in others[:-1] for d in ds)


def test_model_json_records_the_resolved_recipe(trained_ws):
    info = models.read_info(trained_ws, "gen-0001")
    assert info["config"]["recipe"] == "airbench" and info["config"]["optimizer"] == "muon"
    assert info["schedule"]["kind"] == "triangle" and info["recipe"]["lookahead"]
    assert info["model_args"] == recipe.AIRBENCH_MODEL_ARGS
    model, _ = models.load_generation(trained_ws, "gen-0001")
    assert model.head.bias is None and model.head.scale == pytest.approx(1 / 9)


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_the_recipe_learns_a_separable_set(demo_ws, optimizer):
    r = train(demo_ws, TrainConfig(**{**TINY, "epochs": 4}, optimizer=optimizer), progress=False)
    chance = 1 / len(r.info["classes"])
    assert r.info["metrics"]["valid_accuracy"] > chance + 0.5


def test_orthogonalise_gives_singular_values_near_one():
    g = torch.randn(32, 72)
    s = torch.linalg.svdvals(orthogonalise(g, steps=5))
    assert 0.5 < s.min() and s.max() < 1.5


def test_muon_steps_keep_the_filter_norm_and_sgd_groups_plain():
    conv = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    bias = torch.nn.Parameter(torch.zeros(8))
    opt = MuonSGD([{"params": [conv], "muon": True, "lr": 0.1},
                   {"params": [bias], "lr": 0.5, "momentum": 0.0}])
    conv.grad, bias.grad = torch.randn_like(conv), torch.ones(8)
    opt.step()
    assert bias.detach().tolist() == [-0.5] * 8
    # renormalised to sqrt(8), then one step of norm about lr * sqrt(8)
    assert abs(conv.norm().item() - 8 ** 0.5) < 0.1 * 8 ** 0.5


def test_recipe_choices_are_checked():
    from zoolib.workspace import ZoolibError

    with pytest.raises(ZoolibError, match="RECIPE='airbench' trains a zoo_cnn"):
        TrainConfig(arch="resnet18", recipe="airbench").check()
    with pytest.raises(ZoolibError, match="SCHEDULE"):
        TrainConfig(schedule="cosine").check()
    assert TrainConfig(arch="resnet18").resolved().recipe == "classic"
    assert TrainConfig(arch="zoo_cnn").resolved().optimizer == "muon"
    assert TrainConfig(flip=True).resolved().flip == "alternate"
    assert TrainConfig(flip=False).resolved().flip == "none"


def test_validate_last_scores_the_last_epoch_only_and_trains_the_same(demo_ws, tmp_path):
    from zoolib import demo

    last = train(demo_ws, TrainConfig(**{**TINY, "epochs": 3}), progress=False)
    assert last.info["config"]["validate"] == "last"  # the airbench recipe's
    h = last.history
    assert h["valid_loss"].iloc[:2].isna().all() and h["accuracy"].iloc[:2].isna().all()
    assert h[["train_loss", "valid_loss", "accuracy"]].iloc[2].notna().all()
    assert np.isfinite(last.info["metrics"]["valid_accuracy"])
    other = demo.build(tmp_path / "every", seed=0)
    every = train(other, TrainConfig(**{**TINY, "epochs": 3}, validate="every"), progress=False)
    assert every.history[["valid_loss", "accuracy"]].notna().all().all()
    # the same weights: validating is not part of what a run computes
    a = models.load_generation(demo_ws, last.name)[0].state_dict()
    b = models.load_generation(other, every.name)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert every.history["valid_loss"].iloc[2] == pytest.approx(h["valid_loss"].iloc[2])


def test_the_plateau_schedule_needs_every_epoch_validated():
    from zoolib.workspace import ZoolibError

    with pytest.raises(ZoolibError, match="VALIDATE must be 'every'"):
        TrainConfig(schedule="plateau", validate="last").check()
    assert TrainConfig(arch="resnet18").resolved().validate == "every"
