"""The threads that run sync tasks.

Python cannot stop a thread. ``concurrent.futures.ThreadPoolExecutor`` joins its threads when
the interpreter exits, so one sync task that ignores cancellation would keep a stopped worker
process alive for as long as it runs. These threads are daemons: a worker that has given up on
a stuck task (its job is left to the rescuer, see ``Worker._shutdown``) exits anyway.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

_STOP = None


class TaskThreads(Executor):
    """A fixed-size pool of daemon threads, started as work arrives."""

    def __init__(self, size: int, name: str = "pgsched-task") -> None:
        self._size = size
        self._name = name
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None]
        self._work = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if kwargs:
            raise TypeError("TaskThreads.submit takes positional arguments only")
        future: Future[Any] = Future()
        with self._lock:
            if self._idle == 0 and len(self._threads) < self._size:
                thread = threading.Thread(target=self._serve, name=f"{self._name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
            else:
                self._idle -= 1
        self._work.put((future, fn, args))
        return future

    def _serve(self) -> None:
        while True:
            item = self._work.get()
            if item is _STOP:
                return
            future, fn, args = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # handed to whoever awaits the future
                    future.set_exception(exc)
            with self._lock:
                self._idle += 1

    @property
    def busy(self) -> int:
        """Threads running a task now (or about to)."""
        with self._lock:
            return len(self._threads) - self._idle

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    item[0].cancel()
        for _ in self._threads:
            self._work.put(_STOP)
        if wait:
            for thread in self._threads:
                thread.join()
