"""The ONNX Runtime backend: export, parity of every output, refusal, bulkid and serving."""
import threading

import numpy as np
import pytest
import torch

from zoolib import (bulkid, evaluate, images, inference, library, models, onnx_export, serving,
                    splits, translog)
from zoolib.workspace import ZoolibError

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnx", reason="the onnx extra is not installed")


def library_batch(ws, loaded, n=6) -> torch.Tensor:
    """Real images of several classes, normalised as the model wants."""
    classes = sorted(p for p in ws.library.iterdir() if p.is_dir() and p.name != "Unknown")
    files = [sorted(c.glob("*.jpg"))[0] for c in classes][:n]
    return torch.stack([inference.to_tensor(images.load_rgb(f), loaded.info) for f in files])


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_export_matches_torch_on_every_output(trained_ws):
    torch_loaded = inference.load(trained_ws, "gen-0001", device="cpu")
    loaded = inference.load(trained_ws, "gen-0001", runtime="onnx")
    folder = trained_ws.models / "gen-0001"
    assert loaded.runtime == "onnx" and loaded.device.type == "cpu"
    assert (folder / onnx_export.FILE).is_file() and leftovers(folder) == []
    names = [o.name for o in loaded.onnx.session().get_outputs()]
    assert names == list(onnx_export.OUTPUTS)
    measured = onnx_export.differences(loaded.model, folder / onnx_export.FILE, loaded.info)
    assert set(measured) == set(onnx_export.OUTPUTS)
    assert max(measured.values()) <= onnx_export.PARITY_TOLERANCE
    # Real images, batch sizes other than the traced 2: the batch axis is dynamic.
    batch = library_batch(trained_ws, loaded)
    for n in (1, 3, len(batch)):
        ref = inference.outputs(torch_loaded, batch[:n], stage=True)
        got = inference.outputs(loaded, batch[:n], stage=True)
        assert set(got) == set(ref) == set(onnx_export.OUTPUTS)
        for key in onnx_export.OUTPUTS:
            assert got[key].shape == ref[key].shape, key
            assert torch.allclose(got[key], ref[key].float(), atol=1e-4, rtol=1e-4), key
    probs, emb = inference.forward(loaded, batch, tta=True)
    ref_probs, ref_emb = inference.forward(torch_loaded, batch, tta=True)
    assert (probs - ref_probs).abs().max() <= 1e-4
    assert torch.allclose(emb, ref_emb, atol=1e-4, rtol=1e-4)


def test_a_failed_parity_check_is_refused_and_keeps_no_file(trained_ws, monkeypatch):
    real_run = onnx_export.OnnxModel.run

    def off_by_a_bit(self, x, names=onnx_export.OUTPUTS):
        out = real_run(self, x, names)
        out["probs"] = out["probs"] + 3e-4  # as an exporter that rounds badly would
        return out

    monkeypatch.setattr(onnx_export.OnnxModel, "run", off_by_a_bit)
    with pytest.raises(ZoolibError, match=r"generation gen-0001 differs from PyTorch by "
                                          r"0\.0003\d* in 'probs'"):
        inference.load(trained_ws, "gen-0001", runtime="onnx")
    folder = trained_ws.models / "gen-0001"
    assert not (folder / onnx_export.FILE).exists() and leftovers(folder) == []
    monkeypatch.setattr(onnx_export.OnnxModel, "run", real_run)
    assert inference.load(trained_ws, "gen-0001", runtime="onnx").onnx is not None


def test_the_default_runtime_falls_back_to_torch_when_export_fails(trained_ws, monkeypatch):
    def refuses(*args, **kwargs):
        raise ZoolibError("gen-0001 differs from PyTorch")

    monkeypatch.setattr(onnx_export, "open_model", refuses)
    with pytest.warns(UserWarning, match="gen-0001 runs on torch: gen-0001 differs"):
        loaded = inference.load(trained_ws, "gen-0001", runtime=None)
    assert loaded.runtime == "torch" and loaded.onnx is None
    with pytest.raises(ZoolibError, match="differs from PyTorch"):  # asked for: an error
        inference.load(trained_ws, "gen-0001", runtime="onnx")


