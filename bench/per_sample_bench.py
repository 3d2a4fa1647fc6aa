"""Per-sample traffic against batched requests: the same samples sent one per request, all at once (how
OpenRLHF and veRL call a remote reward model), and as requests of `--batch` samples (how TRL calls it),
over gRPC and over the vLLM-compatible HTTP route, against one rm-serve.

    .venv/bin/python bench/per_sample_bench.py --bundle runs/demo/bundle

The batcher is meant to make the two equivalent: target per-sample >= 0.9x batched throughput. The load
generator runs on the same cores as the server; every mode scores the same samples in one run, ratios
are what count. Writes bench/results/per_sample.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import aiohttp
import grpc
import loadgen
import numpy as np
import servers
from serve_bench import demo_pairs, describe_machine

from rm_contract.pb import reward_pb2 as pb
from rm_contract.pb import reward_pb2_grpc


async def grpc_mode(target: str, requests: list[list[tuple[str, str]]], concurrency: int) -> dict:
    """`concurrency` requests in flight on one channel until all are answered."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)

        async def send(request: list[tuple[str, str]]) -> list[float]:
            message = pb.ScoreRequest(samples=[pb.Sample(text=pb.TextPair(prompt=p, response=r)) for p, r in request])
            return [r.reward for r in (await stub.Score(message, timeout=600)).results]

        return await closed_loop(send, requests, concurrency)


async def http_mode(base_url: str, requests: list[list[tuple[str, str]]], concurrency: int) -> dict:
    """POST /classify (vLLM's shape, raw rewards) from one aiohttp session, `concurrency` requests at once."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def send(request: list[tuple[str, str]]) -> list[float]:
            texts = [f"{p} {r}" for p, r in request]
            body = {"input": texts if len(texts) > 1 else texts[0], "use_activation": False}
            async with session.post(base_url + "/classify", json=body) as response:
                response.raise_for_status()
                return [d["probs"][0] for d in (await response.json())["data"]]

        return await closed_loop(send, requests, concurrency)


async def closed_loop(send, requests: list, concurrency: int) -> dict:
    queue = list(reversed(list(enumerate(requests))))
    latencies, rewards = [], {}

    async def client() -> None:
        while queue:
            index, request = queue.pop()
            started = time.perf_counter()
            rewards[index] = await send(request)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    point = loadgen.summarize(latencies, sum(len(r) for r in requests), 0, seconds)
    point.pop("_latencies")
    point.pop("tokens_per_s")
    point["_rewards"] = [x for i in sorted(rewards) for x in rewards[i]]
    return point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="runs/demo/bundle")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32, help="samples per batched request")
    parser.add_argument("--batched-concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="each mode this many times, best kept")
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()

    pairs = demo_pairs()
    rng = random.Random(0)
    samples = [rng.choice(pairs) for _ in range(args.samples)]
    per_sample = [[s] for s in samples]
    batched = [samples[i : i + args.batch] for i in range(0, len(samples), args.batch)]
    modes = {
        "grpc_per_sample": ("grpc", per_sample, len(per_sample)),
        "grpc_batched": ("grpc", batched, args.batched_concurrency),
        "http_per_sample": ("http", per_sample, len(per_sample)),
        "http_batched": ("http", batched, args.batched_concurrency),
    }
    http_port = servers.free_port()
    result: dict = {"machine": describe_machine(), "samples": len(samples), "batch": args.batch}
    with servers.rm_serve(args.bundle, "fp32", ["--http-port", str(http_port)]) as (target, _):
        base_url = f"http://127.0.0.1:{http_port}"
        run = {
            "grpc": lambda requests, c: asyncio.run(grpc_mode(target, requests, c)),
            "http": lambda requests, c: asyncio.run(http_mode(base_url, requests, c)),
        }
        for transport in ("grpc", "http"):
            run[transport](batched[:2], 2)  # connect, warm up
        for round_ in range(args.rounds):  # interleaved, so drift on a shared machine hits every mode alike
            for name, (transport, requests, concurrency) in modes.items():
                point = run[transport](requests, concurrency)
                print(f"round {round_}: {name} {point['samples_per_s']} samples/s, p99 {point['p99_ms']} ms")
                if point["samples_per_s"] > result.get(name, {}).get("samples_per_s", 0):
                    result[name] = point
    for transport in ("grpc", "http"):
        got, reference = result[f"{transport}_per_sample"], result[f"{transport}_batched"]
        worst = float(np.max(np.abs(np.array(got.pop("_rewards")) - np.array(reference.pop("_rewards")))))
        result[f"{transport}_per_sample_vs_batched"] = round(got["samples_per_s"] / reference["samples_per_s"], 3)
        result[f"{transport}_max_reward_difference"] = worst
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "per_sample.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
