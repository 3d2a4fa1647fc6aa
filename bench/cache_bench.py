"""The exact reward cache (`--cache-mb`) on GRPO traffic: groups of one prompt and 8 responses where short
answers repeat within a group (as final answers do in math and QA rollouts: "42.", "The answer is 42."),
sent as whole-group requests by concurrent callers, against the same server without the cache, in one run.
Then the same groups again (a step resent after a trainer restart or a timeout): all hits.

    .venv/bin/python bench/cache_bench.py --bundle runs/demo/bundle

Reports throughput, the hit and merge rates and the engine time saved (rm_batch_inference_seconds from
the server's metrics). Writes bench/results/cache.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import urllib.request
from pathlib import Path

import loadgen
import servers
from serve_bench import demo_pairs, describe_machine

SHORT_ANSWERS = ["42.", "The answer is 42.", "41."]


def grpo_groups(n_groups: int, repeat_fraction: float, seed: int) -> list[list[tuple[str, str]]]:
    """(prompt, response) x 8 per group; `repeat_fraction` of the responses are short answers that repeat."""
    rng = random.Random(seed)
    pairs = demo_pairs()
    groups = []
    for _ in range(n_groups):
        prompt = rng.choice(pairs)[0]
        groups.append(
            [
                (prompt, rng.choice(SHORT_ANSWERS) if rng.random() < repeat_fraction else rng.choice(pairs)[1])
                for _ in range(8)
            ]
        )
    return groups


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        name: float(value)
        for line in body.splitlines()
        if line and not line.startswith("#")
        for name, value in [line.rsplit(" ", 1)]
    }


def run_points(bundle: str, cache_mb: float, groups: list, concurrency: int) -> dict:
    """The groups sent twice to one server: {"first": point, "resent": point}."""
    port = servers.free_port()
    extra = ["--cache-mb", str(cache_mb), "--metrics-port", str(port)]
    with servers.rm_serve(bundle, "fp32", extra) as (target, _):
        points = {}
        for name in ("first", "resent"):
            before = scrape(port)
            point = asyncio.run(loadgen.load_grpc(target, groups, concurrency))
            points[name] = measured(point, before, scrape(port), cache_mb)
    return points


def measured(point: dict, before: dict, after: dict, cache_mb: float) -> dict:
    point.pop("_latencies")
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    point["engine_seconds"] = round(delta["rm_batch_inference_seconds_sum"], 2)
    point["rows_computed"] = int(delta["rm_batch_size_sum"])
    if cache_mb:
        lookups = {r: delta.get(f'rm_cache_lookups_total{{result="{r}"}}', 0.0) for r in ("hit", "merged", "miss")}
        point["hit_rate"] = round(lookups["hit"] / sum(lookups.values()), 3)
        point["merged_rate"] = round(lookups["merged"] / sum(lookups.values()), 3)
        point["cache_bytes"] = after["rm_cache_bytes"]
    return point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="runs/demo/bundle")
    parser.add_argument("--groups", type=int, default=192)
    parser.add_argument("--repeat-fraction", type=float, default=0.5, help="responses drawn from short answers")
    parser.add_argument("--concurrency", type=int, default=8, help="group requests in flight")
    parser.add_argument("--cache-mb", type=float, default=64)
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()

    groups = grpo_groups(args.groups, args.repeat_fraction, seed=0)
    samples = [s for g in groups for s in g]
    result: dict = {
        "machine": describe_machine(),
        "groups": len(groups),
        "samples": len(samples),
        "distinct_samples": len(set(samples)),
        "repeat_fraction": args.repeat_fraction,
    }
    for name, cache_mb in (("no_cache", 0), ("cache", args.cache_mb)):
        result[name] = run_points(args.bundle, cache_mb, groups, args.concurrency)
        print(name, result[name], flush=True)
    for send in ("first", "resent"):
        off, on = result["no_cache"][send], result["cache"][send]
        result[f"{send}_speedup"] = round(on["samples_per_s"] / off["samples_per_s"], 3)
        result[f"{send}_engine_seconds_saved"] = round(off["engine_seconds"] - on["engine_seconds"], 2)
        result[f"{send}_engine_time_saved_fraction"] = round(1 - on["engine_seconds"] / off["engine_seconds"], 3)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "cache.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
