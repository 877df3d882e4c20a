"""Serving the deployed generation: a Predictor that logs every call, and an HTTP endpoint.

`Predictor(workspace)` loads the generation named in `models/deployed.json`
and predicts one image (a path, bytes or a PIL image). Each call appends one
row to the transaction log (`zoolib.translog`); if the row cannot be written
the call raises. A new deployment is picked up on the next request: a cheap
`stat` of deployed.json per call, and the model is swapped under a lock while
other requests keep using the old one.

The HTTP endpoint (Starlette on uvicorn) is started with

    python -m zoolib.serving WORKSPACE [--host 127.0.0.1] [--port 8000]

and offers `POST /predict` (multipart field `file`, optional `source`),
`POST /evaluations` (JSON) and `GET /health`.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import random
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

from PIL import Image, ImageOps

from . import inference, models, translog
from .images import content_hash, load_rgb
from .workspace import Workspace, ZoolibError, open_workspace, write_atomic

log = logging.getLogger(__name__)
MAX_BYTES = 10 * 2**20  # largest upload accepted over HTTP
MAX_PIXELS = 40_000_000  # larger images are refused before decoding (decompression bombs)


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


def _open_checked(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """Decode bytes to upright RGB (as `images.load_rgb`), refusing oversized images.

    Returns:
        The image and its file format ("jpeg", "png", ...).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:  # reads the header only
                (width, height), fmt = probe.size, (probe.format or "img").lower()
            if width * height > max_pixels:
                raise ImageTooLargeError(f"image is {width}x{height} pixels, more than the "
                                         f"limit of {max_pixels} (a decompression bomb?)")
            return load_rgb(io.BytesIO(data)), fmt
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image refused as a decompression bomb: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "not an image"
        raise ZoolibError(f"not a readable image: {type(exc).__name__}: {exc}") from exc


def _decode(image, max_pixels: int) -> tuple[Image.Image, str, bytes, str]:
    """Any accepted input -> (upright RGB image, content hash, bytes to keep, suffix)."""
    if isinstance(image, Image.Image):
        # No file bytes: hash the upright pixels, keep a PNG of them.
        rgb = ImageOps.exif_transpose(image).convert("RGB")
        buf = io.BytesIO()
        rgb.save(buf, "PNG")
        data = buf.getvalue()
        return rgb, content_hash(data), data, ".png"
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
    rgb, fmt = _open_checked(data, max_pixels)
    return rgb, content_hash(data), data, "." + fmt


