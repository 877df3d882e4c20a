"""The Predictor: one image in, one logged prediction out, with the deployed generation."""
from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import anyio
import anyio.to_thread
import torch
from PIL import Image, ImageOps

from .. import inference, models, translog
from ..images import UnreadableImageError, content_hash, open_image, to_rgb
from ..workspace import Workspace, ZoolibError, open_workspace, write_atomic
from .batching import (BATCH_WINDOW_MS, DECODE_PIXELS, MAX_BATCH, MAX_PIXELS, Batcher, PixelBudget,
                       positive)

log = logging.getLogger("zoolib.serving")
MAX_BYTES = 10 * 2**20  # largest upload accepted over HTTP


class ImageTooLargeError(ZoolibError):
    """An upload or an image's pixel count exceeds the server's limit."""


@dataclass
class Prediction:
    """One served prediction.

    Attributes:
        transaction_id: the log row (None when logging is off).
        generation: the generation that answered.
        predicted: the most likely class.
        confidence: its probability.
        top5: up to five (class, probability) pairs, most likely first.
        latency_ms: decode + inference time.
        image_hash: content hash of the image.
        time: when it was served (UTC, ISO 8601).
    """

    transaction_id: int | None
    generation: str
    predicted: str
    confidence: float
    top5: list[tuple[str, float]]
    latency_ms: float
    image_hash: str
    time: str

    def as_dict(self) -> dict:
        """A JSON-ready dict (top5 as a list of {class, p})."""
        out = asdict(self)
        out["top5"] = [{"class": c, "p": p} for c, p in self.top5]
        return out



def _as_input(image) -> bytes | Image.Image:
    """A path, bytes or PIL image -> the file's bytes, or the PIL image itself."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ZoolibError(f"image file {path} does not exist")
        image = path.read_bytes()
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise ZoolibError(f"cannot predict a {type(image).__name__}: give a path, bytes or a "
                          "PIL image")
    data = bytes(image)
    if not data:
        raise ZoolibError("not a readable image: empty (0 bytes)")
    return data


def _header(data: bytes, max_pixels: int) -> tuple[int, str]:
    """An image file's pixel count and format ("jpeg", "png", ...) from its header alone.

    Raises:
        ImageTooLargeError: more than `max_pixels`, or Pillow's decompression-bomb limit.
        ZoolibError: not an image Pillow can open.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_image(io.BytesIO(data)) as probe:  # header only; says what a non-image is
                (width, height), fmt = probe.size, (probe.format or "img").lower()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image refused as a decompression bomb: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "not an image"
        raise ZoolibError(f"not a readable image: {type(exc).__name__}: {exc}") from exc
    if width * height > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} pixels, more than the "
                                 f"limit of {max_pixels} (a decompression bomb?)")
    return width * height, fmt


def _decode(image: bytes | Image.Image, info: dict) -> tuple[torch.Tensor, bytes]:
    """The model's input (as `inference.file_tensor`, the decode path of training)
    and the bytes to hash and keep.

    A PIL image has no file bytes: its upright pixels are hashed and kept as a PNG.
    """
    if isinstance(image, Image.Image):
        rgb = to_rgb(ImageOps.exif_transpose(image))  # every mode, as files get
        buf = io.BytesIO()
        rgb.save(buf, "PNG")
        return inference.to_tensor(rgb, info), buf.getvalue()
    try:
        return inference.file_tensor(image, info), image
    except UnreadableImageError as exc:
        raise ZoolibError(str(exc)) from exc



@dataclass
class _Request:
    """A decoded request on its way through the predictor."""

    loaded: inference.Loaded
    batch: torch.Tensor
    data: bytes
    digest: str
    suffix: str
    start: float