def test_concurrent_first_uses_export_once(trained_ws, monkeypatch):
    exports, real_export = [], onnx_export.export
    monkeypatch.setattr(onnx_export, "export",
                        lambda *a, **k: (exports.append(1), real_export(*a, **k)))
    loaded, errors = [], []
    start = threading.Barrier(4)

    def first_use():
        start.wait()
        try:
            loaded.append(inference.load(trained_ws, "gen-0001", runtime="onnx"))
        except Exception as exc:  # noqa: BLE001 - collected and asserted on
            errors.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(exports) == 1 and len(loaded) == 4
    x = onnx_export.sample(loaded[0].info, 2)
    first = inference.outputs(loaded[0], x)["probs"]
    assert all(torch.equal(inference.outputs(one, x)["probs"], first) for one in loaded)
    assert leftovers(trained_ws.models / "gen-0001") == []


def test_a_broken_export_is_exported_again(trained_ws, capsys):
    path = trained_ws.models / "gen-0001" / onnx_export.FILE
    path.write_bytes(b"not an onnx graph")
    loaded = inference.load(trained_ws, "gen-0001", runtime="onnx")
    assert "exporting it again" in capsys.readouterr().out
    assert path.stat().st_size > 10_000 and loaded.onnx.path == path


def test_the_session_follows_the_torch_thread_count(trained_ws):
    loaded = inference.load(trained_ws, "gen-0001", runtime="onnx")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loaded.onnx.session()
    finally:
        torch.set_num_threads(threads)
    assert one.get_session_options().intra_op_num_threads == 1
    opts = loaded.onnx.session().get_session_options()
    assert opts.intra_op_num_threads == threads
    assert opts.execution_mode.name == "ORT_SEQUENTIAL"


def test_int8_is_measured_on_the_test_split_and_recorded(trained_ws, capsys):
    loaded = inference.load(trained_ws, "gen-0001", runtime="onnx-int8")
    folder = trained_ws.models / "gen-0001"
    assert loaded.onnx.path == folder / onnx_export.INT8_FILE
    assert (folder / onnx_export.FILE).is_file() and leftovers(folder) == []
    # the float graph's accuracy there is the torch model's on the same rows
    rows = splits.test_rows(trained_ws, "gen-0001", library.scan(trained_ws, progress=False),
                              loaded.classes)
    predicted = evaluate.predict_rows(trained_ws, "gen-0001", rows)
    torch_acc = (predicted["pred"] == rows["label"]).mean()
    record = models.read_info(trained_ws, "gen-0001")["int8"]
    assert record["test_images"] == len(rows) > 0
    assert record["accuracy_float"] == round(float(torch_acc), 4)
    assert record["accuracy_float"] - record["accuracy_int8"] < onnx_export.INT8_MAX_DROP / 100
    assert f"{len(rows)} test images" in capsys.readouterr().out
    probs, emb = inference.forward(loaded, library_batch(trained_ws, loaded))
    assert torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-4)
    assert emb.shape == (len(probs), loaded.model.num_features)


def test_int8_that_costs_accuracy_is_refused(trained_ws, monkeypatch):
    monkeypatch.setattr(onnx_export, "int8_accuracies", lambda *a, **k: (0.900, 0.895, 200))
    with pytest.raises(ZoolibError, match=r"200 test images: 0\.9000 float, 0\.8950 int8, a "
                                          r"drop of 0\.50 points; at most 0\.5 allowed"):
        inference.load(trained_ws, "gen-0001", runtime="onnx-int8")
    folder = trained_ws.models / "gen-0001"
    assert not (folder / onnx_export.INT8_FILE).exists() and leftovers(folder) == []
    assert "int8" not in models.read_info(trained_ws, "gen-0001")


