"""Closed-loop load generators: N clients each send their next request as soon as the last one is answered.

Every system gets the same list of requests (lists of (prompt, response) pairs); a point ends when the
list is exhausted, so each point does the same work.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from rm_contract.pb import reward_pb2 as pb
from rm_contract.pb import reward_pb2_grpc

Request = list[tuple[str, str]]


def make_requests(pairs: list[tuple[str, str]], n_requests: int, seed: int, largest: int = 32) -> list[Request]:
    """`n_requests` requests of 1-`largest` samples drawn at random (the same list for every system)."""
    rng = random.Random(seed)
    return [[rng.choice(pairs) for _ in range(rng.randint(1, largest))] for _ in range(n_requests)]


def summarize(latencies: list[float], samples: int, tokens: int, seconds: float) -> dict:
    ms = np.array(latencies) * 1000
    return {
        "samples_per_s": round(samples / seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "requests": len(latencies),
        "seconds": round(seconds, 2),
        "_latencies": latencies,  # raw, for the CDF plot; dropped before saving
    }


async def load_grpc(target: str, requests: list[Request], concurrency: int) -> dict:
    """rm-serve's Score RPC from `concurrency` asyncio clients sharing one channel."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        queue = list(reversed(requests))
        latencies, samples, tokens = [], 0, 0

        async def client() -> None:
            nonlocal samples, tokens
            while queue:
                request = queue.pop()
                message = pb.ScoreRequest(
                    samples=[pb.Sample(text=pb.TextPair(prompt=p, response=r)) for p, r in request]
                )
                started = time.perf_counter()
                response = await stub.Score(message, timeout=300)
                latencies.append(time.perf_counter() - started)
                samples += len(response.results)
                tokens += sum(r.num_tokens for r in response.results)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return summarize(latencies, samples, tokens, time.perf_counter() - started)


def load_grpc_points(target: str, requests: list[Request], concurrencies: list[int]) -> dict:
    asyncio.run(load_grpc(target, requests[:4], 2))  # open the connection, warm the server's paths
    return {str(c): asyncio.run(load_grpc(target, requests, c)) for c in concurrencies}


class HttpProtocol:
    """How one HTTP server wants a request and returns its rewards."""

    def __init__(self, path: str, body: Callable[[Request], dict], rewards: Callable[[dict], list[float]]):
        self.path, self.body, self.rewards = path, body, rewards


NAIVE = HttpProtocol("/score", lambda request: {"pairs": request}, lambda answer: answer["rewards"])


def _triton_body(request: Request) -> dict:
    def tensor(name: str, values: list[str]) -> dict:
        return {"name": name, "shape": [len(values), 1], "datatype": "BYTES", "data": values}

    return {"inputs": [tensor("prompt", [p for p, _ in request]), tensor("response", [r for _, r in request])]}


TRITON = HttpProtocol("/v2/models/reward/infer", _triton_body, lambda answer: answer["outputs"][0]["data"])


def post(url: str, body: dict, timeout: float = 300) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, data=json.dumps(body).encode()), timeout=timeout) as r:
        return json.loads(r.read())


def load_http(
    base_url: str, protocol: HttpProtocol, requests: list[Request], concurrency: int, tokens_of: Callable
) -> dict:
    """A JSON-over-HTTP server from `concurrency` client threads (one connection per request, as `requests`
    without a session does); `tokens_of(sample)` counts a request's samples' tokens."""
    queue = list(reversed(requests))
    latencies, counts = [], {"samples": 0, "tokens": 0}

    def client() -> None:
        while True:
            try:
                request = queue.pop()
            except IndexError:
                return
            started = time.perf_counter()
            rewards = protocol.rewards(post(base_url + protocol.path, protocol.body(request)))
            latencies.append(time.perf_counter() - started)
            if len(rewards) != len(request):
                raise RuntimeError(f"{base_url} answered {len(rewards)} rewards for {len(request)} samples")
            counts["samples"] += len(rewards)
            counts["tokens"] += sum(map(tokens_of, request))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    return summarize(latencies, counts["samples"], counts["tokens"], time.perf_counter() - started)
