"""Serving the deployed generation: a Predictor that logs every call, and an HTTP endpoint.

`Predictor(workspace)` loads the generation named in `models/deployed.json`
and predicts one image (a path, bytes or a PIL image). Each call appends one
row to the transaction log (`zoolib.translog`); if the row cannot be written
the call raises. A new deployment is picked up on the next request: a cheap
`stat` of deployed.json per call, and the model is swapped under a lock while
other requests keep using the old one. A deployment that cannot be loaded
leaves the old generation serving and is reported by `Predictor.status` (and
`GET /health`) as "degraded" until deployed.json changes again.

Memory: an upload's size says little about its decoded size (a 50 KB PNG can
decode to 16 megapixels, ~180 MB with the copies decoding makes), so decodes
share a pixel budget (`PixelBudget`, DECODE_PIXELS): requests whose images do
not fit wait their turn, in arrival order, instead of decoding all at once.
The pixels a model sees are its training pixels: every file is decoded by
`inference.file_tensor` with the generation's decode mode (a camera JPEG at
reduced DCT scale for a generation trained that way, which also shrinks the
decode's memory), as training does.

Under load: calls made at the same time share forward passes (`Batcher`: up to
MAX_BATCH requests, gathered for at most BATCH_WINDOW_MS while others are still
decoding, so a lone request never waits), run by one thread; each request still
decodes, hashes and logs on its own, and gets its own row of the batch. Over
HTTP, decoding and logging run in at most one worker thread per core.

The HTTP endpoint (Starlette on uvicorn) is started with

    python -m zoolib.serving WORKSPACE [--host 127.0.0.1] [--port 8000] [--max-mb 10]
                                       [--runtime torch|onnx|onnx-int8] [--max-batch 16]

and offers `POST /predict` (multipart field `file`, optional `source`),
`POST /evaluations` (JSON) and `GET /health`. Error answers are JSON
(`{"error": ...}`) with 4xx for a bad request, and never show the server's
absolute paths: the workspace folder reads as WORKSPACE.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import math
import os
import re
import threading
import time
import warnings
from collections import Counter, deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import anyio
import anyio.to_thread
import torch
from PIL import Image, ImageOps

from .machine import cores
from . import inference, models, translog
from .images import UnreadableImageError, content_hash, open_image, to_rgb
from .workspace import Workspace, ZoolibError, open_workspace, write_atomic

log = logging.getLogger(__name__)
MAX_BYTES = 10 * 2**20  # largest upload accepted over HTTP
MAX_PIXELS = 40_000_000  # larger images are refused before decoding (decompression bombs)
# Pixels decoded at once, all requests together: one image of the largest size, or
# several smaller ones. Decoding holds about 12 bytes per pixel at its peak (the
# file's pixels, an upright copy, the RGB copy and the resize's copy), ~0.5 GB here.
DECODE_PIXELS = MAX_PIXELS
MAX_UPLOAD_MB = 1024.0  # the CLI's ceiling for --max-mb: an upload is held in memory
_INT64_MAX = 2**63 - 1  # SQLite's largest INTEGER: no transaction id is larger
# Longest text accepted per evaluation field (true_class: check_class_name's 200 bytes).
_TEXT_LIMITS = {"reviewer": 200, "true_class": 200, "time": 64, "notes": 10_000}
# Batching (see `Batcher`): most requests per forward pass, and the longest a request
# waits for others to join it (only while others are decoding). 5 ms is small beside
# a request's own cost over HTTP (a few ms on 2 cores) and lets a burst gather.
MAX_BATCH = 16
BATCH_WINDOW_MS = 5.0


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


def _positive(value: int, name: str) -> int:
    """`value` when it is a positive integer (a limit), else a ZoolibError naming `name`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ZoolibError(f"{name} must be a positive integer, not {value!r}")
    return value