class Predictor:
    """Predict single images with the deployed generation, logging each call.

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

    Raises:
        ZoolibError: nothing is deployed and no generation was given.
    """

    def __init__(self, workspace, generation: str | None = None, log: bool = True,
                 keep_images: bool = True, source: str = "python", device: str | None = None,
                 max_pixels: int = MAX_PIXELS, clock: Callable[[], datetime] = translog.now,
                 log_timeout: float = 30.0):
        self.ws: Workspace = open_workspace(workspace)
        self.pinned = generation is not None
        self.keep_images, self.source, self.device = keep_images, source, device
        self.max_pixels, self.clock = max_pixels, clock
        self._swap = threading.Lock()
        self._key = self._deploy_key()
        if generation is None:
            deployed = models.read_deployed(self.ws)
            if deployed is None:
                raise ZoolibError(f"no generation is deployed in {self.ws.models} (no "
                                  "deployed.json): deploy one with models.write_deployed or "
                                  "pass generation=")
            generation = deployed["generation"]
        self._loaded = inference.load(self.ws, generation, device)
        self._writer = translog.Writer(self.ws, log_timeout) if log else None

    @property
    def generation(self) -> str:
        """The generation serving now (after picking up a new deployment)."""
        return self._current().name

    @property
    def classes(self) -> list[str]:
        return self._current().classes

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
        if key == self._key or key is None:
            self._key = key
            return
        try:
            name = models.read_deployed(self.ws)["generation"]
            if name != self._loaded.name:
                self._loaded = inference.load(self.ws, name, self.device)
                log.info("now serving %s", name)
        except Exception as exc:  # noqa: BLE001 - a bad deployment must not stop serving
            log.error("keeping %s: cannot load the new deployment: %s", self._loaded.name, exc)
        self._key = key

    def _keep(self, digest: str, data: bytes, suffix: str) -> str:
        """Store the image once per content hash; return its workspace-relative path."""
        path = translog.served_images(self.ws) / digest[:2] / f"{digest}{suffix}"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
        return path.relative_to(self.ws.root).as_posix()

    def predict(self, image, source: str | None = None) -> Prediction:
        """Classify one image and log the transaction.

        Args:
            image: a file path, the file's bytes, or a PIL image.
            source: caller tag for the log (the Predictor's default if None).

        Raises:
            ZoolibError: not a readable image (ImageTooLargeError if too large).
            translog.TransactionLogError: the transaction could not be logged.
        """
        start = time.perf_counter()
        rgb, digest, data, suffix = _decode(image, self.max_pixels)
        loaded = self._current()
        probs, _ = inference.forward(loaded, inference.to_tensor(rgb, loaded.info)[None])
        values, indices = probs[0].topk(min(5, probs.shape[1]))
        top5 = [(loaded.classes[i], round(float(v), 6)) for v, i in zip(values, indices)]
        latency = (time.perf_counter() - start) * 1000
        row = {"time": self.clock().isoformat(), "generation": loaded.name,
               "image_hash": digest, "source": source or self.source, "predicted": top5[0][0],
               "confidence": top5[0][1], "top5": top5, "latency_ms": round(latency, 3),
               "image": self._keep(digest, data, suffix) if self.keep_images else None}
        tid = self._writer.append(row) if self._writer else None
        return Prediction(tid, loaded.name, row["predicted"], row["confidence"], top5,
                          row["latency_ms"], digest, row["time"])

    def close(self) -> None:
        """Close the log connection."""
        if self._writer:
            self._writer.close()


def _recent_generations(ws: Workspace, n: int = 2) -> list[str]:
    names = [g for g in models.generation_names(ws)
             if not models.read_info(ws, g).get("throwaway", False)]
    if not names:
        raise ZoolibError(f"{ws.models} holds no generation to serve")
    return names[-n:]


def simulate_traffic(workspace, labels: dict[str, str], generations: list[str] | None = None,
                     per_generation: int = 60, eval_share: float = 0.4, days: int = 21,
                     reviewer: str = "demo-reviewer", seed: int = 0) -> dict:
    """Serve inbox images through the Predictor for several generations and review some.

    Real predictions and log rows, on a simulated clock: the generations serve
    one after the other over the last `days` days (oldest generation first), so
    the report has days and weeks to show. Reviews come 1-48 hours after the
    prediction, with the true class from `labels`. deployed.json is not touched:
    each generation is pinned.

    Args:
        workspace: the workspace.
        labels: inbox-relative image path -> true class (the demo's
            `demo_truth.json["inbox"]`); entries that are not images are skipped.
        generations: generations to serve, in order; the last two by default.
        per_generation: predictions per generation.
        eval_share: share of predictions that get a manual evaluation.
        days: length of the simulated period, ending now.
        reviewer: name stored with the evaluations.
        seed: random seed.

    Returns:
        Counts per generation: {"gen-0001": {"predictions": n, "evaluations": m}, ...}.
    """
    ws = open_workspace(workspace)
    rng = random.Random(seed)
    generations = generations or _recent_generations(ws)
    images = sorted(p for p, c in labels.items() if c != "unreadable"
                    and (ws.inbox / p).is_file())
    if not images:
        raise ZoolibError(f"no labelled inbox image of {ws.inbox} is in `labels`")
    end = translog.now()
    span = timedelta(days=days) / len(generations)
    summary = {}
    for k, gen in enumerate(generations):
        start = end - span * (len(generations) - k)
        times = iter(sorted(start + span * rng.random() for _ in range(per_generation)))
        predictor = Predictor(ws, generation=gen, source="demo-traffic", clock=lambda: next(times))
        n_eval = 0
        try:
            for _ in range(per_generation):
                path = rng.choice(images)
                pred = predictor.predict(ws.inbox / path)
                if rng.random() < eval_share:
                    when = min(datetime.fromisoformat(pred.time) +
                               timedelta(hours=rng.uniform(1, 48)), end)
                    translog.record_evaluation(ws, pred.transaction_id, reviewer,
                                               true_class=labels[path], time=when)
                    n_eval += 1
        finally:
            predictor.close()
        summary[gen] = {"predictions": per_generation, "evaluations": n_eval}
    return summary


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


