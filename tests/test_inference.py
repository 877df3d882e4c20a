import sys

import numpy as np
import pytest
import torch
from PIL import Image

from zoolib import images, inference, neighbours
from zoolib.workspace import ZoolibError


def test_forward_matches_the_model_and_sums_to_one(trained_ws):
    loaded = inference.load(trained_ws, "last")
    files = sorted((trained_ws.library / "zebra").glob("zebra_00*.jpg"))[:4]
    batch = torch.stack([inference.to_tensor(images.load_rgb(f), loaded.info) for f in files])
    assert batch.shape == (4, 3, 32, 32)
    probs, emb = inference.forward(loaded, batch)
    assert probs.shape == (4, len(loaded.classes)) and emb.shape == (4, loaded.model.num_features)
    assert torch.allclose(probs.sum(1), torch.ones(4), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(loaded.model(batch).softmax(1), probs, atol=1e-5)
    # The model is fed channels-last memory on a CPU (oneDNN's faster layout).
    seen = []
    first_conv = next(m for m in loaded.model.modules() if isinstance(m, torch.nn.Conv2d))
    hook = first_conv.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    inference.forward(loaded, batch)
    hook.remove()
    assert batch.is_contiguous() and seen[0].is_contiguous(memory_format=torch.channels_last)


def test_to_tensor_normalises_with_model_json():
    info = {"img_size": 4, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
            "interpolation": "bilinear"}
    t = inference.to_tensor(Image.new("RGB", (10, 6), (255, 0, 127)), info)
    assert t.shape == (3, 4, 4)
    assert np.allclose(t[0].numpy(), 1.0) and np.allclose(t[1].numpy(), -1.0)


def test_load_rgb_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "o.jpg", exif=exif.tobytes())
    assert images.load_rgb(tmp_path / "o.jpg").size == (20, 40)
    grey16 = Image.new("I;16", (8, 8), 65535)
    grey16.save(tmp_path / "g.png")
    rgb = images.load_rgb(tmp_path / "g.png")
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0))[0] >= 254


def test_outputs_give_every_score_input_in_one_pass(trained_ws):
    loaded = inference.load(trained_ws, "last")
    batch = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = inference.outputs(loaded, batch, stage=True)
    assert list(out) == ["probs", "logits", "embedding", "stage"]
    assert torch.allclose(out["probs"], out["logits"].softmax(1))
    with torch.no_grad():
        _, stage = neighbours.features(loaded.model, batch)
    assert torch.allclose(out["stage"], stage, atol=1e-6)
    assert list(inference.outputs(loaded, batch)) == ["probs", "logits", "embedding"]


def test_unknown_runtimes_and_onnx_on_a_gpu_are_refused(trained_ws):
    with pytest.raises(ZoolibError, match="runtime must be one of 'torch', 'onnx'"):
        inference.load(trained_ws, runtime="tensorflow")
    with pytest.raises(ZoolibError, match="runs on the CPU only"):
        inference.load(trained_ws, device="cuda", runtime="onnx")
    assert inference.resolve_runtime(None, "cpu") == inference.default_runtime()
    assert inference.resolve_runtime(None, "cuda") == "torch"  # ONNX Runtime: CPU only here
    assert inference.load(trained_ws).runtime == "torch"  # other stages: torch unless asked


def test_the_default_cpu_runtime_is_onnx_where_installed(monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    assert inference.resolve_runtime(None, "cpu") == "onnx"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    assert inference.resolve_runtime(None, "cpu") == "torch"


def test_a_missing_onnx_package_says_how_to_install_it(trained_ws, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ZoolibError, match=r"needs the onnxruntime package.*pip install -e "
                                          r"'\.\[onnx\]'"):
        inference.load(trained_ws, runtime="onnx")
    assert not (trained_ws.models / "gen-0001" / "model.onnx").exists()
