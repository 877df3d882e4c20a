import pytest
import torch

from zoolib import models, warmstart
from zoolib.workspace import ZoolibError

PARENT = ["cat", "dog", "lion"]
CHILD = ["dog", "giraffe", "lion", "cat"]  # reordered and one added


def _save_parent(ws, arch="resnet18", classes=PARENT):
    torch.manual_seed(0)
    m = models.create_model(arch, len(classes))
    info = {"arch": arch, "img_size": 32, "mean": [0.5] * 3, "std": [0.2] * 3, "classes": classes}
    return m, models.save_generation(ws, m, info)


def test_round_trip_body_equal_head_new(demo_ws):
    parent, name = _save_parent(demo_ws)
    child, rec = warmstart.warm_start(demo_ws, name, "resnet18", CHILD)
    p, c = parent.state_dict(), child.state_dict()
    head = set(models.classifier_keys(child))
    assert head == {"fc.weight", "fc.bias"}
    for k in p:
        if k not in head:
            assert torch.equal(p[k], c[k]), k
    assert c["fc.weight"].shape == (4, 512)
    assert not torch.equal(c["fc.weight"][:3], p["fc.weight"])
    assert rec["parent"] == name and rec["head_init"] == "random"
    assert rec["transferred_tensors"] == len(p) - 2
    assert rec["classes_added"] == ["giraffe"] and rec["carried_classes"] == []


def test_shrink_and_perturb_scales_parameters_and_keeps_buffers(demo_ws):
    parent, name = _save_parent(demo_ws)
    torch.manual_seed(1)
    fresh = models.create_model("resnet18", len(CHILD)).state_dict()
    torch.manual_seed(1)  # the same random init inside warm_start
    child, rec = warmstart.warm_start(demo_ws, name, "resnet18", CHILD, shrink=0.5, perturb=0.1)
    p, c = parent.state_dict(), child.state_dict()
    assert torch.allclose(c["conv1.weight"], 0.5 * p["conv1.weight"] + 0.1 * fresh["conv1.weight"])
    assert torch.allclose(c["bn1.weight"], 0.5 * p["bn1.weight"] + 0.1 * fresh["bn1.weight"])
    assert torch.equal(c["bn1.running_var"], p["bn1.running_var"])  # a buffer: copied as is
    assert torch.equal(c["fc.weight"], fresh["fc.weight"])  # the new head is not shrunk
    assert (rec["shrink"], rec["perturb"]) == (0.5, 0.1)


def test_carry_rows_matched_by_name_not_index(demo_ws):
    parent, name = _save_parent(demo_ws)
    child, rec = warmstart.warm_start(demo_ws, name, "resnet18", CHILD, carry_rows=True)
    p, c = parent.state_dict(), child.state_dict()
    for cls in PARENT:
        for key in ("fc.weight", "fc.bias"):
            assert torch.equal(c[key][CHILD.index(cls)], p[key][PARENT.index(cls)]), cls
    giraffe = CHILD.index("giraffe")
    assert not any(torch.equal(c["fc.weight"][giraffe], row) for row in p["fc.weight"])
    assert sorted(rec["carried_classes"]) == sorted(PARENT)
    assert "carried for 3" in rec["head_init"]


def test_other_architecture_is_refused(demo_ws):
    _, name = _save_parent(demo_ws)
    with pytest.raises(ZoolibError, match="cannot warm-start a resnet34 from gen-0001.*resnet18"):
        warmstart.warm_start(demo_ws, name, "resnet34", CHILD)


def test_body_mismatch_names_keys():
    a = models.create_model("resnet18", 3)
    b = models.create_model("resnet34", 3)
    with pytest.raises(ZoolibError, match="keys missing from the parent: layer1.2"):
        warmstart.transfer_body(a, b)
    c = models.create_model("resnet18", 3)
    a.conv1 = torch.nn.Conv2d(3, 64, 5, 2, 2, bias=False)
    with pytest.raises(ZoolibError, match="another shape: conv1.weight"):
        warmstart.transfer_body(a, c)


def test_missing_parent(demo_ws):
    with pytest.raises(ZoolibError, match="'gen-0004' does not exist"):
        warmstart.warm_start(demo_ws, "gen-0004", "resnet18", CHILD)


class _Tiny(torch.nn.Module):
    """A conv body and a linear head, as a timm model presents them (get_classifier)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, bias=True)
        self.head = torch.nn.Linear(2, 2)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def test_dash_keeps_aligned_kernels_and_shrinks_orthogonal_ones_to_the_clamp(monkeypatch):
    model = _Tiny()
    w = model.conv.weight.detach().clone()
    direction = torch.zeros_like(w)  # the negative gradient, kernel by kernel:
    direction[0, 0] = w[0, 0]  # aligned: kept
    direction[0, 1] = -w[0, 1]  # opposed: clamped to lambda
    direction[1, 0] = torch.randn(3, 3)
    direction[1, 0] -= (direction[1, 0] * w[1, 0]).sum() / w[1, 0].pow(2).sum() * w[1, 0]  # orthogonal
    direction[1, 1] = w[1, 1] + 0.5 * w[1, 1].norm() * torch.randn(3, 3) / 3  # partly aligned
    bias_dir = model.conv.bias.detach().clone()
    monkeypatch.setattr(warmstart, "_mean_gradient", lambda m, params, batches: [
        -direction if p is model.conv.weight else -bias_dir for p in params])
    head = model.head.weight.detach().clone()
    assert warmstart.dash(model, [], lam=0.3) == 2  # conv weight and bias; the head is not
    out = model.conv.weight.detach()
    assert torch.allclose(out[0, 0], w[0, 0]) and torch.allclose(out[0, 1], 0.3 * w[0, 1])
    assert torch.allclose(out[1, 0], 0.3 * w[1, 0], atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(direction[1, 1].flatten(), w[1, 1].flatten(), 0)
    assert 0.3 < cos < 1 and torch.allclose(out[1, 1], cos * w[1, 1], atol=1e-6)
    assert torch.equal(model.head.weight, head)  # the fresh head is left as it is


def test_dash_gradient_is_the_mean_over_all_images_in_eval_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3),
                                torch.nn.Flatten(), torch.nn.Linear(12, 2))
    model.train()
    x, y = torch.randn(10, 2, 4, 4), torch.randint(0, 2, (10,))
    params = [model[0].weight]
    got = warmstart._mean_gradient(model, params, [(x[:4], y[:4]), (x[4:], y[4:])])[0]
    model.eval()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert torch.allclose(got, model[0].weight.grad, atol=1e-6)
    model.train()
    warmstart._mean_gradient(model, params, [(x, y)])
    assert model.training and model[0].weight.grad is None  # mode restored, no grads left


def test_dash_with_no_images_is_a_clear_error():
    with pytest.raises(ZoolibError, match="DASH needs training images"):
        warmstart._mean_gradient(_Tiny(), list(_Tiny().parameters()), [])
