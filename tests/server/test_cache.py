"""The exact reward cache (`--cache-mb`): answers equal to computing, identical samples computed once even
when in flight together, bounded memory, no reward carried across model versions, and a failed or
abandoned computation never leaving its waiters hanging."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter

from rm_client import AsyncRewardClient, RewardClient
from rm_server.launch import start_server, stop_server
from rm_server.runtime.cache import RewardCache
from tests.conftest import random_texts
from tests.server.test_model_repo import add_version, make_repo, scorer_of, second_bundle, serve_repo  # noqa: F401
from tests.server.test_service import metrics


def grpo_groups(seed: int, n_groups: int) -> list[tuple[list[str], list[str]]]:
    """(prompts, responses) per group of 8: short answers repeat, as they do in GRPO rollouts."""
    rng = random.Random(seed)
    texts = random_texts(rng, n_groups * 4)
    short = ["42.", "Yes.", "No.", "The answer is 7."]
    groups = []
    for g in range(n_groups):
        prompt = texts[g][0]
        responses = [rng.choice(short) if rng.random() < 0.5 else texts[rng.randrange(len(texts))][1] for _ in range(8)]
        groups.append(([prompt] * 8, responses))
    return groups


def send_concurrently(target: str, groups, rounds: int = 2) -> list[list[float]]:
    """Every group `rounds` times from 8 concurrent callers (a retried or resent step repeats samples)."""

    async def run():
        async with AsyncRewardClient(target, timeout_s=120) as client:
            work = [group for _ in range(rounds) for group in groups]
            return await asyncio.gather(*(client.score(*group) for group in work))

    return [list(r) for r in asyncio.run(run())]


def test_cached_answers_equal_computed_ones_bit_for_bit_and_each_sample_is_computed_once(encoder_bundle, tmp_path):
    """Two servers scoring one sample per batch (so every computation is the same arithmetic): with the cache
    and without, the same concurrent GRPO traffic gets the same floats, bit for bit. The cached server
    computed each distinct sample exactly once; every other lookup was a hit or merged into a computation
    in flight."""
    groups = grpo_groups(seed=3, n_groups=24)
    flags = ("--max-batch-size", "1")
    cached = start_server(encoder_bundle, tmp_path / "cached.log", *flags, "--cache-mb", "8")
    plain = start_server(encoder_bundle, tmp_path / "plain.log", *flags)
    try:
        with_cache = send_concurrently(cached.target, groups)
        without = send_concurrently(plain.target, groups)
        counts = metrics(cached)
    finally:
        stop_server(cached)
        stop_server(plain)
    assert np.array_equal(np.array(with_cache), np.array(without))  # bit for bit
    samples = [(p, r) for prompts, responses in groups for p, r in zip(prompts, responses)]
    total, distinct = 2 * len(samples), len(set(samples))
    lookups = {r: counts.get(f'rm_cache_lookups_total{{result="{r}"}}', 0.0) for r in ("hit", "merged", "miss")}
    warm_up = lookups["miss"] - distinct  # the server's own warm-up and reference samples
    assert 0 <= warm_up <= 64, lookups
    assert lookups["hit"] + lookups["merged"] == total - distinct and lookups["merged"] > 0, lookups
    assert 0 < counts["rm_cache_bytes"] <= 8 * 2**20


def test_the_cache_stays_within_its_size_and_answers_right_after_evicting(encoder_bundle, tmp_path, reference):
    texts = random_texts(random.Random(8), 400)
    server = start_server(encoder_bundle, tmp_path / "serve.log", "--cache-mb", "0.01")
    try:
        with RewardClient(server.target) as client:
            first = client.score(*zip(*texts))
            again = client.score(*zip(*texts))  # most were evicted: computed again, some hit
        counts = metrics(server)
    finally:
        stop_server(server)
    expected = [reference(p, r) for p, r in texts]
    np.testing.assert_allclose(first, expected, atol=1e-5)
    np.testing.assert_allclose(again, expected, atol=1e-5)
    assert 0 < counts["rm_cache_bytes"] <= 0.01 * 2**20


def test_a_new_version_never_answers_with_the_old_versions_cached_rewards(encoder_bundle, second_bundle, tmp_path):  # noqa: F811
    repo = make_repo(tmp_path, ("toy", "1", encoder_bundle))
    server = serve_repo(repo, tmp_path / "serve.log", "--poll-s", "0.3", "--cache-mb", "4")
    texts = random_texts(random.Random(2), 32)
    try:
        with RewardClient(server.target) as client:
            client.score(*zip(*texts))  # cached by version 1
            add_version(repo, "toy", "2", second_bundle)
            for _ in range(200):
                if client.model_info().version == "2":
                    break
                asyncio.run(asyncio.sleep(0.1))
            rewards = client.score(*zip(*texts))
            assert client.last_models[0].startswith("toy v2 ")
    finally:
        stop_server(server)
    v1, v2 = scorer_of(encoder_bundle), scorer_of(second_bundle)
    np.testing.assert_allclose(rewards, [v2(p, r) for p, r in texts], atol=1e-5)
    assert not np.allclose(rewards, [v1(p, r) for p, r in texts], atol=1e-3)


@pytest.mark.parametrize("failure", ["error", "cancel"])
def test_waiters_of_a_failed_or_abandoned_computation_compute_it_themselves(failure):
    """An identical sample in flight is awaited, not recomputed; when the request computing it fails or is
    cancelled (its client went away), the waiting request computes it itself instead of failing or hanging."""
    lookups = Counter("lookups", "", ["result"], registry=CollectorRegistry())
    cache = RewardCache(2**20, lookups)
    computed: list[list[tuple[int, ...]]] = []
    release = asyncio.Event()

    async def owner_compute(sequences, on_row):
        computed.append([tuple(s) for s in sequences])
        await release.wait()
        raise RuntimeError("engine failed")

    async def compute(sequences, on_row):
        computed.append([tuple(s) for s in sequences])
        return np.array([float(sum(s)) for s in sequences], dtype=np.float32)

    async def run():
        owner = asyncio.create_task(cache.rewards([[1, 2], [3]], owner_compute))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(cache.rewards([[3], [1, 2], [5]], compute))
        second = asyncio.create_task(cache.rewards([[1, 2]], compute))
        await asyncio.sleep(0.01)
        if failure == "cancel":
            owner.cancel()
        else:
            release.set()
        with pytest.raises(asyncio.CancelledError if failure == "cancel" else RuntimeError):
            await owner
        return await asyncio.wait_for(asyncio.gather(waiter, second), 5)

    waited, second = asyncio.run(run())
    assert list(waited) == [3.0, 3.0, 5.0] and list(second) == [3.0]
    # the owner's two samples, the waiter's own one, then each failed sample once more: whichever waiter
    # wakes first computes it, the other waits on that instead of computing it a third time
    assert computed[:2] == [[(1, 2), (3,)], [(5,)]]
    assert sorted(ids for batch in computed[2:] for ids in batch) == [(1, 2), (3,)]
    assert asyncio.run(cache.rewards([[1, 2], [3], [5]], owner_compute)).tolist() == [3.0, 3.0, 5.0]  # all cached


def test_a_waiter_is_answered_when_its_row_is_ready_not_when_the_whole_request_is():
    """A one-sample call whose sample is row 0 of a large request in flight: answered as that row's batch
    finishes (the batcher reports rows as they are done), not after the large request's last batch."""
    cache = RewardCache(2**20, Counter("lookups", "", ["result"], registry=CollectorRegistry()))
    rest = asyncio.Event()

    async def large(sequences, on_row):
        on_row(0, 1.5)  # the first batch, holding row 0, is done
        await rest.wait()  # the other rows' batches are not
        return np.array([1.5] + [2.0] * (len(sequences) - 1), dtype=np.float32)

    async def never(sequences, on_row):
        raise AssertionError("the waiter must not compute its sample itself")

    async def run():
        owner = asyncio.create_task(cache.rewards([[1], [2], [3]], large))
        await asyncio.sleep(0)
        small = await asyncio.wait_for(cache.rewards([[1]], never), 5)
        assert not owner.done()
        rest.set()
        return small, await owner

    small, whole = asyncio.run(run())
    assert small.tolist() == [1.5] and whole.tolist() == [1.5, 2.0, 2.0]
