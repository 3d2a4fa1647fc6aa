"""An exact reward cache for one model version (`--cache-mb`, off by default): rewards keyed by token ids in
an LRU bounded in bytes, and identical inputs in flight merged into one computation.

Exact because a reward depends only on the ids (the bundle's batch-invariance check bounds what batching
changes, 1e-6 in fp32): a cached answer is the very float the engine returned for those ids, never a
reward of other ids, another model or another version (each loaded version holds its own cache, dropped
with it). RLHF traffic repeats itself: GRPO groups of short answers hold identical completions, and
retried or resent requests score the same samples again.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

import numpy as np
from prometheus_client import Counter

ENTRY_OVERHEAD_BYTES = 160
"""Memory of one entry beyond its key's bytes: the bytes object's header, the float, the dict slot and the
OrderedDict's links (measured with tracemalloc, rounded up)."""

Compute = Callable[[list[Sequence[int]]], Awaitable[np.ndarray]]


class RewardCache:
    def __init__(self, max_bytes: int, lookups: Counter):
        """`lookups`: a counter labelled by result (hit, merged, miss), one count per sample."""
        self.max_bytes, self._lookups = max_bytes, lookups
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[float]] = {}
        self.bytes = 0

    @staticmethod
    def key(ids: Sequence[int]) -> bytes:
        return np.asarray(ids, dtype=np.int64).tobytes()

    async def rewards(self, sequences: Sequence[Sequence[int]], compute: Compute) -> np.ndarray:
        """Rewards of `sequences` in order: from the cache, from an identical sequence being computed by
        another request (or earlier in this one), and through `compute` for the rest, which are stored."""
        keys = [self.key(s) for s in sequences]
        found: dict[bytes, float] = {}
        waiting: dict[bytes, asyncio.Future[float]] = {}
        owned: dict[bytes, Sequence[int]] = {}
        for key, ids in zip(keys, sequences):
            if key in found or key in waiting or key in owned:
                self._lookups.labels("merged").inc()
            elif (reward := self._entries.get(key)) is not None:
                self._entries.move_to_end(key)
                found[key] = reward
                self._lookups.labels("hit").inc()
            elif (future := self._inflight.get(key)) is not None:
                waiting[key] = future
                self._lookups.labels("merged").inc()
            else:
                owned[key] = ids
                self._lookups.labels("miss").inc()
        if owned:
            found.update(await self._compute(owned, compute))
        for key, future in waiting.items():
            await asyncio.wait([future])  # not the future itself: its owner's failure is not this call's
            if future.cancelled() or future.exception() is not None:  # the owner went away or failed: our turn
                found.update(await self._compute({key: sequences[keys.index(key)]}, compute))
            else:
                found[key] = future.result()
        return np.array([found[key] for key in keys], dtype=np.float32)

    async def _compute(self, owned: dict[bytes, Sequence[int]], compute: Compute) -> dict[bytes, float]:
        loop = asyncio.get_running_loop()
        futures = {key: loop.create_future() for key in owned}
        self._inflight.update(futures)
        try:
            rewards = await compute(list(owned.values()))
            out = {key: float(reward) for key, reward in zip(owned, rewards)}
            for key, reward in out.items():
                futures[key].set_result(reward)
                self._store(key, reward)
            return out
        finally:
            for key, future in futures.items():
                future.cancel()  # no-op once set; wakes the waiters of a failed or cancelled computation
                if self._inflight.get(key) is future:
                    del self._inflight[key]

    def _store(self, key: bytes, reward: float) -> None:
        if key in self._entries:
            return
        self._entries[key] = reward
        self.bytes += len(key) + ENTRY_OVERHEAD_BYTES
        while self.bytes > self.max_bytes and self._entries:
            old, _ = self._entries.popitem(last=False)
            self.bytes -= len(old) + ENTRY_OVERHEAD_BYTES

    def __len__(self) -> int:
        return len(self._entries)
