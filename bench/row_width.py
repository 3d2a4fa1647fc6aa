"""What a packed row's width costs per token: the same samples one per row, then 2, 4 and 8 to a row.

    .venv/bin/python bench/row_width.py --bundle runs/bench/smollm2-bundle

Eager attention computes a row's whole width squared, so the batcher never widens rows to pack them
(docs/architecture.md, "Packing and shared prompts"). Prints tokens/s per layout, best of --repeats runs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from rm_contract.bundle import load_bundle
from rm_contract.packing import Unit, pack_batch
from rm_server.runtime.engine import open_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="a packed bundle (format 2)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    engine = open_engine(load_bundle(args.bundle), "fp32")
    rng = np.random.default_rng(0)
    sequences = [rng.integers(100, 30000, args.length).tolist() for _ in range(args.samples)]
    per_row = 1
    while per_row <= args.samples:
        layout = [
            [Unit((i,)) for i in range(r, min(r + per_row, args.samples))] for r in range(0, args.samples, per_row)
        ]
        batch = pack_batch(sequences, engine.scoring, layout=layout)
        engine.score_packed(batch)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            engine.score_packed(batch)
            best = min(best, time.perf_counter() - started)
        tokens = args.samples * args.length
        print(f"{per_row} per row, batch {tuple(batch.input_ids.shape)}: {tokens / best:.0f} tokens/s", flush=True)
        per_row *= 2


if __name__ == "__main__":
    main()
