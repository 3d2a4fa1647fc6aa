"""Offline throughput of each variant of a bundle on the demo test responses (ONNX Runtime, CPU).

    .venv/bin/python bench/variant_speed.py --bundle runs/demo/bundle

Samples are sorted by length and scored in batches of 32, as a padding-free server would; every variant
scores the same samples in the same run, so the ratios are what count.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rm_contract.bundle import load_bundle
from rm_contract.padding import pad_batch
from rm_contract.records import load_groups
from rm_server.runtime.engine import open_engine

DEMO_TEST = Path(__file__).resolve().parent.parent / "rm_training" / "data" / "demo" / "test.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--data", default=str(DEMO_TEST))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    encoder = bundle.sample_encoder()
    sequences = sorted((encoder.encode(s).ids for g in load_groups(args.data) for s in g.samples), key=len)
    pad_id = bundle.manifest["pad_token_id"] or 0
    batches = [pad_batch(sequences[i : i + args.batch_size], pad_id) for i in range(0, len(sequences), args.batch_size)]
    results = {}
    for variant in bundle.variants:
        engine = open_engine(bundle, variant)
        engine.score(*batches[0])  # warm up
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            for batch in batches:
                engine.score(*batch)
            best = min(best, time.perf_counter() - start)
        results[variant] = {"samples_per_s": round(len(sequences) / best, 1)}
    if "fp32" in results:
        for r in results.values():
            r["vs_fp32"] = round(r["samples_per_s"] / results["fp32"]["samples_per_s"], 2)
    print(json.dumps({"n_samples": len(sequences), "batch_size": args.batch_size, "variants": results}, indent=2))


if __name__ == "__main__":
    main()
