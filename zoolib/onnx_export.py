"""A generation exported to ONNX, checked against PyTorch, and run by ONNX Runtime.

The graph is written once per generation, beside its weights, on first use:
`models/<gen>/model.onnx` (and `model.int8.onnx` for the dynamically quantised
variant). It is a derived file: deleting it only costs a new export.

- What it computes: `heads.Heads`, the same module the torch runtime runs,
  so both runtimes give the same four outputs (OUTPUTS): class probabilities,
  logits (the energy score), the pre-logit embedding ("more like this") and the
  pooled stage features of the knn score (`heads.features`). The batch
  axis is dynamic.
- How: PyTorch's TorchScript exporter (`torch.onnx.export(dynamo=False)`); it
  needs the `onnx` package but not onnxscript, keeping the `onnx` extra small.
- Checked: before the file is kept, ONNX Runtime runs it on SAMPLE_SIZE
  deterministic random normalised images and every output is compared with
  PyTorch's; a difference over PARITY_TOLERANCE (probabilities: max abs; the
  others: max abs over their largest magnitude, at least 1) is a ZoolibError
  and no file is left. The graph is traced on 2 images and checked on 8, so a
  batch size baked into the trace is caught too.
- Written with `write_atomic` under a file lock (`.model.onnx.lock`): a
  concurrent first use in another thread or process waits for the export and
  uses it; a killed export leaves no half file.
- The int8 variant (`quantize_dynamic`, int8 weights, activations quantised at
  run time) is not held to the tolerance but to accuracy: at export the float
  and the int8 graph predict the generation's own test split, and the int8 file
  is kept only if it loses less than INT8_MAX_DROP points (both figures go to
  model.json as `int8`); a generation without test images cannot be quantised.
"""
from __future__ import annotations

import hashlib
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from . import library, splits
from .heads import Heads
from .models import update_info
from .preprocess import file_batches
from .workspace import Workspace, ZoolibError, file_lock, write_atomic

if TYPE_CHECKING:
    import onnxruntime

FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INPUT = "input"
OUTPUTS = ("probs", "logits", "embedding", "stage")
PARITY_TOLERANCE = 1e-4
SAMPLE_SIZE = 8
OPSET = 17
INT8_MAX_DROP = 0.5  # test accuracy points the int8 graph may lose against the float one
DIGEST_KEY = "zoolib.weights"  # graph metadata: a digest of the weights it was exported from
# ONNX Runtime's threads busy-wait for work between runs by default. Off: between
# forward passes the same cores decode images (bulkid without workers, serving's
# decode threads), and spinning threads would take their time.
SPIN = False
INSTALL = "pip install -e '.[onnx]' (in the zoolib checkout), or pip install onnxruntime onnx"



def require() -> None:
    """Check that onnxruntime and onnx can be imported.

    Raises:
        ZoolibError: one is missing, with the command that installs them.
    """
    for package in ("onnxruntime", "onnx"):
        try:
            __import__(package)
        except ImportError as exc:
            raise ZoolibError(f"runtime='onnx' needs the {package} package, which is not "
                              f"installed ({exc}): {INSTALL}; or use runtime='torch'") from exc


