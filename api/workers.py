"""Bounded worker pool for model work.

``workers`` threads run calls; at most ``queue_size`` more may wait. A call beyond that is refused at
once with :class:`Saturated` (mapped to 503 + ``Retry-After``): nothing queues without bound. A slot is
held until the underlying call really finishes, even when the HTTP request timed out or the client went
away, so the bound counts the work the CPU actually does. ``shutdown()`` waits for in-flight work.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
_END = object()


class Saturated(RuntimeError):
    """Every worker is busy and the wait queue is full."""


class ShuttingDown(RuntimeError):
    """The pool no longer accepts work."""


class WorkerPool:
    def __init__(self, workers: int, queue_size: int) -> None:
        assert workers >= 1, f"workers must be >= 1, got {workers}"
        assert queue_size >= 0, f"queue_size must be >= 0, got {queue_size}"
        self.capacity = workers + queue_size
        self._slots = threading.BoundedSemaphore(self.capacity)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ttt-rag-worker")
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not yet finished (running + waiting)
        self._closed = False

    @property
    def depth(self) -> int:
        """Calls accepted and not finished yet (running + waiting)."""
        return self._pending

    def _acquire(self) -> None:
        if self._closed:
            raise ShuttingDown("server is shutting down")
        if not self._slots.acquire(blocking=False):
            raise Saturated(f"all {self.capacity} worker slots are busy")
        with self._lock:
            self._pending += 1

    def _release(self, _: Any = None) -> None:
        with self._lock:
            self._pending -= 1
        self._slots.release()

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn`` on a worker, or raise :class:`Saturated` right away."""
        self._acquire()
        try:
            fut = self._executor.submit(fn, *args, **kwargs)
        except RuntimeError as e:  # executor already shut down
            self._release()
            raise ShuttingDown("server is shutting down") from e
        fut.add_done_callback(self._release)
        return fut

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float | None = None, **kwargs: Any) -> T:
        """Await ``fn`` on a worker; ``asyncio.TimeoutError`` after ``timeout`` seconds."""
        fut = self.submit(fn, *args, **kwargs)
        # shield: a timed-out await must not try to cancel a running thread; the slot frees when it ends.
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), timeout)

    def stream(
        self, make_iter: Callable[[], Iterator[T]], buffer: int = 64, stall_s: float = 60.0
    ) -> AsyncIterator[T]:
        """Drive a blocking iterator on a worker and yield its items asynchronously.

        Reserves the slot immediately (so saturation is reported before any response starts). When the
        consumer stops early (client disconnect) or stops reading for ``stall_s`` seconds, the producer
        stops at its next item and frees the slot.
        """
        self._acquire()
        q: queue.Queue[Any] = queue.Queue(maxsize=buffer)
        stop = threading.Event()

        def produce() -> None:
            try:
                for item in make_iter():
                    waited = 0.0
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            waited += 0.1
                            if waited > stall_s:
                                log.warning("stream consumer stalled; stopping producer")
                                stop.set()
                    if stop.is_set():
                        return
                q.put(_END)
            except BaseException as e:  # noqa: BLE001 - forwarded to the consumer, which re-raises
                q.put(e)

        try:
            fut = self._executor.submit(produce)
        except RuntimeError as e:
            self._release()
            raise ShuttingDown("server is shutting down") from e
        fut.add_done_callback(self._release)
        return _consume(q, stop)

    def shutdown(self, wait: bool = True) -> None:
        """Refuse new work; with ``wait``, return once every accepted call has finished."""
        self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=False)
        log.info("worker pool stopped", extra={"pending": self._pending})


async def _consume(q: queue.Queue[Any], stop: threading.Event) -> AsyncIterator[Any]:
    delay = 0.001
    try:
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)
                continue
            delay = 0.001
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
