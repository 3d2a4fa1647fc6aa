"""Serving under RLHF-shaped traffic: GRPO-style groups (one prompt, 8 responses), prompts of 30-300 tokens,
responses log-normal over 20-1000 tokens (capped at the model's max length by its truncation policy).

    .venv/bin/python bench/rlhf_bench.py --bundle runs/demo/bundle --checkpoint runs/demo/rm

Sent two ways, as trainers do: one request per sample at high concurrency (OpenRLHF's and veRL's remote
reward calls) and one request per group (TRL's reward function). rm-serve against the OpenRLHF-style naive
server (bench/naive_server.py), Triton's dynamic batcher through PyTriton (where `make bench-env` built its
venv) and the offline ONNX Runtime limit on the same samples, in one run; ratios are what count. Writes
bench/results/rlhf.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import loadgen
import numpy as np
import servers
import sweeps
from serve_bench import demo_pairs, describe_machine

from rm_contract.bundle import load_bundle
from rm_contract.recipe import Sample
from rm_server.runtime.engine import open_engine

GROUP_SIZE = 8
PROMPT_TOKENS = (30, 300)
RESPONSE_TOKENS = (20, 1000)
RESPONSE_MEDIAN, RESPONSE_SIGMA = 150, 0.9  # log-normal: most responses short, a long tail
SYSTEMS = ("server", "naive", "pytriton")
MODES = ("per_sample", "per_group")


def text_of(words: list[str], tokens: int, count, rng: random.Random) -> str:
    """Words drawn from real text until the tokenizer counts at least `tokens` tokens."""
    text = ""
    while count(text) < tokens:
        text += " " + " ".join(rng.choice(words) for _ in range(max(1, (tokens - count(text)) // 2)))
    return text.strip()


def rlhf_groups(words: list[str], n_groups: int, count, seed: int) -> list[tuple[str, list[str]]]:
    """(prompt, GROUP_SIZE responses) per group, the same for every system."""
    rng = random.Random(seed)
    groups = []
    for _ in range(n_groups):
        prompt = text_of(words, rng.randint(*PROMPT_TOKENS), count, rng)
        lengths = [
            min(
                RESPONSE_TOKENS[1],
                max(RESPONSE_TOKENS[0], round(rng.lognormvariate(math.log(RESPONSE_MEDIAN), RESPONSE_SIGMA))),
            )
            for _ in range(GROUP_SIZE)
        ]
        groups.append((prompt, [text_of(words, n, count, rng) for n in lengths]))
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--checkpoint", required=True, help="the bundle's checkpoint, for the naive server")
    parser.add_argument("--groups", type=int, default=32, help="groups per point (x8 samples)")
    parser.add_argument("--concurrency", type=int, default=64, help="clients sending one sample per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()

    bundle = load_bundle(args.bundle)
    metadata = Path(args.checkpoint) / "reward_model.json"
    if not metadata.is_file() or json.loads(metadata.read_text())["recipe"] != bundle.manifest["recipe"]:
        # a checkpoint without its recipe gets a default one (e.g. 512 tokens instead of the bundle's 256), and
        # the naive server would then do other work than rm-serve
        raise SystemExit(f"{args.checkpoint} must be the rm-train checkpoint {args.bundle} was exported from")
    encoder, pad_id = bundle.sample_encoder(), bundle.manifest.get("pad_token_id") or 0
    tokenizer = encoder.tokenizer
    words = [w for p, r in demo_pairs() for w in (p + " " + r).split()]
    groups = rlhf_groups(words, args.groups, lambda t: len(tokenizer.encode(t, add_special_tokens=False)), args.seed)
    per_sample = [[(p, r)] for p, responses in groups for r in responses]
    per_group = [[(p, r) for r in responses] for p, responses in groups]
    random.Random(args.seed).shuffle(per_sample)  # groups' samples arrive interleaved, as from many workers
    sequences = [encoder.encode(Sample.from_text(p, r)).ids for [(p, r)] in per_sample]
    group_concurrency = max(1, args.concurrency // GROUP_SIZE)  # the same samples in flight either way

    print(f"{len(per_sample)} samples, mean {np.mean([len(s) for s in sequences]):.0f} tokens after truncation")
    result: dict = {
        "machine": describe_machine(),
        "bundle": bundle.manifest.get("name"),
        "max_length": bundle.recipe.max_length,
        "samples": len(per_sample),
        "mean_tokens": round(float(np.mean([len(s) for s in sequences])), 1),
        "truncated_fraction": round(float(np.mean([len(s) >= bundle.recipe.max_length for s in sequences])), 3),
        "concurrency": {"per_sample": args.concurrency, "per_group": group_concurrency},
    }
    print("offline ONNX Runtime limit ...", flush=True)
    result["offline_ort"] = sweeps.offline_best(open_engine(bundle, "fp32").score, sequences, pad_id)
    print("rm-serve ...", flush=True)
    with servers.rm_serve(args.bundle, "fp32") as (target, _):
        result["server_per_sample"] = loadgen.load_grpc_points(target, per_sample, [args.concurrency])[
            str(args.concurrency)
        ]
        result["server_per_group"] = loadgen.load_grpc_points(target, per_group, [group_concurrency])[
            str(group_concurrency)
        ]
    print("naive server ...", flush=True)
    tokens_of = lambda pair: len(encoder.encode(Sample.from_text(*pair)).ids)  # noqa: E731
    with servers.naive_server(args.checkpoint) as base_url:
        loadgen.load_http(base_url, loadgen.NAIVE, per_sample[:8], 2, tokens_of)  # warm up
        result["naive_per_sample"] = loadgen.load_http(base_url, loadgen.NAIVE, per_sample, args.concurrency, tokens_of)
        result["naive_per_group"] = loadgen.load_http(base_url, loadgen.NAIVE, per_group, group_concurrency, tokens_of)
    if reason := servers.pytriton_unavailable():
        print(f"PyTriton skipped: {reason}")
        result["pytriton"] = f"skipped: {reason}"
    else:
        print("PyTriton ...", flush=True)
        with servers.pytriton_server(args.bundle, "fp32") as base_url:
            loadgen.load_http(base_url, loadgen.TRITON, per_sample[:8], 2, tokens_of)  # warm up
            result["pytriton_per_sample"] = loadgen.load_http(
                base_url, loadgen.TRITON, per_sample, args.concurrency, tokens_of
            )
            result["pytriton_per_group"] = loadgen.load_http(
                base_url, loadgen.TRITON, per_group, group_concurrency, tokens_of
            )
    points = [f"{system}_{mode}" for system in SYSTEMS for mode in MODES if f"{system}_{mode}" in result]
    for point in points:
        result[point].pop("_latencies")
    rate = {point: result[point]["samples_per_s"] for point in points}
    result["ratios"] = {
        **{
            f"server_vs_{other}_{mode}": round(rate[f"server_{mode}"] / rate[f"{other}_{mode}"], 3)
            for other in ("naive", "pytriton")
            for mode in MODES
            if f"{other}_{mode}" in rate
        },
        "server_per_sample_vs_offline_ort": round(
            rate["server_per_sample"] / result["offline_ort"]["samples_per_s"], 3
        ),
        "server_per_group_vs_offline_ort": round(rate["server_per_group"] / result["offline_ort"]["samples_per_s"], 3),
    }
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "rlhf.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