class OnnxModel:
    """A generation's exported graph and its ONNX Runtime sessions.

    One session per intra-op thread count, made when first needed: the count
    follows `torch.get_num_threads()` at each run (bulk identification lowers it
    while decoding workers share the cores).

    Args:
        path: the .onnx file.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._sessions: dict[int, onnxruntime.InferenceSession] = {}
        self._lock = threading.Lock()

    def session(self) -> onnxruntime.InferenceSession:
        """The session for the current torch thread count (made on first use)."""
        threads = torch.get_num_threads()
        with self._lock:
            if threads not in self._sessions:
                self._sessions[threads] = new_session(self.path, threads)
            return self._sessions[threads]

    def run(self, x: torch.Tensor, names: tuple[str, ...] = OUTPUTS) -> dict[str, torch.Tensor]:
        """The named outputs for a normalised NCHW float32 batch, as CPU tensors."""
        # ONNX Runtime reads C-contiguous memory: a channels-last batch is copied once.
        feed = {INPUT: np.ascontiguousarray(x.detach().cpu().float().numpy())}
        values = self.session().run(list(names), feed)
        return {n: torch.from_numpy(v) for n, v in zip(names, values)}


def new_session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session: `threads` intra-op threads, operators in sequence.

    Raises:
        ZoolibError: the file cannot be loaded (naming it).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if SPIN else "0")
    opts.log_severity_level = 3  # errors only: its warnings are about the graph, not the user
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own error types
        raise ZoolibError(f"{path} cannot be loaded by ONNX Runtime "
                          f"({type(exc).__name__}: {exc})") from exc


def open_model(ws: Workspace, name: str, model: torch.nn.Module, info: dict,
               int8: bool = False) -> OnnxModel:
    """The generation's ONNX graph, exported and checked first if it is missing.

    A file that ONNX Runtime cannot load, or whose input and outputs are not
    those this version of zoolib exports (an older export), is exported again.

    Args:
        ws: the workspace.
        name: the generation.
        model: its torch model (eval mode, on the CPU).
        info: its model.json.
        int8: the dynamically quantised variant (model.int8.onnx).

    Raises:
        ZoolibError: onnxruntime or onnx is missing; the export fails or differs
            from PyTorch by more than PARITY_TOLERANCE; int8 loses INT8_MAX_DROP
            test accuracy points or more, or has no test image to be measured
            on (no file is left).
    """
    require()
    folder = ws.models / name
    digest = weights_digest(folder)
    graph = _ensure(folder / FILE, info, digest,
                    lambda p: _write_checked(p, model, info, name, digest))
    if not int8:
        return graph
    return _ensure(folder / INT8_FILE, info, digest,
                   lambda p: _write_int8(ws, folder / FILE, p, info, name, digest))


def weights_digest(folder: Path) -> str:
    """A digest of a generation's weights file: what its graphs must have been made from."""
    h = hashlib.blake2b(digest_size=16)
    with open(folder / "weights.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path, digest: str) -> None:
    """Record `digest` in the graph's metadata (read back by `_existing`)."""
    import onnx

    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    graph.metadata_props.add(key=DIGEST_KEY, value=digest)
    onnx.save(graph, str(path))


def _ensure(path: Path, info: dict, digest: str, write: Callable[[Path], None]) -> OnnxModel:
    """The graph at `path` with its first session, written by `write` when missing or
    stale, one writer at a time (`workspace.file_lock`)."""
    with file_lock(path.with_name(f".{path.name}.lock")):
        found = _existing(path, info, digest)
        if found is not None:
            return found
        write(path)
        onnx_model = OnnxModel(path)
        onnx_model.session()  # load now: a broken file fails at load, not mid-run
        return onnx_model


def _existing(path: Path, info: dict, digest: str) -> OnnxModel | None:
    """The graph at `path` if it was exported from these weights (`weights_digest` in
    its metadata), has the expected input and outputs (one probability per class)
    and, for the int8 graph, its accuracy record in model.json; a stale, foreign or
    broken one is removed (it is derived: exported again from the weights)."""
    if not path.exists():
        return None
    onnx_model = OnnxModel(path)
    try:
        session = onnx_model.session()
    except ZoolibError as exc:
        problem = str(exc)
    else:
        problem = _problem(session, info, digest, int8=path.name == INT8_FILE)
        if problem is None:
            return onnx_model
    print(f"{path}: {problem}; exporting it again")
    path.unlink()
    return None


def _problem(session, info: dict, digest: str, int8: bool) -> str | None:
    """Why a loaded graph is not this generation's current one, or None."""
    inputs, size = session.get_inputs(), int(info["img_size"])
    outputs = session.get_outputs()
    if not (len(inputs) == 1 and inputs[0].name == INPUT
            and list(inputs[0].shape[1:]) == [3, size, size]
            and tuple(o.name for o in outputs) == OUTPUTS):
        return "its input or outputs are not those this zoolib exports"
    if outputs[0].shape[1] != len(info["classes"]):
        return (f"it gives {outputs[0].shape[1]} class probabilities, the generation has "
                f"{len(info['classes'])} classes")
    found = session.get_modelmeta().custom_metadata_map.get(DIGEST_KEY)
    if found != digest:
        return ("it was not exported from this generation's weights.safetensors "
                f"({'another digest' if found else 'no digest'} in its metadata)")
    if int8 and not info.get("int8"):
        return "model.json has no int8 accuracy record for it"
    return None


def sample(info: dict, n: int = SAMPLE_SIZE) -> torch.Tensor:
    """`n` deterministic random normalised images at the generation's input size."""
    size = int(info["img_size"])
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def export(model: torch.nn.Module, info: dict, path: str | Path) -> None:
    """Write `heads.Heads(model)` as an ONNX graph with a dynamic batch axis (unchecked)."""
    heads = Heads(model.cpu().eval(), stage=True).eval()
    axes = {k: {0: "batch"} for k in (INPUT, *OUTPUTS)}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of dynamo, which needs
        # onnxscript; it still exports timm's CNNs exactly (checked by parity).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(heads, (sample(info, 2),), str(path), dynamo=False,
                          input_names=[INPUT], output_names=list(OUTPUTS), dynamic_axes=axes,
                          opset_version=OPSET, do_constant_folding=True)