class PixelBudget:
    """At most `limit` pixels held by decodes at once, granted in arrival order.

    First come, first served, so a large image is never starved by a stream of
    small ones. One image larger than the whole budget still decodes, alone.

    Args:
        limit: the pixels (width x height, summed) that may be decoded at once.

    Raises:
        ZoolibError: `limit` is not a positive integer.
    """

    def __init__(self, limit: int):
        self.limit = _positive(limit, "decode_pixels")
        self.used = 0
        self.peak = 0  # the most pixels ever held at once: what a memory test checks
        self._queue: deque[object] = deque()
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Wait until `pixels` fit in the budget (after earlier requests), hold them meanwhile."""
        need = min(max(int(pixels), 1), self.limit)
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                self._cond.wait_for(lambda: self._queue[0] is ticket
                                    and self.used + need <= self.limit)
            except BaseException:  # interrupted: a ticket left in line would block everyone
                self._queue.remove(ticket)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self.used += need
            self.peak = max(self.peak, self.used)
            self._cond.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            with self._cond:
                self.used -= need
                self._cond.notify_all()


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


class Batcher:
    """Requests waiting together get one forward pass, in one thread that runs the model.

    The thread takes the first waiting request, then gathers more for up to
    `window_ms`, but only while others are on their way (announced by `expect`,
    still decoding): a lone request is never held back, and a batch never waits
    for requests that are not coming. At most `max_batch` go in one pass; a
    batch mixing generations (during a redeployment) runs one pass per generation.

    Each request gets its own Future, resolved with its own row of the batch's
    probabilities (or the pass's exception), so answers cannot change places.

    Args:
        max_batch: most requests per forward pass.
        window_ms: longest wait for a batch to fill, in milliseconds (0 to 1000).
        forward: (generation, NCHW batch) -> (N, classes) probabilities;
            `inference.forward` by default.

    Raises:
        ZoolibError: max_batch or window_ms out of range.
    """

    def __init__(self, max_batch: int = MAX_BATCH, window_ms: float = BATCH_WINDOW_MS,
                 forward: Callable[[inference.Loaded, torch.Tensor], torch.Tensor] | None = None):
        self.max_batch = _positive(max_batch, "max_batch")
        self.window_s = _window_s(window_ms)
        self.forward = forward or (lambda loaded, x: inference.forward(loaded, x)[0])
        self.sizes: Counter[int] = Counter()  # batch size -> passes run (for benchmarks)
        self._queue: deque[tuple[inference.Loaded, torch.Tensor, Future]] = deque()
        self._coming = 0
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def expect(self) -> None:
        """Announce a request that will `submit` (or `withdraw`) soon."""
        with self._cond:
            self._coming += 1

    def withdraw(self) -> None:
        """An announced request will not come (its image could not be decoded)."""
        with self._cond:
            self._coming -= 1
            self._cond.notify_all()

    def submit(self, loaded: inference.Loaded, x: torch.Tensor) -> Future:
        """Queue an announced request's (1, C, H, W) input; its Future gets its probabilities.

        Raises:
            ZoolibError: the batcher is closed.
        """
        future: Future = Future()
        with self._cond:
            self._coming -= 1
            if self._closed:
                raise ZoolibError("the predictor is closed")
            self._queue.append((loaded, x, future))
            if self._thread is None:  # started on first use: an idle Predictor has no thread
                self._thread = threading.Thread(target=self._loop, name="zoolib-batcher",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return future

    def close(self) -> None:
        """Finish the queued requests and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _loop(self) -> None:
        while True:
            items = self._take()
            if items is None:
                return
            self._run(items)

    def _take(self) -> list[tuple[inference.Loaded, torch.Tensor, Future]] | None:
        """The next batch (waiting for it as described above); None once closed and empty."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closed)
            if not self._queue:
                return None
            deadline = time.monotonic() + self.window_s
            while len(self._queue) < self.max_batch and self._coming > 0 and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(self.max_batch, len(self._queue))
            items = [self._queue.popleft() for _ in range(n)]
        # A Future cancelled by its caller (a request given up) needs no answer.
        return [it for it in items if it[2].set_running_or_notify_cancel()]

    def _run(self, items: list[tuple[inference.Loaded, torch.Tensor, Future]]) -> None:
        groups: dict[int, list[tuple[inference.Loaded, torch.Tensor, Future]]] = {}
        for item in items:
            groups.setdefault(id(item[0]), []).append(item)
        for group in groups.values():
            try:
                probs = self.forward(group[0][0], torch.cat([x for _, x, _ in group]))
                self.sizes[len(group)] += 1
            except BaseException as exc:  # noqa: BLE001 - every waiting caller gets it
                for _, _, future in group:
                    future.set_exception(exc)
                continue
            for row, (_, _, future) in zip(probs, group):
                future.set_result(row)


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
        self.max_pixels, self.clock = _positive(max_pixels, "max_pixels"), clock
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
            ZoolibError: there is no deployed.json.
            Exception: it is not the JSON object `models.write_deployed` writes.
        """
        record = models.read_deployed(self.ws)
        if record is None:
            raise ZoolibError(f"no generation is deployed in {self.ws.models} (no "
                              "deployed.json): deploy one with models.write_deployed or "
                              "pass generation=")
        return record["generation"]

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


def _window_s(batch_window_ms: float) -> float:
    """batch_window_ms in seconds, or a ZoolibError naming it."""
    if (not isinstance(batch_window_ms, (int, float)) or isinstance(batch_window_ms, bool)
            or not 0 <= batch_window_ms <= 1000):
        raise ZoolibError(f"batch_window_ms must be a number from 0 to 1000, not "
                          f"{batch_window_ms!r}")
    return batch_window_ms / 1000


# --- HTTP ---------------------------------------------------------------------------


class _BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes`, even without a length header."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _too_large(self.max_bytes)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ImageTooLargeError(f"upload exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


# An absolute POSIX path of two parts or more, not inside a word, URL or MIME type
# (punctuation after it is the message's, not the path's).
_PATH_CHAR = r"[^\s/'\"<>,;()]"
_ABSOLUTE_PATH = re.compile(rf"(?<![\w.:/~-])/(?:{_PATH_CHAR}+/)+{_PATH_CHAR}*")


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")  # Pillow names its BytesIO


def _public(message: str, root: Path) -> str:
    """A message fit for a client: the workspace folder reads WORKSPACE, other absolute
    paths read <path> and object reprs <object>, so an answer never maps the server's
    disk or memory."""
    for folder in {str(root), os.path.realpath(root)}:
        message = re.sub(re.escape(folder) + rf"(?!{_PATH_CHAR})", "WORKSPACE", message)
    return _OBJECT_REPR.sub("<object>", _ABSOLUTE_PATH.sub("<path>", message))


def _error(status: int, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def _too_large(max_bytes: int):
    return _error(413, f"upload exceeds the limit of {max_bytes} bytes")


def _handlers(root: Path) -> dict:
    from starlette.exceptions import HTTPException

    def handle(status: int):
        async def handler(request, exc):
            return _error(status, _public(str(exc), root))
        return handler

    async def http_error(request, exc):
        return _error(exc.status_code, _public(str(exc.detail), root))

    return {ImageTooLargeError: handle(413), translog.UnknownTransactionError: handle(404),
            ZoolibError: handle(400), translog.TransactionLogError: handle(503),
            HTTPException: http_error}


def create_app(workspace, generation: str | None = None, log: bool = True,
               keep_images: bool = True, max_bytes: int = MAX_BYTES,
               max_pixels: int = MAX_PIXELS, decode_pixels: int = DECODE_PIXELS,
               runtime: str | None = None, max_batch: int = MAX_BATCH,
               batch_window_ms: float = BATCH_WINDOW_MS, threads: int | None = None):
    """The Starlette application serving one workspace.

    `GET /health` answers 200 with `Predictor.status()` plus "log": "status" is
    "ok", or "degraded" when a new deployment failed to load and the previous
    generation still serves. Degraded stays 200, not 503, on purpose: the server
    answers predictions correctly with the old generation, and every server of a
    workspace sees the same broken deployment, so a 503 would let a load balancer
    take the whole service down for a deployment mistake. Monitoring reads
    "status" and "deploy_error".

    `POST /predict` decodes and logs in at most `threads` worker threads at once
    (the cores by default, not anyio's 40: more would only share the same cores
    and the model's own threads), and concurrent requests share forward passes
    (`Batcher`); the wait for the model holds no thread.

    Args:
        workspace: the workspace.
        generation: pin a generation instead of following deployed.json.
        log: log transactions (off only for benchmarks).
        keep_images: keep served images for review.
        max_bytes: largest request body accepted.
        max_pixels: largest image (width x height) accepted.
        decode_pixels: pixels all requests together may decode at once.
        runtime: "torch", "onnx" or "onnx-int8"; None = `inference.default_runtime()`.
        max_batch: most requests answered by one forward pass.
        batch_window_ms: longest a request waits for others to share its pass.
        threads: worker threads decoding and logging at once; None = the cores.

    Raises:
        ZoolibError: nothing is deployed (and no generation given), a limit is
            not a positive integer, or the runtime is unknown or cannot load.
    """
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    ws = open_workspace(workspace)
    max_bytes = _positive(max_bytes, "max_bytes")
    limiter = anyio.CapacityLimiter(_positive(threads, "threads") if threads is not None
                                    else cores())
    predictor = Predictor(ws, generation, log=log, keep_images=keep_images, source="http",
                          max_pixels=max_pixels, decode_pixels=decode_pixels, runtime=runtime,
                          max_batch=max_batch, batch_window_ms=batch_window_ms)

    async def health(request):
        state = predictor.status()
        if state["deploy_error"]:
            state["deploy_error"] = _public(state["deploy_error"], ws.root)
        return JSONResponse({**state, "log": log})

    async def predict(request):
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return _error(400, "POST /predict needs an image in the multipart field 'file'")
        data = await upload.read()
        source = str(form.get("source") or request.query_params.get("source") or "http")[:100]
        result = await predictor.predict_async(data, source, limiter)
        return JSONResponse(result.as_dict())

    async def evaluate(request):
        body = _parse_json(await request.body())
        problem = _check_evaluation(body)
        if problem:
            return _error(400, problem)
        eid = await run_in_threadpool(
            translog.record_evaluation, ws, body["transaction_id"], body.get("reviewer", ""),
            body.get("correct"), body.get("true_class"), body.get("time"), body.get("notes", ""))
        return JSONResponse({"evaluation_id": eid, "transaction_id": body["transaction_id"]},
                            status_code=201)

    routes = [Route("/health", health, methods=["GET"]),
              Route("/predict", predict, methods=["POST"]),
              Route("/evaluations", evaluate, methods=["POST"])]
    app = Starlette(routes=routes, middleware=[Middleware(_BodyLimit, max_bytes=max_bytes)],
                    exception_handlers=_handlers(ws.root))
    app.state.predictor, app.state.limiter = predictor, limiter
    return app


def _parse_json(raw: bytes):
    """A request body's JSON value.

    Raises:
        ZoolibError: not JSON (bad syntax, not UTF-8, an integer of more than 4300
            digits) or nested too deeply for the parser (RecursionError).
    """
    try:
        return json.loads(raw)
    except RecursionError:
        raise ZoolibError("POST /evaluations: the JSON body is nested too deeply") from None
    except ValueError as exc:
        raise ZoolibError(f"POST /evaluations needs a JSON body: {str(exc)[:200]}") from None


def _check_evaluation(body) -> str:
    """Why an evaluation request body is malformed ('' when it is fine).

    Types and ranges only; whether the transaction exists is the log's to say (404).
    """
    if not isinstance(body, dict):
        return "the evaluation must be a JSON object, such as {\"transaction_id\": 1, ...}"
    tid = body.get("transaction_id")
    if not isinstance(tid, int) or isinstance(tid, bool):
        return "'transaction_id' must be an integer (the id POST /predict answered)"
    if not 1 <= tid <= _INT64_MAX:
        return f"'transaction_id' must be from 1 to {_INT64_MAX}"
    if body.get("correct") is not None and not isinstance(body["correct"], bool):
        return "'correct' must be true or false"
    for key, limit in _TEXT_LIMITS.items():
        problem = _check_text(key, body.get(key), limit)
        if problem:
            return problem
    return _check_time(body.get("time"))


def _check_text(key: str, value, limit: int) -> str:
    """Why an optional text field is malformed ('' when fine)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        return f"{key!r} must be a string"
    if len(value) > limit:
        return f"{key!r} is longer than {limit} characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800": SQLite cannot store it
        return f"{key!r} is not valid Unicode"
    return ""


def _check_time(value: str | None) -> str:
    """Why an optional evaluation time is malformed ('' when fine)."""
    if value is None:
        return ""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return f"'time' {value!r} is not an ISO 8601 time such as 2024-05-01T12:00:00Z"
    if when.tzinfo is None:
        return f"'time' {value!r} has no time zone: add Z (UTC) or an offset such as +02:00"
    try:
        when.astimezone(timezone.utc)  # the log stores UTC
    except OverflowError:  # 9999-12-31T23:00-14:00 is after the last UTC time
        return f"'time' {value!r} is out of range in UTC"
    return ""


# --- command line --------------------------------------------------------------------


def _port(text: str) -> int:
    """argparse type: a TCP port from 1 to 65535.

    0 is refused: uvicorn would bind a random free port, and a server that logs
    at warning level would never say which.
    """
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port from 1 to 65535")
    return port


def _megabytes(text: str) -> float:
    """argparse type: an upload limit in MiB, from 1 KiB (0.001) to MAX_UPLOAD_MB."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MiB") from None
    if not (math.isfinite(value) and 0.001 <= value <= MAX_UPLOAD_MB):
        raise argparse.ArgumentTypeError(
            f"{text} MiB is not an upload limit from 0.001 to {MAX_UPLOAD_MB:g}")
    return value


def _batch_size(text: str) -> int:
    """argparse type: requests per forward pass, 1 to 1024."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"{value} is not a batch size from 1 to 1024")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Serve the deployed generation over HTTP.")
    parser.add_argument("workspace")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (localhost only "
                        "by default; 0.0.0.0 exposes the server to the network)")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port, 1-65535")
    parser.add_argument("--generation", default=None,
                        help="serve this generation instead of following deployed.json")
    parser.add_argument("--max-mb", type=_megabytes, default=MAX_BYTES / 2**20,
                        help=f"largest upload in MiB (0.001 to {MAX_UPLOAD_MB:g})")
    parser.add_argument("--no-keep-images", action="store_true",
                        help="do not keep served images for review")
    parser.add_argument("--no-log", action="store_true",
                        help="do not log transactions (benchmarks only)")
    parser.add_argument("--runtime", choices=inference.RUNTIMES, default=None,
                        help="model runtime (default: onnx where installed, else torch; the ONNX "
                        "ones need pip install -e '.[onnx]')")
    parser.add_argument("--max-batch", type=_batch_size, default=MAX_BATCH,
                        help=f"most requests per forward pass, 1-1024 (default {MAX_BATCH})")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m zoolib.serving WORKSPACE [--host H] [--port P] [--max-mb M]
    [--runtime R] [--max-batch N]`.

    A bad option, workspace or generation exits with status 2 and says why.
    """
    import uvicorn

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        app = create_app(args.workspace, args.generation, log=not args.no_log,
                         keep_images=not args.no_keep_images,
                         max_bytes=int(args.max_mb * 2**20), runtime=args.runtime,
                         max_batch=args.max_batch)
    except ZoolibError as exc:
        parser.error(str(exc))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
