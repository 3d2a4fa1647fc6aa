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

from rm_contract.packing import StepIds

ENTRY_OVERHEAD_BYTES = 160
"""Memory of one entry beyond its key's bytes: the bytes object's header, the float, the dict slot and the
OrderedDict's links (measured with tracemalloc, rounded up)."""

Compute = Callable[[list[Sequence[int]], Callable[[int, float], None]], Awaitable[np.ndarray]]
"""Computes rewards of sequences, calling `on_row(i, reward)` as each one is ready (the batcher does)."""


class RewardCache:
    def __init__(self, max_bytes: int, lookups: Counter):
        """`lookups`: a counter labelled by result (hit, merged, miss), one count per sample."""
        self.max_bytes, self._lookups = max_bytes, lookups
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[float]] = {}
        self.bytes = 0

    @staticmethod
    def key(ids: Sequence[int]) -> bytes:
        """The ids' bytes; a process reward model's sample (`StepIds`) also holds where its steps are read,
        after its length (so no two (ids, steps) give one key)."""
        if isinstance(ids, StepIds):
            return np.asarray([len(ids), *ids, *ids.steps], dtype=np.int64).tobytes()
        return np.asarray(ids, dtype=np.int64).tobytes()

    async def rewards(
        self, sequences: Sequence[Sequence[int]], compute: Compute, keys: Sequence[bytes] | None = None
    ) -> np.ndarray:
        """Rewards of `sequences` in order: from the cache, from an identical sequence being computed by
        another request (or earlier in this one), and through one `compute` call for the rest, which are
        stored. `keys`: the sequences' `key`s, when already made off the event loop."""
        keys = keys if keys is not None else [self.key(s) for s in sequences]
        ids_of = dict(zip(keys, sequences))
        found: dict[bytes, float] = {}
        hits, merged, misses = 0, len(keys) - len(ids_of), 0  # repeats within the request: merged
        pending, first = list(ids_of), True
        while pending:  # more than once only when a computation we waited on failed or was abandoned
            waiting: dict[bytes, asyncio.Future[float]] = {}
            owned: dict[bytes, Sequence[int]] = {}
            for key in pending:
                if (reward := self._entries.get(key)) is not None:
                    self._entries.move_to_end(key)
                    found[key] = reward
                    hits += first
                elif (future := self._inflight.get(key)) is not None:
                    waiting[key] = future
                    merged += first
                else:
                    owned[key] = ids_of[key]
                    misses += first
            if first:
                for result, n in (("hit", hits), ("merged", merged), ("miss", misses)):
                    self._lookups.labels(result).inc(n)
            first = False
            if owned:
                found.update(await self._compute(owned, compute))
            if waiting:  # not the futures themselves: their owners' failures are not this call's
                await asyncio.wait(waiting.values())
            found.update({key: f.result() for key, f in waiting.items() if not f.cancelled()})
            pending = [key for key, f in waiting.items() if f.cancelled()]  # its owner failed or went away
        if any(isinstance(v, np.ndarray) for v in found.values()):  # step scores: one array per sample
            answer = np.empty(len(keys), dtype=object)
            answer[:] = [found[key] for key in keys]
            return answer
        return np.array([found[key] for key in keys], dtype=np.float32)

    async def _compute(self, owned: dict[bytes, Sequence[int]], compute: Compute) -> dict[bytes, float]:
        loop = asyncio.get_running_loop()
        futures = {key: loop.create_future() for key in owned}
        self._inflight.update(futures)
        keys = list(owned)

        def on_row(index: int, reward: float) -> None:  # waiters are answered with their row, not the request
            if not futures[keys[index]].done():
                futures[keys[index]].set_result(reward)
                self._store(keys[index], reward)

        try:
            rewards = await compute(list(owned.values()), on_row)
            for index, reward in enumerate(rewards):  # rows `compute` did not report one by one
                on_row(index, _plain(reward))
            return {key: _plain(reward) for key, reward in zip(keys, rewards)}
        finally:
            for key, future in futures.items():
                future.cancel()  # no-op once set; tells the waiters of a failed or abandoned computation
                if self._inflight.get(key) is future:
                    del self._inflight[key]

    def _store(self, key: bytes, reward: float | np.ndarray) -> None:
        if key in self._entries or not np.all(np.isfinite(reward)):  # a failure is not kept as an answer
            return
        self._entries[key] = reward
        self.bytes += _size(key, reward)
        while self.bytes > self.max_bytes and self._entries:
            old, value = self._entries.popitem(last=False)
            self.bytes -= _size(old, value)

    def __len__(self) -> int:
        return len(self._entries)


def _plain(reward: float | np.ndarray) -> float | np.ndarray:
    """A sequence reward as a Python float; a process reward model's step array as it is."""
    return reward if isinstance(reward, np.ndarray) else float(reward)


def _size(key: bytes, reward: float | np.ndarray) -> int:
    """An entry's memory: its key, a step array's values, the fixed overhead."""
    return len(key) + ENTRY_OVERHEAD_BYTES + (reward.nbytes if isinstance(reward, np.ndarray) else 0)