def _error(status: int, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def _too_large(max_bytes: int):
    return _error(413, f"upload exceeds the limit of {max_bytes} bytes")


def _handlers() -> dict:
    from starlette.exceptions import HTTPException

    def handle(status: int):
        async def handler(request, exc):
            return _error(status, str(exc))
        return handler

    async def http_error(request, exc):
        return _error(exc.status_code, str(exc.detail))

    return {ImageTooLargeError: handle(413), translog.UnknownTransactionError: handle(404),
            ZoolibError: handle(400), translog.TransactionLogError: handle(503),
            HTTPException: http_error}


def create_app(workspace, generation: str | None = None, log: bool = True,
               keep_images: bool = True, max_bytes: int = MAX_BYTES,
               max_pixels: int = MAX_PIXELS):
    """The Starlette application serving one workspace.

    Args:
        workspace: the workspace.
        generation: pin a generation instead of following deployed.json.
        log: log transactions (off only for benchmarks).
        keep_images: keep served images for review.
        max_bytes: largest request body accepted.
        max_pixels: largest image (width x height) accepted.
    """
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    ws = open_workspace(workspace)
    predictor = Predictor(ws, generation, log=log, keep_images=keep_images, source="http",
                          max_pixels=max_pixels)

    async def health(request):
        return JSONResponse({"status": "ok", "generation": predictor.generation, "log": log})

    async def predict(request):
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return _error(400, "POST /predict needs an image in the multipart field 'file'")
        data = await upload.read()
        source = str(form.get("source") or request.query_params.get("source") or "http")[:100]
        result = await run_in_threadpool(predictor.predict, data, source)
        return JSONResponse(result.as_dict())

    async def evaluate(request):
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "POST /evaluations needs a JSON body")
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
                    exception_handlers=_handlers())
    app.state.predictor = predictor
    return app


def _check_evaluation(body) -> str:
    """Why an evaluation request body is malformed ('' when it is fine)."""
    if not isinstance(body, dict):
        return "the evaluation must be a JSON object"
    tid = body.get("transaction_id")
    if not isinstance(tid, int) or isinstance(tid, bool):
        return "'transaction_id' must be an integer"
    if body.get("correct") is not None and not isinstance(body["correct"], bool):
        return "'correct' must be true or false"
    for key in ("reviewer", "true_class", "time", "notes"):
        if body.get(key) is not None and not isinstance(body[key], str):
            return f"{key!r} must be a string"
    return ""


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m zoolib.serving WORKSPACE [--host H] [--port P]`."""
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve the deployed generation over HTTP.")
    parser.add_argument("workspace")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (localhost only "
                        "by default; 0.0.0.0 exposes the server to the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--generation", default=None,
                        help="serve this generation instead of following deployed.json")
    parser.add_argument("--max-mb", type=float, default=MAX_BYTES / 2**20,
                        help="largest upload in MiB")
    parser.add_argument("--no-keep-images", action="store_true",
                        help="do not keep served images for review")
    parser.add_argument("--no-log", action="store_true",
                        help="do not log transactions (benchmarks only)")
    args = parser.parse_args(argv)
    app = create_app(args.workspace, args.generation, log=not args.no_log,
                     keep_images=not args.no_keep_images, max_bytes=int(args.max_mb * 2**20))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
