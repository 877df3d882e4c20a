"""Sharing the work of concurrent requests: a pixel budget for decoding, and batched
forward passes (`Batcher`).
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from .. import inference
from ..workspace import ZoolibError

MAX_PIXELS = 40_000_000  # larger images are refused before decoding (decompression bombs)
# Pixels decoded at once, all requests together: one image of the largest size, or
# several smaller ones. Decoding holds about 12 bytes per pixel at its peak (the
# file's pixels, an upright copy, the RGB copy and the resize's copy), ~0.5 GB here.
DECODE_PIXELS = MAX_PIXELS
# waits for others to join it (only while others are decoding). 5 ms is small beside
# a request's own cost over HTTP (a few ms on 2 cores) and lets a burst gather.
MAX_BATCH = 16
BATCH_WINDOW_MS = 5.0


def positive(value: int, name: str) -> int:
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
        self.limit = positive(limit, "decode_pixels")
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
        self.max_batch = positive(max_batch, "max_batch")
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


def _window_s(batch_window_ms: float) -> float:
    """batch_window_ms in seconds, or a ZoolibError naming it."""
    if (not isinstance(batch_window_ms, (int, float)) or isinstance(batch_window_ms, bool)
            or not 0 <= batch_window_ms <= 1000):
        raise ZoolibError(f"batch_window_ms must be a number from 0 to 1000, not "
                          f"{batch_window_ms!r}")
    return batch_window_ms / 1000

