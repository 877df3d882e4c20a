"""Serving: the logging Predictor, redeployment, the HTTP endpoint, a killed server."""
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from PIL import Image
from starlette.testclient import TestClient

from zoolib import models, reports, serving, translog
from zoolib.workspace import ZoolibError


def inbox_images(ws, n=4):
    return sorted(ws.inbox.rglob("img_*.jpg"))[:n]


def png_bytes(size=(40, 30), colour=(200, 100, 50)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def second_generation(ws) -> str:
    """gen-0002 as a copy of gen-0001 (no training needed to test a swap)."""
    shutil.copytree(ws.models / "gen-0001", ws.models / "gen-0002")
    info_path = ws.models / "gen-0002" / "model.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "name": "gen-0002"}))
    return "gen-0002"


def test_nothing_deployed_is_a_clear_error(trained_ws):
    with pytest.raises(ZoolibError, match="no generation is deployed"):
        serving.Predictor(trained_ws)
    assert serving.Predictor(trained_ws, generation="gen-0001").generation == "gen-0001"


def test_predict_path_bytes_and_pil_each_log_one_row(trained_ws):
    models.write_deployed(trained_ws, "gen-0001")
    pred = serving.Predictor(trained_ws, source="unit")
    path = inbox_images(trained_ws, 1)[0]
    a = pred.predict(path)
    b = pred.predict(path.read_bytes(), source="bytes")
    with Image.open(path) as img:
        c = pred.predict(img.copy())
    classes = models.read_info(trained_ws, "gen-0001")["classes"]
    assert a.image_hash == b.image_hash != c.image_hash
    assert a.predicted == b.predicted and a.top5 == b.top5
    assert len(a.top5) == 5 and a.top5[0] == (a.predicted, a.confidence)
    probs = [p for _, p in a.top5]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert {cls for cls, _ in a.top5} <= set(classes)
    tx = translog.transactions(trained_ws).set_index("id")
    assert list(tx.index) == [a.transaction_id, b.transaction_id, c.transaction_id]
    assert tx["source"].tolist() == ["unit", "bytes", "unit"]
    assert tx.loc[a.transaction_id, "predicted"] == a.predicted
    assert tx.loc[a.transaction_id, "confidence"] == pytest.approx(a.confidence)
    assert (tx["generation"] == "gen-0001").all() and (tx["latency_ms"] > 0).all()
    kept = trained_ws.root / tx.loc[a.transaction_id, "image"]
    assert kept.read_bytes() == path.read_bytes()  # the image is kept for review


def test_bad_images_raise_and_log_nothing(trained_ws):
    pred = serving.Predictor(trained_ws, generation="gen-0001", max_pixels=100 * 100)
    with pytest.raises(ZoolibError, match="not a readable image"):
        pred.predict(b"this is not an image")
    with pytest.raises(ZoolibError, match="not a readable image"):
        pred.predict((trained_ws.inbox / "camera1" / "truncated.jpg").read_bytes())
    with pytest.raises(serving.ImageTooLargeError, match="101x100"):
        pred.predict(png_bytes((101, 100)))
    with pytest.raises(ZoolibError, match="does not exist"):
        pred.predict(trained_ws.root / "missing.jpg")
    assert translog.transactions(trained_ws).empty


def test_log_failure_reaches_the_caller(trained_ws):
    pred = serving.Predictor(trained_ws, generation="gen-0001", log_timeout=0.2)
    blocker = __import__("sqlite3").connect(trained_ws.journal_db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(translog.TransactionLogError):
            pred.predict(inbox_images(trained_ws, 1)[0])
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert translog.transactions(trained_ws).empty


def test_redeployment_is_picked_up_without_losing_requests(trained_ws):
    models.write_deployed(trained_ws, "gen-0001")
    second_generation(trained_ws)
    pred = serving.Predictor(trained_ws)
    images = inbox_images(trained_ws, 4)
    results, errors = [], []

    def client(k):
        for i in range(8):
            try:
                results.append(pred.predict(images[(k + i) % 4], source=f"c{k}"))
            except Exception as exc:  # noqa: BLE001 - collected and asserted on
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    models.write_deployed(trained_ws, "gen-0002")
    for t in threads:
        t.join()
    assert errors == []
    after = pred.predict(images[0])
    assert after.generation == pred.generation == "gen-0002"
    tx = translog.transactions(trained_ws)
    assert len(tx) == len(results) + 1 == 25
    assert sorted(tx["id"]) == sorted([r.transaction_id for r in results] + [after.transaction_id])


def test_simulate_traffic(trained_ws, truth):
    second_generation(trained_ws)
    counts = serving.simulate_traffic(trained_ws, truth["inbox"], per_generation=8,
                                      eval_share=0.5, days=14, seed=3)
    tx = translog.joined(trained_ws)
    assert list(counts) == ["gen-0001", "gen-0002"]
    assert tx.groupby("generation").size().to_dict() == {"gen-0001": 8, "gen-0002": 8}
    assert tx["evaluated"].sum() == sum(c["evaluations"] for c in counts.values()) > 0
    assert tx["time"].is_monotonic_increasing
    assert (tx["time"].max() - tx["time"].min()).days >= 5  # spread over simulated days
    ev = tx[tx["evaluated"]]
    assert (ev["evaluated_at"] > ev["time"]).all()
    assert set(ev["true_class"]) <= set(truth["inbox"].values())
    assert (ev["correct"] == (ev["true_class"] == ev["predicted"])).all()
    assert not trained_ws.deployed_json.exists()  # the user's deployment is untouched


@pytest.fixture
def client(trained_ws):
    models.write_deployed(trained_ws, "gen-0001")
    app = serving.create_app(trained_ws, max_bytes=200_000, max_pixels=500 * 500)
    with TestClient(app) as c:
        yield c


def test_http_predict_and_evaluate(client, trained_ws):
    assert client.get("/health").json() == {"status": "ok", "generation": "gen-0001",
                                            "log": True}
    path = inbox_images(trained_ws, 1)[0]
    r = client.post("/predict", files={"file": ("a.jpg", path.read_bytes(), "image/jpeg")},
                    data={"source": "pytest"})
    assert r.status_code == 200
    body = r.json()
    assert body["generation"] == "gen-0001" and len(body["top5"]) == 5
    tx = translog.transactions(trained_ws).set_index("id")
    assert tx.loc[body["transaction_id"], "source"] == "pytest"
    assert tx.loc[body["transaction_id"], "predicted"] == body["predicted"]
    r = client.post("/evaluations", json={"transaction_id": body["transaction_id"],
                                          "reviewer": "anna", "true_class": "zebra"})
    assert r.status_code == 201
    joined = translog.joined(trained_ws).set_index("id").loc[body["transaction_id"]]
    assert joined["true_class"] == "zebra" and joined["reviewer"] == "anna"
    assert bool(joined["correct"]) == (body["predicted"] == "zebra")


def test_http_bad_requests_get_4xx_and_serving_goes_on(client, trained_ws):
    good = inbox_images(trained_ws, 1)[0].read_bytes()

    def chunks():  # no content-length header: the limit must hold while streaming
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n"
        for _ in range(50):
            yield b"\0" * 10_000

    cases = [
        (client.post("/predict", data={"source": "x"}), 400, "multipart field 'file'"),
        (client.post("/predict", files={"file": ("a.txt", b"hello", "text/plain")}), 400,
         "not a readable image"),
        (client.post("/predict", files={"file": ("big.jpg", b"0" * 300_000, "image/jpeg")}),
         413, "limit of 200000 bytes"),
        (client.post("/predict", content=chunks(),
                     headers={"content-type": "multipart/form-data; boundary=b"}), 413,
         "exceeds 200000 bytes"),
        (client.post("/predict", files={"file": ("bomb.png", png_bytes((600, 600)),
                                                 "image/png")}), 413, "600x600"),
        (client.post("/evaluations", json={"transaction_id": 12345, "reviewer": "a",
                                           "correct": True}), 404, "transaction 12345"),
        (client.post("/evaluations", content=b"{nope"), 400, "JSON"),
        (client.post("/evaluations", json={"transaction_id": "1"}), 400, "integer"),
        (client.get("/predict"), 405, ""),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        assert message in response.text
    assert translog.transactions(trained_ws).empty
    r = client.post("/predict", files={"file": ("a.jpg", good, "image/jpeg")})
    assert r.status_code == 200 and r.json()["transaction_id"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killed_server_leaves_a_log_that_opens_and_reports(trained_ws, tmp_path):
    models.write_deployed(trained_ws, "gen-0001")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "zoolib.serving", str(trained_ws.root),
                               "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None or time.time() > deadline:
                    raise
                time.sleep(0.5)
        ids = []
        for path in inbox_images(trained_ws, 6):
            r = httpx.post(f"{url}/predict", files={"file": (path.name, path.read_bytes())})
            ids.append(r.json()["transaction_id"])
        r = httpx.post(f"{url}/evaluations", json={"transaction_id": ids[0], "reviewer": "a",
                                                   "correct": False})
        assert r.status_code == 201
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    assert server.returncode == -signal.SIGKILL
    tx = translog.joined(trained_ws)
    assert tx["id"].tolist() == ids
    assert tx["evaluated"].sum() == 1
    metrics = reports.build(trained_ws, tmp_path / "report")
    assert metrics["transactions"] == 6 and metrics["evaluated"] == 1
    assert (tmp_path / "report" / "usage.png").exists()
    summary = json.loads(reports.summary(reports.load(trained_ws)).to_json(orient="index"))
    assert summary["gen-0001"]["predictions"] == 6
