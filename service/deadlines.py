"""Request deadlines for the price of a dict insert: one sweeper task per event loop.

``asyncio.timeout`` schedules and cancels a timer handle for every request (two per request
here: body read and batch wait), which profiling showed at about 7% of a one-row request.
Deadlines of tens of seconds need no precision, so one task wakes every ``tick`` seconds
and cancels the tasks whose deadline has passed; the owner turns that cancellation into its
408/503 answer via :attr:`Deadline.expired`.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass


@dataclass
class Deadline:
    when: float
    task: asyncio.Task
    expired: bool = False


class DeadlineSweeper:
    def __init__(self, tick_s: float = 0.25) -> None:
        self.tick_s = tick_s
        self._active: dict[int, Deadline] = {}
        self._ids = itertools.count()
        self._sweeper: asyncio.Task | None = None

    def start(self, seconds: float) -> tuple[int, Deadline]:
        """Track the current task: cancelled (with ``expired`` set) ``seconds`` from now."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        deadline = Deadline(loop.time() + seconds, task)
        key = next(self._ids)
        self._active[key] = deadline
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = loop.create_task(self._sweep(), name="kanmoe-deadlines")
        return key, deadline

    def finish(self, key: int) -> None:
        self._active.pop(key, None)

    @staticmethod
    def absorb(deadline: Deadline) -> bool:
        """In an ``except CancelledError``: True (and the cancellation undone) when it was
        this deadline that fired, so the caller answers instead of re-raising."""
        if not deadline.expired:
            return False
        deadline.task.uncancel()
        return True

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while self._active:
            await asyncio.sleep(self.tick_s)
            now = loop.time()
            for key, deadline in list(self._active.items()):
                if deadline.when <= now:
                    del self._active[key]
                    deadline.expired = True
                    deadline.task.cancel()
