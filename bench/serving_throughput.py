"""Throughput and latency of `POST /predict`: log on versus off, and under growing load.

Starts three local servers on 127.0.0.1 for the same generation: logging off,
logging on, and logging on plus keeping each image for review (the default),
then sends the same bounded load (a fixed number of requests from a few client
threads) to each, in rotating order over several rounds, and prints requests
per second, p50/p99 latency and the ratios to the log-off server.

Then the load sweep: the log-on server gets the same number of requests from
1, 4 and 16 concurrent clients (--concurrency), in rotating order over the
rounds, and the table gives requests/s, latency and the ratio to one client;
the last line is the most-clients/1-client ratio (the goal on 2 cores: >= 1.5x,
from batching concurrent requests into one forward pass).

    nice .venv/bin/python bench/serving_throughput.py                  # demo model, trained here
    nice .venv/bin/python bench/serving_throughput.py --workspace ~/my-zoo --generation gen-0003
    nice .venv/bin/python bench/serving_throughput.py --runtime onnx --concurrency 1,4,16

The workspace is copied (its generation and some inbox images) to a temporary
folder, so the benchmark's transactions never reach a real log.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

MODES = {"log off": ["--no-log", "--no-keep-images"], "log on": ["--no-keep-images"],
         "log on + images": []}


def demo_workspace(root: Path) -> tuple[Path, str]:
    """A demo workspace with one tiny generation trained here (about a minute)."""
    from zoolib import demo
    from zoolib.train import TrainConfig, train

    ws = demo.build(root / "ws")
    result = train(ws, TrainConfig(arch="resnet18", img_size=32, epochs=1, num_workers=0),
                   progress=False)
    return ws.root, result.name


def copy_workspace(source: Path, generation: str, root: Path, n_images: int = 64) -> Path:
    """A scratch workspace holding `generation` and some of `source`'s inbox images."""
    from zoolib.images import IMAGE_SUFFIXES
    from zoolib.models import resolve_generation
    from zoolib.workspace import create, open_workspace

    src = open_workspace(source)
    generation = resolve_generation(src, generation)
    ws = create(root / "bench-ws")
    (ws.library / "placeholder").mkdir(exist_ok=True)
    shutil.copytree(src.models / generation, ws.models / generation)
    images = sorted(p for p in src.inbox.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for k, path in enumerate(images[:n_images]):
        shutil.copy(path, ws.inbox / f"{k:04d}{path.suffix}")
    return ws.root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(ws: Path, generation: str, flags: list[str], threads: int
          ) -> tuple[subprocess.Popen, str]:
    """A server on a free port, once its /health answers; (process, base URL)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "zoolib.serving", str(ws), "--port",
                             str(port), "--generation", generation, *flags], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server {flags} did not start")
            time.sleep(0.5)


def load(url: str, images: list[bytes], requests: int, clients: int) -> tuple[float, list[float]]:
    """Send `requests` predictions from `clients` threads; return (seconds, latencies in ms)."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client():
        with httpx.Client(timeout=60) as http:
            for k in counter:  # shared iterator: exactly `requests` in all
                t0 = time.perf_counter()
                r = http.post(f"{url}/predict", files={"file": ("x.jpg", images[k % len(images)])})
                r.raise_for_status()
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start_time = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start_time, latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def rotated(items: list, r: int) -> list:
    """`items` starting at r (mod its length): no item always runs first."""
    return items[r % len(items):] + items[:r % len(items)]


def sweep(url: str, images: list[bytes], requests: int, levels: list[int], rounds: int
          ) -> dict[int, tuple[float, list[float]]]:
    """(seconds, latencies) per number of concurrent clients, summed over the rounds."""
    out: dict[int, tuple[float, list[float]]] = {c: (0.0, []) for c in levels}
    for r in range(rounds):
        for clients in rotated(levels, r):
            s, lat = load(url, images, requests, clients)
            out[clients] = (out[clients][0] + s, out[clients][1] + lat)
    return out


def print_sweep(results: dict[int, tuple[float, list[float]]]) -> None:
    print(f"{'clients':<9}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'rps / 1 client':>16}")
    rps = {c: len(lat) / s for c, (s, lat) in results.items()}
    low, high = min(results), max(results)
    for c, (_, lat) in results.items():
        print(f"{c:<9}{rps[c]:>8.1f}{percentile(lat, 50):>9.1f}{percentile(lat, 99):>9.1f}"
              f"{rps[c] / rps[low]:>16.3f}")
    print(f"{high}-client/{low}-client requests/s: {rps[high] / rps[low]:.2f}x "
          "(goal on 2 cores: >= 1.5x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", help="take the model and images from here (copied)")
    parser.add_argument("--generation", default="last")
    parser.add_argument("--requests", type=int, default=300, help="requests per mode and round")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--concurrency", default="1,4,16",
                        help="client counts of the load sweep on the log-on server")
    parser.add_argument("--runtime", default=None, help="the servers' --runtime")
    parser.add_argument("--max-batch", type=int, default=None, help="the servers' --max-batch")
    args = parser.parse_args(argv)
    levels = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    extra = ((["--runtime", args.runtime] if args.runtime else [])
             + (["--max-batch", str(args.max_batch)] if args.max_batch else []))
    tmp = Path(tempfile.mkdtemp(prefix="zoolib-bench-"))
    servers = []
    try:
        source, generation = ((Path(args.workspace), args.generation) if args.workspace
                              else demo_workspace(tmp))
        ws = copy_workspace(source, generation, tmp)
        generation = next(p.name for p in (ws / "models").iterdir() if p.is_dir())
        images = [p.read_bytes() for p in sorted((ws / "inbox").iterdir())]
        for flags in MODES.values():
            servers.append(start(ws, generation, flags + extra, args.threads))
        urls = dict(zip(MODES, (url for _, url in servers)))
        for url in urls.values():
            load(url, images, 20, args.clients)  # warm-up, not counted
        seconds = {m: 0.0 for m in MODES}
        latencies: dict[str, list[float]] = {m: [] for m in MODES}
        order = list(MODES)
        for r in range(args.rounds):
            for mode in rotated(order, r):
                s, lat = load(urls[mode], images, args.requests, args.clients)
                seconds[mode] += s
                latencies[mode] += lat
        load(urls["log on"], images, 20, max(levels))  # warm the batching path too
        by_clients = sweep(urls["log on"], images, args.requests, levels, args.rounds)
        print(f"POST /predict, {generation}, {args.rounds} rounds x {args.requests} requests, "
              f"{args.clients} clients, {args.threads} torch thread(s) per server, runtime "
              f"{args.runtime or 'default'}, {os.cpu_count()} CPUs")
        print(f"{'mode':<18}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'rps / log off':>15}")
        base = len(latencies["log off"]) / seconds["log off"]
        for mode in MODES:
            rps = len(latencies[mode]) / seconds[mode]
            print(f"{mode:<18}{rps:>8.1f}{percentile(latencies[mode], 50):>9.1f}"
                  f"{percentile(latencies[mode], 99):>9.1f}{rps / base:>15.3f}")
        print(f"\nload sweep, log on: {args.rounds} rounds x {args.requests} requests per "
              "client count")
        print_sweep(by_clients)
        from zoolib import translog
        from zoolib.workspace import Workspace

        logged = len(translog.transactions(Workspace(ws)))
        expected = (2 * (args.rounds * args.requests + 20) + 20
                    + args.rounds * args.requests * len(levels))
        print(f"transaction rows: {logged} (expected {expected})")
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
