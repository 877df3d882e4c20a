"""Hostile requests: a fixed list of malformed calls, none answered 5xx or with a path."""
import io
import json
import os
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from zoolib import models, serving, translog

MAX_BYTES, MAX_PIXELS = 200_000, 1000 * 1000  # the app under test's limits


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _noise(size=(120, 90)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_claiming(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header claims width x height (a bomb needs no real pixels to refuse)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IDAT", idat) if idat else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + body + chunk(b"IEND", b"")


GOOD_PNG = _encode(Image.new("RGB", (40, 30), (200, 100, 50)), "PNG")
NOISE_PNG = _encode(_noise(), "PNG")
NOISE_JPEG = _encode(_noise(), "JPEG", quality=90)
OVER_LIMIT_PNG = _encode(Image.new("RGB", (1001, 1000), (10, 20, 30)), "PNG")
BOMB_PNG = _png_claiming(100_000, 100_000, zlib.compress(b"\0" * 1000))
HEADER_ONLY_PNG = _png_claiming(500, 500)
GREY16_PNG = _encode(Image.fromarray(np.full((20, 20), 40_000, dtype=np.uint16)), "PNG")
FLOAT_TIFF = _encode(Image.fromarray(np.full((20, 20), 0.5, dtype=np.float32)), "TIFF")
CMYK_JPEG = _encode(Image.new("CMYK", (30, 30), (0, 100, 200, 10)), "JPEG")
JSON = {"content-type": "application/json"}


def _file(data: bytes, name: str = "x.png", kind: str = "image/png") -> dict:
    return {"files": {"file": (name, data, kind)}}


def _eval(body) -> dict:
    """An /evaluations call with `body` as its raw JSON text (or bytes)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return {"content": raw, "headers": JSON}


def _streamed():  # no content-length header: the limit must hold while streaming
    yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n"
    for _ in range(30):
        yield b"\0" * 10_000


OK_EVAL = {"transaction_id": 1, "reviewer": "anna", "correct": True}
# (what, method, url, request keyword arguments, accepted statuses). Transaction 1 exists
# (the test predicts once first); 200/201 rows are odd but legal requests.
CASES = [
    # methods and routes
    ("GET /predict", "GET", "/predict", {}, {405}),
    ("PUT /predict", "PUT", "/predict", _file(GOOD_PNG), {405}),
    ("DELETE /evaluations", "DELETE", "/evaluations", {}, {405}),
    ("GET /evaluations", "GET", "/evaluations", {}, {405}),
    ("POST /health", "POST", "/health", {"content": b"{}"}, {405}),
    ("PATCH /health", "PATCH", "/health", {}, {405}),
    ("OPTIONS /predict", "OPTIONS", "/predict", {}, {405}),
    ("unknown route", "GET", "/admin", {}, {404}),
    ("the database by URL", "GET", "/zoo.sqlite", {}, {404}),
    ("deployed.json by URL", "GET", "/models/deployed.json", {}, {404}),
    ("dot-dot in the URL", "GET", "/../../zoo.sqlite", {}, {404}),
    ("encoded dot-dot", "GET", "/%2e%2e/%2e%2e/etc/passwd", {}, {404}),
    ("encoded slash traversal", "GET", "/predict/..%2f..%2fzoo.sqlite", {}, {404}),
    ("trailing slash", "POST", "/predict/", {**_file(GOOD_PNG), "follow_redirects": False},
     {307}),
    ("query string on /health", "GET", "/health?generation=../../etc&x=%00", {}, {200}),
    # /predict bodies
    ("no multipart field", "POST", "/predict", {"data": {"source": "x"}}, {400}),
    ("file as a text field", "POST", "/predict", {"data": {"file": "abc"}}, {400}),
    ("two files", "POST", "/predict",
     {"files": [("file", ("a.png", GOOD_PNG)), ("file", ("b.png", GOOD_PNG))]}, {400}),
    ("eleven fields", "POST", "/predict",
     {"data": {f"f{i}": "v" for i in range(11)}, **_file(GOOD_PNG)}, {400}),
    ("empty file", "POST", "/predict", _file(b""), {400}),
    ("text instead of an image", "POST", "/predict", _file(b"hello", "a.txt", "text/plain"),
     {400}),
    ("random bytes", "POST", "/predict", _file(os.urandom(5000), "r.jpg", "image/jpeg"), {400}),
    ("truncated PNG", "POST", "/predict", _file(NOISE_PNG[:len(NOISE_PNG) // 2]), {400}),
    ("truncated JPEG", "POST", "/predict",
     _file(NOISE_JPEG[:len(NOISE_JPEG) // 2], "t.jpg", "image/jpeg"), {400}),
    ("PNG header and no pixels", "POST", "/predict", _file(HEADER_ONLY_PNG), {400}),
    ("decompression bomb header", "POST", "/predict", _file(BOMB_PNG), {413}),
    ("one pixel over the limit", "POST", "/predict", _file(OVER_LIMIT_PNG), {413}),
    ("body over the limit", "POST", "/predict", _file(b"0" * (MAX_BYTES + 1)), {413}),
    ("streamed body over the limit", "POST", "/predict",
     {"content": _streamed(), "headers": {"content-type": "multipart/form-data; boundary=b"}},
     {413}),
    ("huge Content-Length", "POST", "/predict",
     {"content": b"x", "headers": {"content-length": str(10**15)}}, {413}),
    ("JSON to /predict", "POST", "/predict", {"json": {"file": "x"}}, {400}),
    ("urlencoded to /predict", "POST", "/predict",
     {"content": b"file=abc", "headers": {"content-type": "application/x-www-form-urlencoded"}},
     {400}),
    ("multipart without a boundary", "POST", "/predict",
     {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, {400}),
    ("multipart garbage", "POST", "/predict",
     {"content": os.urandom(2000), "headers": {"content-type": "multipart/form-data; boundary=z"}},
     {400}),
    ("traversal in the filename", "POST", "/predict", _file(GOOD_PNG, "../../../etc/passwd"),
     {200}),
    ("unicode garbage filename and source", "POST", "/predict?source=%F0%9F%A6%81%FF%00",
     {**_file(GOOD_PNG, "\u202e\U0001f981\x00.png"), "data": {"source": "\u0000\u202e\U0001f981"}},
     {200}),
    ("oversized source", "POST", "/predict", {**_file(GOOD_PNG), "data": {"source": "s" * 50_000}},
     {200}),
    ("16-bit greyscale PNG", "POST", "/predict", _file(GREY16_PNG), {200}),
    ("CMYK JPEG", "POST", "/predict", _file(CMYK_JPEG, "c.jpg", "image/jpeg"), {200}),
    ("32-bit float TIFF", "POST", "/predict", _file(FLOAT_TIFF, "f.tif", "image/tiff"),
     {200, 400}),  # 400 until images.load_rgb converts every Pillow mode
    # /evaluations bodies
    ("invalid JSON", "POST", "/evaluations", _eval(b"{nope"), {400}),
    ("empty body", "POST", "/evaluations", _eval(b""), {400}),
    ("not UTF-8", "POST", "/evaluations", _eval(b"\xff\xfe\xfa{}"), {400}),
    ("JSON null", "POST", "/evaluations", _eval(None), {400}),
    ("JSON array", "POST", "/evaluations", _eval([OK_EVAL]), {400}),
    ("JSON string", "POST", "/evaluations", _eval("transaction 1 is right"), {400}),
    ("JSON number", "POST", "/evaluations", _eval(1), {400}),
    ("empty object", "POST", "/evaluations", _eval({}), {400}),
    ("id as a string", "POST", "/evaluations", _eval({**OK_EVAL, "transaction_id": "1"}), {400}),
    ("id as a float", "POST", "/evaluations", _eval({**OK_EVAL, "transaction_id": 1.5}), {400}),
    ("id as a bool", "POST", "/evaluations", _eval({**OK_EVAL, "transaction_id": True}), {400}),
    ("negative id", "POST", "/evaluations", _eval({**OK_EVAL, "transaction_id": -1}), {400}),
    ("id zero", "POST", "/evaluations", _eval({**OK_EVAL, "transaction_id": 0}), {400}),
    ("id 2**70", "POST", "/evaluations", _eval({**OK_EVAL, "transaction_id": 2**70}), {400}),
    ("id of 5000 digits", "POST", "/evaluations",
     _eval(b'{"transaction_id": ' + b"9" * 5000 + b', "reviewer": "a", "correct": true}'),
     {400}),
    ("id NaN", "POST", "/evaluations",
     _eval(b'{"transaction_id": NaN, "reviewer": "a", "correct": true}'), {400}),
    ("unknown id", "POST", "/evaluations", _eval({**OK_EVAL, "transaction_id": 999}), {404}),
    ("time not a date", "POST", "/evaluations", _eval({**OK_EVAL, "time": "not a date"}), {400}),
    ("time without a zone", "POST", "/evaluations",
     _eval({**OK_EVAL, "time": "2024-05-01T12:00:00"}), {400}),
    ("time past the calendar", "POST", "/evaluations",
     _eval({**OK_EVAL, "time": "9999-12-31T23:59:59-14:00"}), {400}),
    ("time as a number", "POST", "/evaluations", _eval({**OK_EVAL, "time": 1714564800}), {400}),
    ("correct as a string", "POST", "/evaluations", _eval({**OK_EVAL, "correct": "yes"}), {400}),
    ("reviewer as a list", "POST", "/evaluations", _eval({**OK_EVAL, "reviewer": ["a"]}), {400}),
    ("blank reviewer", "POST", "/evaluations", _eval({**OK_EVAL, "reviewer": "  "}), {400}),
    ("lone surrogate reviewer", "POST", "/evaluations",
     _eval(b'{"transaction_id": 1, "reviewer": "\\ud800", "correct": true}'), {400}),
    ("unicode garbage reviewer", "POST", "/evaluations",
     _eval({**OK_EVAL, "reviewer": "\u202e\U0001f981\u0000\ufffd"}), {201}),
    ("traversal as the true class", "POST", "/evaluations",
     _eval({**OK_EVAL, "correct": None, "true_class": "../../etc/passwd"}), {400}),
    ("oversized true class", "POST", "/evaluations",
     _eval({**OK_EVAL, "correct": None, "true_class": "z" * 100_000}), {400}),
    ("oversized notes", "POST", "/evaluations", _eval({**OK_EVAL, "notes": "n" * 150_000}),
     {400}),
    ("notes as an object", "POST", "/evaluations", _eval({**OK_EVAL, "notes": {"a": 1}}), {400}),
    ("neither correct nor true class", "POST", "/evaluations",
     _eval({"transaction_id": 1, "reviewer": "a"}), {400}),
    ("deep nesting", "POST", "/evaluations", _eval(b"[" * 100_000), {400}),
    ("deep nesting in a field", "POST", "/evaluations",
     _eval(b'{"transaction_id": 1, "notes": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"), {400}),
    ("JSON as text/plain", "POST", "/evaluations",
     {"content": json.dumps(OK_EVAL), "headers": {"content-type": "text/plain"}}, {201}),
]


@pytest.fixture
def client(trained_ws):
    models.write_deployed(trained_ws, "gen-0001")
    app = serving.create_app(trained_ws, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    with TestClient(app) as c:  # a server exception fails the test (raise_server_exceptions)
        yield c


def _leaks(text: str, ws) -> list[str]:
    """The server's absolute folders that appear in an answer."""
    folders = {str(ws.root), os.path.realpath(ws.root), str(ws.root.parent), sys.prefix}
    return [f for f in folders if f in text]


def test_hostile_requests_get_4xx_without_paths_and_serving_goes_on(client, trained_ws):
    assert client.post("/predict", **_file(GOOD_PNG)).json()["transaction_id"] == 1
    assert len(CASES) >= 30
    wrong = []
    for what, method, url, kwargs, statuses in CASES:
        r = client.request(method, url, **kwargs)
        if r.status_code not in statuses or r.status_code >= 500 or _leaks(r.text, trained_ws):
            wrong.append(f"{what}: {r.status_code} {r.text[:300]}")
        if r.status_code >= 400:
            assert "error" in r.json(), what  # every error answer is JSON
    assert wrong == []
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert client.post("/predict", **_file(NOISE_JPEG, "n.jpg", "image/jpeg")).status_code == 200
    served = translog.transactions(trained_ws)
    assert served["image"].map(lambda p: p.startswith("served/")).all()  # never a given name
