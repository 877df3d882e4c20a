"""Serving: the logging Predictor, redeployment, the HTTP endpoint, a killed server."""
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from zoolib import machine, models, reports, serving, translog
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


@pytest.fixture
def client(trained_ws):
    models.write_deployed(trained_ws, "gen-0001")
    app = serving.create_app(trained_ws, max_bytes=200_000, max_pixels=500 * 500)
    with TestClient(app) as c:
        yield c


def test_http_predict_and_evaluate(client, trained_ws):
    assert client.get("/health").json() == {
        "status": "ok", "generation": "gen-0001", "deployed": "gen-0001", "deploy_error": None,
        "pinned": False, "log": True}
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


def test_evaluation_fields_out_of_range_get_400_naming_the_field(client, trained_ws):
    r = client.post("/predict", files={"file": ("a.png", png_bytes(), "image/png")})
    tid = r.json()["transaction_id"]  # an existing transaction: checks come before the log
    base = {"transaction_id": tid, "reviewer": "anna", "correct": True}
    cases = [
        ({**base, "transaction_id": 2**70}, "'transaction_id'"),  # too large for SQLite
        ({**base, "transaction_id": 2**63}, "'transaction_id'"),
        ({**base, "transaction_id": 0}, "'transaction_id'"),
        ({**base, "time": "not a date"}, "'time'"),
        ({**base, "time": "2024-05-01T12:00:00"}, "time zone"),
        ({**base, "time": "9999-12-31T23:59:59-14:00"}, "out of range"),  # after UTC's last
        ({**base, "reviewer": "\ud800"}, "'reviewer'"),  # a lone surrogate SQLite refuses
        ({**base, "notes": "x" * 10_001}, "'notes'"),
    ]
    for body, field in cases:
        r = client.post("/evaluations", content=json.dumps(body),
                        headers={"content-type": "application/json"})
        assert r.status_code == 400 and field in r.json()["error"], (body, r.text)
    r = client.post("/evaluations", content=b"[" * 100_000,
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]
    assert translog.evaluations(trained_ws).empty
    assert client.post("/evaluations", json={**base, "time": "2024-05-01T12:00:00Z"}
                       ).status_code == 201


def test_error_answers_name_no_absolute_path_of_the_server(client, trained_ws):
    r = client.post("/evaluations", json={"transaction_id": 777, "reviewer": "a",
                                          "correct": True})
    assert r.status_code == 404
    assert r.json()["error"] == "transaction 777 does not exist in WORKSPACE/zoo.sqlite"
    assert str(trained_ws.root) not in r.text
    root = trained_ws.root
    message = (f"prediction not logged to {root / 'zoo.sqlite'}: disk I/O error; see "
               f"'{root}' and /var/lib/zoo/x.db, multipart/form-data, POST /predict, "
               "<_io.BytesIO object at 0x7f01ab>")
    assert serving.app._public(message, root) == (
        "prediction not logged to WORKSPACE/zoo.sqlite: disk I/O error; see 'WORKSPACE' and "
        "<path>, multipart/form-data, POST /predict, <object>")


def test_health_reports_a_failed_redeployment_as_degraded(client, trained_ws):
    broken = second_generation(trained_ws)
    (trained_ws.models / broken / "weights.safetensors").write_bytes(b"not safetensors")
    models.write_deployed(trained_ws, broken)
    r = client.get("/health")
    assert r.status_code == 200
    state = r.json()
    assert (state["status"], state["generation"], state["deployed"]) == (
        "degraded", "gen-0001", "gen-0002")
    assert "gen-0002" in state["deploy_error"] and "still serving gen-0001" in state["deploy_error"]
    assert str(trained_ws.root) not in r.text
    ok = client.post("/predict", files={"file": ("a.png", png_bytes(), "image/png")})
    assert ok.status_code == 200 and ok.json()["generation"] == "gen-0001"  # the old one serves
    models.write_deployed(trained_ws, "gen-0001")  # a redeployment clears the sign
    state = client.get("/health").json()
    assert (state["status"], state["deployed"], state["deploy_error"]) == ("ok", "gen-0001", None)
    trained_ws.deployed_json.unlink()
    state = client.get("/health").json()
    assert state["status"] == "degraded" and state["deployed"] is None
    assert "deployed.json" in state["deploy_error"]


def test_a_hand_edited_deployment_of_a_throwaway_generation_is_not_served(client, trained_ws):
    """models.write_deployed refuses a throw-away run; the server must as well."""
    name = second_generation(trained_ws)
    info_path = trained_ws.models / name / "model.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "throwaway": True}))
    trained_ws.deployed_json.write_text(json.dumps({"generation": name}))  # by hand
    state = client.get("/health").json()
    assert (state["status"], state["generation"]) == ("degraded", "gen-0001")
    assert "throw-away" in state["deploy_error"]
    ok = client.post("/predict", files={"file": ("a.png", png_bytes(), "image/png")})
    assert ok.json()["generation"] == "gen-0001"


