"""Soak: sustained mixed traffic for a fixed time (RM_SOAK_S, default 20 s), checking every few seconds that
the server's memory stays flat and that its answers still equal the one-by-one reference."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import numpy as np

from rm_client import AsyncRewardClient
from rm_client.samples import text_samples
from rm_server.launch import start_server, stop_server
from tests.conftest import random_texts

SOAK_S = float(os.environ.get("RM_SOAK_S", "20"))
CHECKS = 5
LEAK_LIMIT_MB_PER_S = 0.25
"""Growth allowed after the first check (warm-up: arenas, caches), as a rate, so that a leak of 1 MiB/s fails
however long the run (a fixed 40 MiB over the whole run lets it pass). Measured here: flat within a few MiB."""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_soak_memory_stays_flat_and_answers_stay_exact(encoder_bundle, tmp_path, reference):
    server = start_server(encoder_bundle, tmp_path / "serve.log")
    rng = random.Random(8)
    pool = random_texts(rng, 400)
    probe = pool[:16]
    expected_probe = np.array([reference(p, r) for p, r in probe], dtype=np.float32)
    served = {"samples": 0}
    rss, mismatches = [], []

    async def run():
        async with AsyncRewardClient(server.target, timeout_s=120) as client:
            stop_at = time.monotonic() + SOAK_S

            async def scorer(seed: int):
                local = random.Random(seed)
                while time.monotonic() < stop_at:
                    batch = local.sample(pool, local.randint(1, 48))
                    rewards = await client.score(*zip(*batch))
                    served["samples"] += len(rewards)

            async def other_methods():
                while time.monotonic() < stop_at:
                    prompt, response = rng.choice(pool)
                    await client.compare(prompt, response, "It was awful.")
                    await client.rank(prompt, [response, "Fine.", "Bad."])
                    async for _ in client.stream_scores([text_samples([prompt], [response])] * 4, in_flight=2):
                        served["samples"] += 1
                    served["samples"] += 5

            async def checker():
                for _ in range(CHECKS):
                    await asyncio.sleep(SOAK_S / CHECKS)
                    rss.append(rss_mb(server.process.pid))
                    got = await client.score(*zip(*probe))
                    if not np.allclose(got, expected_probe, atol=1e-5):
                        mismatches.append(float(np.abs(got - expected_probe).max()))

            await asyncio.gather(*(scorer(s) for s in range(4)), other_methods(), checker())

    try:
        asyncio.run(run())
    finally:
        stop_server(server)
    after_warm_up = SOAK_S * (CHECKS - 1) / CHECKS
    grown = max(rss[1:]) - rss[0]  # the worst point after the first check, whatever the path between
    print(f"soak {SOAK_S:.0f} s: {served['samples']} samples, RSS (MiB) {[round(r, 1) for r in rss]}")
    assert not mismatches, mismatches
    assert served["samples"] > 100 and len(rss) == CHECKS
    assert grown < LEAK_LIMIT_MB_PER_S * after_warm_up, rss
