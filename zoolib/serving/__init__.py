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

from .app import create_app
from .batching import BATCH_WINDOW_MS, DECODE_PIXELS, MAX_BATCH, MAX_PIXELS, Batcher, PixelBudget
from .cli import main
from .predictor import MAX_BYTES, ImageTooLargeError, Prediction, Predictor

__all__ = ["BATCH_WINDOW_MS", "Batcher", "DECODE_PIXELS", "ImageTooLargeError", "MAX_BATCH",
           "MAX_BYTES", "MAX_PIXELS", "PixelBudget", "Prediction", "Predictor", "create_app",
           "main"]