@pytest.mark.parametrize("args, message", [
    (["--port", "99999"], "99999 is not a port from 1 to 65535"),
    (["--port", "0"], "0 is not a port from 1 to 65535"),
    (["--port", "-1"], "-1 is not a port"),
    (["--port", "http"], "'http' is not a port number"),
    (["--max-mb", "-1"], "-1 MiB is not an upload limit"),
    (["--max-mb", "0"], "0 MiB is not an upload limit"),
    (["--max-mb", "nan"], "nan MiB is not an upload limit"),
    (["--max-mb", "inf"], "inf MiB is not an upload limit"),
    (["--max-mb", "5000"], "5000 MiB is not an upload limit"),
    (["--max-mb", "ten"], "'ten' is not a number of MiB"),
    (["--max-batch", "0"], "0 is not a batch size from 1 to 1024"),
    (["--max-batch", "many"], "'many' is not a whole number"),
    (["--runtime", "tensorflow"], "invalid choice: 'tensorflow'"),
])
def test_cli_refuses_out_of_range_numbers_with_exit_code_2(trained_ws, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        serving.main([str(trained_ws.root), *args])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_a_workspace_with_nothing_deployed_with_exit_code_2(trained_ws, capsys):
    with pytest.raises(SystemExit) as stop:
        serving.main([str(trained_ws.root), "--port", "8123"])
    assert stop.value.code == 2
    assert "no generation is deployed" in capsys.readouterr().err


def test_pixel_budget_grants_in_arrival_order():
    budget, order = serving.PixelBudget(10), []

    def take(name, pixels, hold_s):
        with budget.hold(pixels):
            order.append(name)
            time.sleep(hold_s)

    first = threading.Thread(target=take, args=("a", 6, 0.3))
    first.start()
    time.sleep(0.05)
    late = [threading.Thread(target=take, args=(n, p, 0)) for n, p in (("b", 6), ("c", 3))]
    for t in late:
        t.start()
        time.sleep(0.05)
    assert order == ["a"]  # c would fit beside a, but b came first and does not
    for t in [first, *late]:
        t.join()
    assert order == ["a", "b", "c"] and budget.used == 0
    with budget.hold(50):  # larger than the whole budget: decodes alone, never deadlocks
        assert budget.used == 10


# Run in a fresh process (one malloc arena, so the peak measures what the code holds at
# once, not glibc keeping freed blocks per thread): 6 threads predict a 33 KB PNG that
# decodes to 9 megapixels, with a budget of two such images.
_MEMORY_PROBE = """
import io, sys, threading
from PIL import Image
from zoolib import serving
side, budget = 3000, 2 * 3000 * 3000
buf = io.BytesIO()
Image.new("RGB", (side, side), (90, 140, 60)).save(buf, "PNG")
pred = serving.Predictor(sys.argv[1], generation="gen-0001", log=False, keep_images=False,
                         decode_pixels=budget)
pred.predict(Image.new("RGB", (64, 64)))  # warm: the model's first call allocates
def status(key):  # KiB
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM starts again from here (Linux 4.0+)
rss = status("VmRSS")
threads = [threading.Thread(target=pred.predict, args=(buf.getvalue(),)) for _ in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
# Not ru_maxrss: it keeps the high-water mark of the process before exec, the pytest
# process here when subprocess spawns with vfork (which is how the suite once saw
# 811 MiB). VmHWM is this program's own peak, since clear_refs above.
peak = status("VmHWM")
print(pred.decoding.peak, (peak - rss) * 1024, budget)
"""


# glibc's malloc, made to give freed memory back at once, so that the peak RSS is the
# peak of what was live: one arena for all threads, and every block of 128 KiB or more
# its own mapping (by default the threshold grows to 32 MiB after the first free of a
# big block, and the heap's high-water mark then depends on how threads interleave).
_PLAIN_MALLOC = {**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
                 "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
                 "MALLOC_TRIM_THRESHOLD_": "131072"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_concurrent_decodes_stay_within_the_pixel_budget(trained_ws):
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(trained_ws.root)],
                         capture_output=True, text=True, timeout=120, env=_PLAIN_MALLOC,
                         check=True)
    held, growth, budget = map(int, out.stdout.split()[-3:])
    assert 0 < held <= budget  # every decode went through the budget, which held
    # A decode holds 4 RGB copies at its peak (the file's pixels, the upright copy,
    # load_rgb's RGB copy, to_tensor's copy): 12 bytes a pixel; 25% for the rest.
    bound = budget * 12 * 1.25
    assert growth < bound, f"grew {growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"


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


# ----------------------------------------------------------------------------- under load

