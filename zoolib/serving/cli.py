"""The command line: `python -m zoolib.serving WORKSPACE [--port 8000] ...`."""
from __future__ import annotations

import argparse
import math

from .. import inference
from ..workspace import ZoolibError
from .app import create_app
from .batching import MAX_BATCH
from .predictor import MAX_BYTES

MAX_UPLOAD_MB = 1024.0  # the CLI's ceiling for --max-mb: an upload is held in memory


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

