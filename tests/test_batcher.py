"""MicroBatcher on its own: coalescing, correct splitting, back-pressure, inline runs, close."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from kanmoe.service.batcher import Draining, MicroBatcher, QueueFull


def recording_run(delay: float = 0.0):
    calls: list[tuple[int, str]] = []

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        calls.append((int(x.shape[0]), threading.current_thread().name))
        time.sleep(delay)
        return {"double": x * 2, "rowsum": x.reshape(len(x), -1).sum(1, keepdims=True)}

    return run, calls


def test_concurrent_requests_coalesce_and_each_gets_its_own_rows():
    run, calls = recording_run(delay=0.02)

    async def main():
        b = MicroBatcher(run, max_batch_rows=64)
        xs = [np.full((1 + i % 3, 4), i, np.float32) for i in range(40)]
        outs = await asyncio.gather(*(b.submit(x) for x in xs))
        await b.close()
        return xs, outs

    xs, outs = asyncio.run(main())
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_array_equal(out["double"], x * 2)
        np.testing.assert_array_equal(out["rowsum"], x.sum(1, keepdims=True))
    assert sum(n for n, _ in calls) == sum(len(x) for x in xs)
    assert len(calls) < 10, calls  # 40 requests, a handful of session runs
    assert all(n <= 64 for n, _ in calls)
    assert all(name.startswith("kanmoe-batch") for _, name in calls)


def test_different_window_lengths_never_share_a_batch():
    run, _ = recording_run(delay=0.01)

    async def main():
        b = MicroBatcher(run, max_batch_rows=64)
        xs = [np.ones((1, 5 + i % 2, 3), np.float32) for i in range(10)]
        outs = await asyncio.gather(*(b.submit(x) for x in xs))
        await b.close()
        return xs, outs

    xs, outs = asyncio.run(main())
    for x, out in zip(xs, outs, strict=True):
        assert out["double"].shape == x.shape


def test_full_queue_refuses_at_once_and_close_refuses_new_work():
    run, _ = recording_run(delay=0.2)

    async def main():
        b = MicroBatcher(run, max_batch_rows=4, max_queue_rows=4)
        first = asyncio.ensure_future(b.submit(np.ones((4, 2), np.float32)))
        await asyncio.sleep(0.05)  # running in the worker; the queue is empty again
        second = asyncio.ensure_future(b.submit(np.ones((4, 2), np.float32)))
        await asyncio.sleep(0.01)  # queued: 4 rows wait
        with pytest.raises(QueueFull, match="queue full"):
            await b.submit(np.ones((1, 2), np.float32))
        assert (await first)["double"].shape == (4, 2)
        assert (await second)["double"].shape == (4, 2)
        await b.close()
        with pytest.raises(Draining):
            await b.submit(np.ones((1, 2), np.float32))

    asyncio.run(main())


def test_inline_only_for_a_lone_client_an_idle_runner_and_no_configured_delay():
    run, calls = recording_run()
    main_thread = threading.current_thread().name

    async def main():
        b = MicroBatcher(run)
        await b.submit(np.ones((1, 2), np.float32), may_inline=True)
        await b.submit(np.ones((1, 2), np.float32), may_inline=False)
        await b.submit(np.ones((20, 2), np.float32), may_inline=True)  # too many rows
        delayed = MicroBatcher(run, max_delay_s=0.001)
        await delayed.submit(np.ones((1, 2), np.float32), may_inline=True)
        await b.close()
        await delayed.close()

    asyncio.run(main())
    assert [name == main_thread for _, name in calls] == [True, False, False, False]