@torch.inference_mode()
def differences(model: torch.nn.Module, path: str | Path, info: dict
                ) -> dict[str, float]:
    """Per output, how far ONNX Runtime's values are from PyTorch's on `sample(info)`.

    Probabilities: the max absolute difference. The other outputs: the max
    absolute difference over max(1, the largest magnitude of PyTorch's values),
    as their scale is the model's own.
    """
    x = sample(info)
    ref = dict(zip(OUTPUTS, Heads(model.cpu().eval(), stage=True)(x)))
    got = OnnxModel(Path(path)).run(x)
    out = {}
    for name in OUTPUTS:
        diff = float((got[name].float() - ref[name].float()).abs().max())
        scale = 1.0 if name == "probs" else max(1.0, float(ref[name].abs().max()))
        out[name] = diff / scale
    return out


def _write_checked(path: Path, model: torch.nn.Module, info: dict, name: str,
                   digest: str) -> None:
    """Export to a temporary file, check parity there, and only then rename it into place."""

    def write(tmp: Path) -> None:
        try:
            export(model, info, tmp)
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types
            raise ZoolibError(f"cannot export generation {name} ({info.get('arch')}) to "
                              f"ONNX: {type(exc).__name__}: {exc}; use runtime='torch'") from exc
        measured = differences(model, tmp, info)
        worst = max(measured, key=measured.get)
        if measured[worst] > PARITY_TOLERANCE:
            raise ZoolibError(
                f"the ONNX export of generation {name} differs from PyTorch by "
                f"{measured[worst]:.3g} in {worst!r} on {SAMPLE_SIZE} sample images (tolerance "
                f"{PARITY_TOLERANCE:g}; all outputs: {_format(measured)}); {path.name} was not "
                "kept: use runtime='torch' for this generation")
        _stamp(tmp, digest)
        print(f"exported {name} to {path} (largest difference from PyTorch on {SAMPLE_SIZE} "
              f"sample images: {_format(measured)})")

    write_atomic(path, write=write)


def _write_int8(ws: Workspace, source: Path, path: Path, info: dict, name: str,
                digest: str) -> None:
    """Quantise the checked float graph into `path`, kept only if it loses less than
    INT8_MAX_DROP accuracy points on the generation's test split."""

    def write(tmp: Path) -> None:
        quantise(source, tmp, name)
        _stamp(tmp, digest)
        full, int8, n = int8_accuracies(ws, name, info, source, tmp)
        drop = 100 * (full - int8)
        measured = (f"{n} test images: {full:.4f} float, {int8:.4f} int8, a drop of "
                    f"{drop:.2f} points")
        if drop >= INT8_MAX_DROP:
            raise ZoolibError(f"int8 quantisation of generation {name} costs accuracy ({measured}"
                              f"; at most {INT8_MAX_DROP} allowed): {path.name} was not kept; "
                              "use runtime='onnx'")
        record = {"test_images": n, "accuracy_float": round(full, 4),
                  "accuracy_int8": round(int8, 4)}
        update_info(ws, name, int8=record)
        info["int8"] = record
        print(f"quantised {name} to {path} (int8; {measured})")

    write_atomic(path, write=write)


def quantise(source: Path, dest: Path, name: str) -> None:
    """Dynamic int8 quantisation (int8 weights, activations at run time) of a float graph.

    Raises:
        ZoolibError: the quantiser fails (naming the generation).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Pre-processing folds the Identity nodes the exporter puts in front of shared
    # weights; the quantiser refuses a Conv whose weight is not an initializer.
    # (A name of write_atomic's pattern: a killed process's leftover is recognised.)
    pre = dest.with_name(dest.name.replace(".onnx", ".pre.onnx", 1))
    try:
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(str(pre), str(dest), weight_type=QuantType.QInt8)
    except Exception as exc:  # noqa: BLE001 - the quantiser raises many types
        raise ZoolibError(f"cannot quantise generation {name} to int8: "
                          f"{type(exc).__name__}: {exc}; use runtime='onnx'") from exc
    finally:
        pre.unlink(missing_ok=True)


def int8_accuracies(ws: Workspace, name: str, info: dict, float_path: Path, int8_path: Path,
                    batch_size: int = 64) -> tuple[float, float, int]:
    """Accuracy of two graphs on the generation's own test split, and its size.

    Raises:
        ZoolibError: the generation has no test image in today's library.
    """
    rows = splits.test_rows(ws, name, library.scan(ws, progress=False), info["classes"])
    if rows.empty:
        raise ZoolibError(f"generation {name} has no test image to measure int8's accuracy "
                          "on: use runtime='onnx'")
    labels = rows["label"].map(info["classes"].index).to_numpy()
    graphs = [OnnxModel(float_path), OnnxModel(int8_path)]
    right = [0, 0]
    for n, x in enumerate(file_batches(ws.library, rows["path"], info, batch_size)):
        start = n * batch_size
        for i, graph in enumerate(graphs):
            pred = graph.run(x, ("probs",))["probs"].argmax(1).numpy()
            right[i] += int((pred == labels[start:start + batch_size]).sum())
    return right[0] / len(rows), right[1] / len(rows), len(rows)


def _format(measured: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2g}" for k, v in measured.items())
