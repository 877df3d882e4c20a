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
