import pytest
import timm
import torch

from zoolib import models, recipe, warmstart


def test_zoo_cnn_is_a_timm_model_at_any_small_size():
    assert timm.is_model("zoo_cnn") and timm.is_model("zoo_cnn_small")
    m = models.create_model("zoo_cnn", 5).eval()
    assert models.classifier_keys(m) == ["head.weight", "head.bias"]
    for size in (32, 48, 64, 96):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            feats = m.forward_head(m.forward_features(x), pre_logits=True)
            assert feats.shape == (2, 256) and m(x).shape == (2, 5)
            assert torch.allclose(m.get_classifier()(feats), m(x), atol=1e-6)


def test_zoo_cnn_reset_classifier_and_warm_start_transfer():
    parent, child = models.create_model("zoo_cnn_small", 5), models.create_model("zoo_cnn_small", 6)
    copied = warmstart.transfer_body(parent, child)
    assert "head.weight" not in copied and len(copied) == len(parent.state_dict()) - 2
    for k in copied:
        assert torch.equal(parent.state_dict()[k], child.state_dict()[k])
    child.reset_classifier(3)
    assert child.get_classifier().out_features == 3 and child.num_classes == 3


def test_zoo_cnn_has_no_pretrained_weights_to_download():
    cfg = timm.create_model("zoo_cnn", num_classes=2).pretrained_cfg
    assert not cfg.get("url") and not cfg.get("hf_hub_id")
    assert cfg["classifier"] == "head" and cfg["first_conv"] == "stem.0"


@pytest.mark.parametrize("arch", ["zoo_cnn_small", "resnet18", "inception_v4"])
def test_split_groups_gives_the_output_layer_its_own_group(arch):
    m = models.create_model(arch, 4)
    body, head = recipe.split_groups(m, bias_group=False)
    assert {id(p) for p in head} == {id(p) for p in m.get_classifier().parameters()}
    assert len(body) + len(head) == len(list(m.parameters())) and body


def test_zoo_cnn_gives_its_stage_maps_as_timm_models_do():
    m = models.create_model("zoo_cnn_small", 3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        last, maps = m.forward_intermediates(x, indices=2)
        assert [t.shape[1] for t in maps] == [64, 128] and torch.equal(last, m.forward_features(x))
        assert len(m.forward_intermediates(x, intermediates_only=True)) == 3
