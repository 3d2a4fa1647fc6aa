"""Scaling past one server: three replicas on loopback behind one client (round_robin); one is stopped
mid-load. Every sample is answered exactly once with its own reward, and the replicas' own counts of the
samples they scored add up to the work sent."""

from __future__ import annotations

import asyncio
import random
import re

import numpy as np

from rm_client import AsyncRewardClient, RetryPolicy
from rm_server.launch import start_server, stop_server
from tests.conftest import random_texts
from tests.server.test_service import metrics


def samples_scored(server) -> int:
    return int(metrics(server)["rm_samples_total"])


def test_three_replicas_one_stopped_mid_load(encoder_bundle, tmp_path, reference):
    replicas = [start_server(encoder_bundle, tmp_path / f"replica{i}.log") for i in range(3)]
    texts = random_texts(random.Random(5), 720)
    requests = [texts[i : i + 6] for i in range(0, len(texts), 6)]
    answered: list[int] = []
    victim = replicas[1]

    async def run():
        policy = RetryPolicy(max_attempts=10, initial_backoff_s=0.05, max_backoff_s=0.5)
        async with AsyncRewardClient([r.target for r in replicas], retry=policy, timeout_s=120) as client:
            gate = asyncio.Semaphore(8)

            async def one(i: int, request):
                async with gate:
                    rewards = await client.score(*zip(*request))
                answered.append(i)
                return rewards

            async def stop_one():
                while len(answered) < len(requests) // 3:
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(stop_server, victim)  # SIGTERM: drain, then exit

            *results, _ = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)), stop_one())
            return results

    try:
        results = asyncio.run(run())
        survivors = [samples_scored(r) for r in (replicas[0], replicas[2])]
    finally:
        for r in replicas:
            stop_server(r)
    got = np.concatenate(results)
    assert got.shape == (len(texts),) and sorted(answered) == list(range(len(requests)))
    np.testing.assert_allclose(got, [reference(p, r) for p, r in texts], atol=1e-5)
    assert victim.process.returncode == 0
    victim_scored = int(re.search(r"stopped \(samples scored: (\d+)\)", victim.log()).group(1))
    assert victim_scored > 0 and all(s > 0 for s in survivors)  # round_robin spread the load
    assert victim_scored + sum(survivors) == len(texts)  # nothing scored twice, nothing lost
