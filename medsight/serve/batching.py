"""Micro-batching: concurrent requests are answered together in one model call.

Requests queue up while the model is busy; when it frees up, the worker takes everything
waiting (up to ``max_batch_size``) at once. When the queue is empty after the first request it
waits at most ``max_wait_ms`` for company, so a lone client pays a few milliseconds, not more.
Requests that do not share generation settings are split into separate calls. The model runs
in one dedicated thread, so the event loop keeps answering health checks meanwhile.

Every request gets exactly one outcome: its own result, or the exception its batch raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass
class _Pending:
    key: Hashable
    item: Any
    future: asyncio.Future


@dataclass(frozen=True)
class BatchStats:
    size: int
    seconds: float


class MicroBatcher:
    def __init__(
        self,
        run_batch: Callable[[list[Any]], list[Any]],
        *,
        max_batch_size: int = 8,
        max_wait_ms: float = 5.0,
        on_queue_depth: Callable[[int], None] | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.on_queue_depth = on_queue_depth or (lambda depth: None)
        self.on_batch = on_batch or (lambda stats: None)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medsight-model")
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Any, key: Hashable = None) -> Any:
        """Queue ``item`` and wait for its result; ``key`` groups items that may share a call."""
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run(), name="medsight-batcher")
        pending = _Pending(key, item, loop.create_future())
        await self._queue.put(pending)
        self.on_queue_depth(self._queue.qsize())
        return await pending.future

    async def _collect(self) -> list[_Pending]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        self.on_queue_depth(self._queue.qsize())
        return [p for p in batch if not p.future.done()]  # a client that went away is skipped

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            groups: dict[Hashable, list[_Pending]] = {}
            for pending in batch:
                groups.setdefault(pending.key, []).append(pending)
            for group in groups.values():
                started = loop.time()
                try:
                    results = await loop.run_in_executor(self._executor, self.run_batch, [p.item for p in group])
                    if len(results) != len(group):
                        raise RuntimeError(f"batch of {len(group)} requests produced {len(results)} results")
                except Exception as error:  # every waiting request learns why, none hangs
                    for pending in group:
                        if not pending.future.done():
                            pending.future.set_exception(error)
                    continue
                self.on_batch(BatchStats(len(group), loop.time() - started))
                for pending, result in zip(group, results):
                    if not pending.future.done():
                        pending.future.set_result(result)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