def distinct_images(ws, n=16) -> list[bytes]:
    """n files of distinct content: library images of every class, in turn."""
    classes = sorted(p for p in ws.library.iterdir() if p.is_dir() and p.name != "Unknown")
    per_class = [sorted(c.glob("*.jpg")) for c in classes]
    files = [per_class[k % len(classes)][k // len(classes)] for k in range(n)]
    return [f.read_bytes() for f in files]


def test_concurrent_calls_are_batched_and_each_gets_its_own_answer(trained_ws):
    from zoolib.images import content_hash

    images = distinct_images(trained_ws)
    alone = serving.Predictor(trained_ws, generation="gen-0001", log=False, keep_images=False)
    expected = {content_hash(d): alone.predict(d) for d in images}
    alone.close()
    pred = serving.Predictor(trained_ws, generation="gen-0001", batch_window_ms=50)
    answers, errors = [], []
    start = threading.Barrier(16)

    def client(k):
        start.wait()
        for i in range(4):
            data = images[(k + i) % len(images)]
            try:
                answers.append((content_hash(data), pred.predict(data, source=f"c{k}")))
            except Exception as exc:  # noqa: BLE001 - collected and asserted on
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pred.close()
    assert errors == [] and len(answers) == 64
    assert max(pred.batcher.sizes) > 1  # requests shared forward passes
    assert sum(n * count for n, count in pred.batcher.sizes.items()) == 64
    tx = translog.transactions(trained_ws).set_index("id")
    assert len(tx) == 64 and sorted(tx.index) == sorted(a.transaction_id for _, a in answers)
    for digest, answer in answers:
        ref = expected[digest]
        assert answer.image_hash == digest == tx.loc[answer.transaction_id, "image_hash"]
        assert answer.predicted == ref.predicted == tx.loc[answer.transaction_id, "predicted"]
        assert answer.confidence == pytest.approx(ref.confidence, abs=1e-4)


def test_a_lone_call_is_not_held_back_by_the_window(trained_ws):
    pred = serving.Predictor(trained_ws, generation="gen-0001", log=False, keep_images=False,
                             batch_window_ms=1000)
    data = distinct_images(trained_ws, 1)[0]
    pred.predict(data)  # warm
    t0 = time.perf_counter()
    for _ in range(3):
        pred.predict(data)
    assert time.perf_counter() - t0 < 1.0  # a second's window per call would take 3
    pred.close()


def test_batcher_caps_batches_splits_generations_and_passes_errors():
    calls = []

    def forward(loaded, x):
        calls.append((loaded, len(x)))
        if loaded == "bad":
            raise RuntimeError("model broke")
        return x[:, 0, 0, :1]  # each row answers with its own input value

    batcher = serving.Batcher(max_batch=3, window_ms=1000, forward=forward)
    for _ in range(5):
        batcher.expect()
    futures = [batcher.submit("g1" if k % 2 else "g2", torch.full((1, 1, 1, 1), float(k)))
               for k in range(5)]
    assert [float(f.result(timeout=10)[0]) for f in futures] == [0, 1, 2, 3, 4]
    # Two passes of at most 3 (requests 0-2, then 3-4), each split by generation.
    assert calls == [("g2", 2), ("g1", 1), ("g1", 1), ("g2", 1)]
    batcher.expect()
    with pytest.raises(RuntimeError, match="model broke"):
        batcher.submit("bad", torch.zeros((1, 1, 1, 1))).result(timeout=10)
    batcher.expect()
    batcher.withdraw()  # a request whose decode failed: nobody waits for it
    batcher.expect()
    assert float(batcher.submit("g1", torch.full((1, 1, 1, 1), 7.0)).result(timeout=10)) == 7
    batcher.close()
    with pytest.raises(ZoolibError, match="closed"):
        batcher.expect()
        batcher.submit("g1", torch.zeros((1, 1, 1, 1)))


@pytest.mark.parametrize("kw, message", [
    ({"max_batch": 0}, "max_batch must be a positive integer"),
    ({"batch_window_ms": -1}, "batch_window_ms must be a number from 0 to 1000"),
    ({"runtime": "tensorflow"}, "runtime must be one of"),
])
def test_batching_and_runtime_parameters_are_checked(trained_ws, kw, message):
    with pytest.raises(ZoolibError, match=message):
        serving.Predictor(trained_ws, generation="gen-0001", **kw)


def test_http_requests_under_load_batch_in_bounded_threads(trained_ws):
    from zoolib.images import content_hash

    models.write_deployed(trained_ws, "gen-0001")
    app = serving.create_app(trained_ws, threads=2, batch_window_ms=50)
    predictor = app.state.predictor
    assert app.state.limiter.total_tokens == 2
    assert serving.create_app(trained_ws).state.limiter.total_tokens == machine.cores()
    active, most, lock = [0], [0], threading.Lock()
    prepare = predictor._prepare

    def counted(*args):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return prepare(*args)
        finally:
            with lock:
                active[0] -= 1

    predictor._prepare = counted
    images = distinct_images(trained_ws, 8)
    answers, start = [], threading.Barrier(8)
    with TestClient(app) as http:
        def client(k):
            start.wait()
            for i in range(3):
                data = images[(k + i) % len(images)]
                r = http.post("/predict", files={"file": ("x.jpg", data, "image/jpeg")})
                answers.append((content_hash(data), r.status_code, r.json()))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(answers) == 24 and {status for _, status, _ in answers} == {200}
    assert 1 <= most[0] <= 2  # never more decodes at once than the bound
    tx = translog.transactions(trained_ws).set_index("id")
    assert len(tx) == 24
    for digest, _, body in answers:
        assert body["image_hash"] == digest == tx.loc[body["transaction_id"], "image_hash"]