class Predictor:
    """Predict single images with the deployed generation, logging each call.

    Calls made at the same time (from threads, or the HTTP server's requests)
    are batched: each decodes its own image, then waits for one forward pass
    shared with the others waiting (`Batcher`), then logs its own row. A call
    alone runs at once.

    Args:
        workspace: the workspace (path or opened).
        generation: serve this generation and ignore deployed.json; by default
            the deployed one is served and redeployments are followed.
        log: write a transaction row per call (off only for benchmarks).
        keep_images: keep each image under `served/` by hash, for review.
        source: default caller tag stored with each row.
        device: torch device ("cpu", "cuda"); auto by default.
        max_pixels: larger images are refused.
        clock: returns the current UTC time (a simulation may pass its own).
        log_timeout: seconds a log write waits for a lock before failing.
        decode_pixels: pixels all calls together may decode at once (see
            `PixelBudget`); calls beyond it wait.
        runtime: "torch", "onnx" or "onnx-int8" (`inference.RUNTIMES`); None =
            `inference.default_runtime()`: onnx where installed, else torch
            (torch on a GPU). Redeployed generations load with the same runtime.
        max_batch: most calls answered by one forward pass.
        batch_window_ms: longest a call waits for others to share its pass,
            only while others are decoding (0 = batch only what already waits).

    Raises:
        ZoolibError: nothing is deployed and no generation was given, a limit
            is not a positive integer, or the runtime is unknown or cannot load.
    """

    def __init__(self, workspace, generation: str | None = None, log: bool = True,
                 keep_images: bool = True, source: str = "python", device: str | None = None,
                 max_pixels: int = MAX_PIXELS, clock: Callable[[], datetime] = translog.now,
                 log_timeout: float = 30.0, decode_pixels: int = DECODE_PIXELS,
                 runtime: str | None = None, max_batch: int = MAX_BATCH,
                 batch_window_ms: float = BATCH_WINDOW_MS):
        self.ws: Workspace = open_workspace(workspace)
        self.pinned = generation is not None
        self.keep_images, self.source, self.device = keep_images, source, device
        self.runtime = runtime if runtime is None else inference.resolve_runtime(runtime, device)
        self.max_pixels, self.clock = positive(max_pixels, "max_pixels"), clock
        self.decoding = PixelBudget(decode_pixels)
        self.batcher = Batcher(max_batch, batch_window_ms)
        self._swap = threading.Lock()
        self._key = self._deploy_key()
        self._deploy_error: str | None = None
        if generation is None:
            generation = self._read_deployed()
        self._deployed = None if self.pinned else generation
        self._loaded = inference.load(self.ws, generation, device, runtime=self.runtime)
        self._writer = translog.Writer(self.ws, log_timeout) if log else None

    @property
    def generation(self) -> str:
        """The generation serving now (after picking up a new deployment)."""
        return self._current().name

    @property
    def classes(self) -> list[str]:
        return self._current().classes

    def status(self) -> dict:
        """How serving stands, after picking up a new deployment.

        Returns:
            {"status": "ok" or "degraded", "generation": the one serving,
            "deployed": the one deployed.json names (None when it names none or
            cannot be read), "deploy_error": why the deployed one is not serving
            (None when fine), "pinned": whether deployed.json is ignored}.
            "degraded" means deployed.json changed to something that could not be
            loaded (or was removed) and the previous generation still answers.
        """
        served = self.generation
        if self.pinned:
            try:
                deployed = self._read_deployed()
            except Exception:  # noqa: BLE001 - a pinned server does not depend on it
                deployed = None
            return {"status": "ok", "generation": served, "deployed": deployed,
                    "deploy_error": None, "pinned": True}
        error = self._deploy_error
        return {"status": "degraded" if error else "ok", "generation": served,
                "deployed": self._deployed, "deploy_error": error, "pinned": False}
    def _read_deployed(self) -> str:
        """The generation deployed.json names.

        Raises:
            ZoolibError: there is no deployed.json, or it names a throw-away generation
                (`models.write_deployed` refuses those; a hand edit must not serve one).
            Exception: it is not the JSON object `models.write_deployed` writes.
        """
        record = models.read_deployed(self.ws)
        if record is None:
            raise ZoolibError(f"no generation is deployed in {self.ws.models} (no "
                              "deployed.json): deploy one with models.write_deployed or "
                              "pass generation=")
        name = record["generation"]
        if models.read_info(self.ws, name).get("throwaway"):
            raise ZoolibError(f"{self.ws.deployed_json} names {name}, a throw-away generation, "
                              "which is never served: deploy a real one")
        return name

    def _deploy_key(self):
        try:
            st = os.stat(self.ws.deployed_json)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _current(self) -> inference.Loaded:
        """The model to use; reloads once per change of deployed.json.

        Only one thread swaps; the others keep answering with the old model
        meanwhile, so no request waits for or fails on a redeployment.
        """
        if self.pinned:
            return self._loaded
        key = self._deploy_key()
        if key != self._key and self._swap.acquire(blocking=False):
            try:
                self._follow(key)
            finally:
                self._swap.release()
        return self._loaded

    def _follow(self, key) -> None:
        """Serve what deployed.json now names; when that fails, keep serving and say why.

        The failure stands until deployed.json changes again (a redeployment retries).
        """
        if key == self._key:
            return
        name = None
        try:
            name = self._deployed = self._read_deployed()
            if name != self._loaded.name:
                self._loaded = inference.load(self.ws, name, self.device, runtime=self.runtime)
                log.info("now serving %s", name)
            self._deploy_error = None
        except Exception as exc:  # noqa: BLE001 - a bad deployment must not stop serving
            if name is None:
                self._deployed = None
            what = f"the deployment of {name}" if name else "models/deployed.json"
            self._deploy_error = (f"cannot load {what}: {type(exc).__name__}: {exc}; "
                                  f"still serving {self._loaded.name}")
            log.error("%s", self._deploy_error)
        self._key = key

    def _keep(self, digest: str, data: bytes, suffix: str) -> str:
        """Store the image once per content hash; return its workspace-relative path."""
        path = translog.served_images(self.ws) / digest[:2] / f"{digest}{suffix}"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
        return path.relative_to(self.ws.root).as_posix()

    def _prepare(self, image, start: float) -> _Request:
        """Decode one image into the model's input, within the decode budget.

        The full-size decode is the big allocation of a request: it happens, and
        is dropped, while the image's pixels are held in the budget.
        """
        image = _as_input(image)
        loaded = self._current()
        if isinstance(image, Image.Image):
            pixels, fmt = image.width * image.height, "png"
        else:
            pixels, fmt = _header(image, self.max_pixels)
        with self.decoding.hold(pixels):  # the full-size pixels live only inside _decode
            tensor, data = _decode(image, loaded.info)
        return _Request(loaded, tensor[None], data, content_hash(data), "." + fmt, start)

    def _submit(self, image, start: float) -> tuple[_Request, Future]:
        """Decode (announced to the batcher meanwhile) and queue for a forward pass."""
        self.batcher.expect()
        try:
            request = self._prepare(image, start)
        except BaseException:
            self.batcher.withdraw()
            raise
        return request, self.batcher.submit(request.loaded, request.batch)

    def _finish(self, request: _Request, probs: torch.Tensor, source: str | None
                ) -> Prediction:
        """Top-5 of one request's probabilities; keep its image and log its row."""
        loaded = request.loaded
        values, indices = probs.topk(min(5, probs.shape[0]))
        top5 = [(loaded.classes[i], round(float(v), 6)) for v, i in zip(values, indices)]
        latency = (time.perf_counter() - request.start) * 1000
        digest = request.digest
        row = {"time": self.clock().isoformat(), "generation": loaded.name,
               "image_hash": digest, "source": source or self.source, "predicted": top5[0][0],
               "confidence": top5[0][1], "top5": top5, "latency_ms": round(latency, 3),
               "image": (self._keep(digest, request.data, request.suffix)
                         if self.keep_images else None)}
        tid = self._writer.append(row) if self._writer else None
        return Prediction(tid, loaded.name, row["predicted"], row["confidence"], top5,
                          row["latency_ms"], digest, row["time"])

    def predict(self, image, source: str | None = None) -> Prediction:
        """Classify one image and log the transaction.

        Safe to call from many threads at once: concurrent calls share forward
        passes (see `Batcher`), and each gets and logs its own answer.

        Args:
            image: a file path, the file's bytes, or a PIL image.
            source: caller tag for the log (the Predictor's default if None).

        Raises:
            ZoolibError: not a readable image (ImageTooLargeError if too large).
            translog.TransactionLogError: the transaction could not be logged.
        """
        request, future = self._submit(image, time.perf_counter())
        return self._finish(request, future.result(), source)

    async def predict_async(self, image, source: str | None = None,
                            limiter: anyio.CapacityLimiter | None = None) -> Prediction:
        """`predict` for an event loop: decoding and logging run in worker threads
        (at most `limiter`'s tokens at once), and the wait for the forward pass
        holds no thread.

        Raises:
            As `predict`.
        """
        start = time.perf_counter()  # the latency includes waiting for a decode thread
        request, future = await anyio.to_thread.run_sync(self._submit, image, start,
                                                         limiter=limiter)
        # asyncio: uvicorn's loop, and the TestClient's (anyio on asyncio).
        probs = await asyncio.wrap_future(future)
        return await anyio.to_thread.run_sync(self._finish, request, probs, source,
                                              limiter=limiter)

    def close(self) -> None:
        """Answer the calls in progress, stop the batching thread, close the log."""
        self.batcher.close()
        if self._writer:
            self._writer.close()


