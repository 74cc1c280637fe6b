"""Dynamic micro-batching: concurrent requests for one model version share one session run.

Policy: a batch starts as soon as the runner is free, taking every queued request up to
``max_batch_rows`` (so a lone request pays no delay), and waits up to ``max_delay_s`` for
more rows only when that is set above zero. A small request that finds the runner idle and
the queue empty runs at once on the event loop: two thread hand-offs and a task wake-up
cost more than a few-row session run, and nothing else is waiting to be parsed then. The
caller says when that is safe (``may_inline``: the server has one open connection): an
inline run blocks the loop, so under load it would serialise every request and hide the
very concurrency batching feeds on.
While one batch runs in the worker thread the event loop keeps parsing requests, which is
where the coalescing comes from under load.
The queue is bounded in rows: past ``max_queue_rows`` a request is refused (429) at once
instead of waiting behind work the server cannot finish in time.
A request may ask for the ``full`` outputs (``run_full``, e.g. per-expert outputs for an
explanation); a batch holding one runs ``run_full`` for all its rows, so a request that did
not ask pays nothing for the others unless they share its batch.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

Outputs = dict[str, np.ndarray]
# Requests up to this many rows run inline when the batcher is idle (see the module doc).
INLINE_MAX_ROWS = 8
RunFn = Callable[[np.ndarray], Outputs]
# Called in the worker thread after each batch: (inputs, outputs, seconds).
BatchHook = Callable[[np.ndarray, Outputs, float], None]


class QueueFull(Exception):
    """The version's queue holds ``max_queue_rows`` rows already: answer 429."""


class Draining(Exception):
    """The batcher is closed (shutdown or unload): answer 503."""


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future[Outputs]
    full: bool = False


class MicroBatcher:
    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_rows: int = 256,
        max_delay_s: float = 0.0,
        max_queue_rows: int = 8192,
        enabled: bool = True,
        on_batch: BatchHook | None = None,
        executor: ThreadPoolExecutor | None = None,
        run_full: RunFn | None = None,
    ) -> None:
        self._run = run
        self._run_full = run_full or run
        self.max_batch_rows = max_batch_rows
        self.max_delay_s = max_delay_s
        self.max_queue_rows = max_queue_rows
        self.enabled = enabled
        self._on_batch = on_batch
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="kanmoe-batch")
        self._own_executor = executor is None
        self._queue: collections.deque[_Pending] = collections.deque()
        self.queued_rows = 0
        self.in_flight = 0  # requests accepted and not yet answered
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._busy = False  # a batch is running (inline or in the worker thread)

    # -- request side -------------------------------------------------------------------
    async def submit(self, x: np.ndarray, may_inline: bool = False, full: bool = False) -> Outputs:
        """Queue ``x`` (rows on axis 0) and wait for its slice of the batch's outputs;
        ``may_inline``: no other client is connected, so an idle runner may run it now;
        ``full``: run ``run_full`` (every output) for it."""
        if self._closed:
            raise Draining("the model is shutting down or being unloaded")
        rows = int(x.shape[0])
        if self.queued_rows + rows > self.max_queue_rows:
            raise QueueFull(
                f"queue full ({self.queued_rows} rows waiting, limit {self.max_queue_rows})"
            )
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        try:
            if not self.enabled:
                return await self._run_unbatched(loop, x, full)
            if (
                may_inline
                and self.max_delay_s == 0  # a configured delay asks for coalescing
                and not self._busy
                and not self._queue
                and rows <= INLINE_MAX_ROWS
            ):
                self._busy = True
                try:
                    return self._run_and_hook(x, full)
                finally:
                    self._busy = False
            self._ensure_task(loop)
            future: asyncio.Future[Outputs] = loop.create_future()
            self._queue.append(_Pending(x, future, full))
            self.queued_rows += rows
            assert self._wakeup is not None
            self._wakeup.set()
            return await future
        finally:
            self.in_flight -= 1

    async def _run_unbatched(
        self, loop: asyncio.AbstractEventLoop, x: np.ndarray, full: bool
    ) -> Outputs:
        self.queued_rows += int(x.shape[0])
        try:
            return await loop.run_in_executor(self._executor, self._run_and_hook, x, full)
        finally:
            self.queued_rows -= int(x.shape[0])

    # -- batch side ---------------------------------------------------------------------
    def _ensure_task(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._loop(), name="kanmoe-batcher")

    def _take_batch(self) -> list[_Pending]:
        """Queued requests up to the row limit, all with the first one's trailing shape."""
        batch: list[_Pending] = []
        rows = 0
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # its client went away: skip it
                self._queue.popleft()
                self.queued_rows -= int(item.x.shape[0])
                continue
            n = int(item.x.shape[0])
            if batch and (
                rows + n > self.max_batch_rows or item.x.shape[1:] != batch[0].x.shape[1:]
            ):
                break
            self._queue.popleft()
            self.queued_rows -= n
            batch.append(item)
            rows += n
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_delay_s > 0 and self.queued_rows < self.max_batch_rows:
                deadline = loop.time() + self.max_delay_s
                while self.queued_rows < self.max_batch_rows and loop.time() < deadline:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), deadline - loop.time())
                    except TimeoutError:
                        break
            batch = self._take_batch()
            if not batch:
                continue
            xs = [p.x for p in batch]
            x = xs[0] if len(xs) == 1 else np.concatenate(xs, axis=0)
            full = any(p.full for p in batch)
            self._busy = True
            try:
                outputs = await loop.run_in_executor(self._executor, self._run_and_hook, x, full)
            except Exception as exc:  # a failed run fails its own batch, never the loop
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            finally:
                self._busy = False
            start = 0
            for p in batch:
                stop = start + int(p.x.shape[0])
                if not p.future.done():
                    p.future.set_result({k: v[start:stop] for k, v in outputs.items()})
                start = stop

    def _run_and_hook(self, x: np.ndarray, full: bool = False) -> Outputs:
        t0 = time.perf_counter()
        outputs = self._run_full(x) if full else self._run(x)
        seconds = time.perf_counter() - t0
        if self._on_batch is not None:
            self._on_batch(x, outputs, seconds)
        return outputs

    # -- shutdown -----------------------------------------------------------------------
    async def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, let queued and running ones finish (up to ``timeout_s``)."""
        self._closed = True
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(Draining("the model was unloaded before this request ran"))
        self._queue.clear()
        if self._own_executor:
            self._executor.shutdown(wait=False)