def test_bulkid_onnx_gives_the_rows_of_torch(trained_ws):
    ref = bulkid.run(trained_ws, "gen-0001", name="t", num_workers=0, progress=False,
                     runtime="torch").set_index("path")
    got = bulkid.run(trained_ws, "gen-0001", name="o", num_workers=0, progress=False,
                     runtime="onnx").set_index("path").loc[ref.index]
    assert list(got["error"]) == list(ref["error"])
    ok = ref["error"] == ""
    assert ok.sum() > 100
    assert (got.loc[ok, "pred"] == ref.loc[ok, "pred"]).all()
    for column in ["confidence", "margin", "entropy", "ood", "knn"]:
        diff = (got.loc[ok, column] - ref.loc[ok, column]).abs().max()
        assert diff <= 1e-4, (column, diff)
    probs = np.abs(np.stack(got.loc[ok, "top5_prob"]) - np.stack(ref.loc[ok, "top5_prob"]))
    assert probs.max() <= 1e-4
    emb_got = np.stack(got.loc[ok, "embedding"]).astype(np.float32)
    emb_ref = np.stack(ref.loc[ok, "embedding"]).astype(np.float32)
    # float16 storage: one rounding step of the larger values at most
    assert np.allclose(emb_got, emb_ref, rtol=2e-3, atol=1e-3)


def test_predictor_with_onnx_answers_as_torch(trained_ws):
    files = sorted(trained_ws.inbox.rglob("img_*.jpg"))[:4]
    by_torch = serving.Predictor(trained_ws, generation="gen-0001", runtime="torch")
    by_onnx = serving.Predictor(trained_ws, generation="gen-0001", runtime="onnx")
    try:
        assert by_onnx.runtime == "onnx" and by_onnx._loaded.onnx is not None
        for path in files:
            a, b = by_torch.predict(path), by_onnx.predict(path, source="onnx")
            assert (a.predicted, a.image_hash) == (b.predicted, b.image_hash)
            assert a.confidence == pytest.approx(b.confidence, abs=1e-4)
    finally:
        by_torch.close()
        by_onnx.close()
    tx = translog.transactions(trained_ws)
    assert len(tx) == 8 and (tx["source"] == "onnx").sum() == 4


def _copy_of_gen_0001(ws) -> str:
    """gen-0002: gen-0001 with other weights (the head scaled), as a new generation."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(ws.models / "gen-0001", ws.models / "gen-0002")
    info_path = ws.models / "gen-0002" / "model.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "name": "gen-0002"}))
    weights = ws.models / "gen-0002" / "weights.safetensors"
    state = load_file(weights)
    head = next(k for k in state if k.startswith("head.") and k.endswith("weight"))
    state[head] = state[head].flip(0)  # the classes' rows swapped: other answers
    save_file(state, weights)
    for name in (onnx_export.FILE, onnx_export.INT8_FILE):
        (ws.models / "gen-0002" / name).unlink(missing_ok=True)
    return "gen-0002"


def test_a_graph_copied_from_another_generation_is_exported_again(trained_ws, capsys):
    """The graph carries a digest of the weights it was made from: gen-0001's graph
    copied into gen-0002 must not answer for gen-0002."""
    inference.load(trained_ws, "gen-0001", runtime="onnx")
    name = _copy_of_gen_0001(trained_ws)
    (trained_ws.models / name / onnx_export.FILE).write_bytes(
        (trained_ws.models / "gen-0001" / onnx_export.FILE).read_bytes())
    capsys.readouterr()
    loaded = inference.load(trained_ws, name, runtime="onnx")
    assert "not exported from this generation's weights" in capsys.readouterr().out
    torch_loaded = inference.load(trained_ws, name, device="cpu")
    x = library_batch(trained_ws, torch_loaded)
    assert torch.allclose(inference.outputs(loaded, x)["probs"],
                          inference.outputs(torch_loaded, x)["probs"], atol=1e-4)


def test_an_int8_graph_without_its_accuracy_record_is_not_used(trained_ws, capsys):
    inference.load(trained_ws, "gen-0001", runtime="onnx-int8")
    models.update_info(trained_ws, "gen-0001", int8=None)  # the record lost (a hand edit)
    capsys.readouterr()
    inference.load(trained_ws, "gen-0001", runtime="onnx-int8")
    assert "no int8 accuracy record" in capsys.readouterr().out
    assert models.read_info(trained_ws, "gen-0001")["int8"]["test_images"] > 0  # measured again
