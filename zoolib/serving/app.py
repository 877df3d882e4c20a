"""The HTTP endpoint (Starlette): POST /predict, POST /evaluations, GET /health.

Error answers are JSON (`{"error": ...}`) with 4xx for a bad request, and never show
the server's absolute paths: the workspace folder reads as WORKSPACE.
"""
from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import anyio
import anyio.to_thread

from .. import translog
from ..machine import cores
from ..workspace import ZoolibError, open_workspace
from .batching import BATCH_WINDOW_MS, DECODE_PIXELS, MAX_BATCH, MAX_PIXELS, positive
from .predictor import MAX_BYTES, ImageTooLargeError, Predictor

_INT64_MAX = 2**63 - 1  # SQLite's largest INTEGER: no transaction id is larger
# Longest text accepted per evaluation field (true_class: check_class_name's 200 bytes).
_TEXT_LIMITS = {"reviewer": 200, "true_class": 200, "time": 64, "notes": 10_000}
# Batching (see `Batcher`): most requests per forward pass, and the longest a request


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
    max_bytes = positive(max_bytes, "max_bytes")
    limiter = anyio.CapacityLimiter(positive(threads, "threads") if threads is not None
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


