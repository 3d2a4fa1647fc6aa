"""The serving step of `make demo`: start rm-serve on a bundle, score held-out pairs through gRPC, stop it.

.venv/bin/python bench/serve_demo.py --bundle runs/demo/bundle --data rm_training/data/demo/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from rm_contract.pb import reward_pb2 as pb
from rm_contract.pb import reward_pb2_grpc
from rm_server.launch import start_server, stop_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--data", required=True, help="preference pairs (JSONL with prompt, chosen, rejected)")
    parser.add_argument("--pairs", type=int, default=4, help="pairs to show")
    parser.add_argument("--variant", default="int8")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as logs:
        try:
            server = start_server(args.bundle, Path(logs) / "serve.log", "--variant", args.variant, metrics=False)
        except RuntimeError as e:  # it exited or never served: the message ends with its log
            sys.exit(str(e))
        try:
            show_scores(server.channel(), Path(args.data), args.pairs)
        finally:
            stop_server(server)


def show_scores(channel, data: Path, pairs: int) -> None:
    """Score the first `pairs` preference pairs of `data` in one request and print them."""
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    rows = [json.loads(line) for line in data.read_text().splitlines()[:pairs]]
    samples = [
        pb.Sample(text=pb.TextPair(prompt=row["prompt"], response=row[side]))
        for row in rows
        for side in ("chosen", "rejected")
    ]
    response = stub.Score(pb.ScoreRequest(samples=samples), timeout=30)
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    print(
        f"\nscored {len(samples)} responses with {info.name} v{info.version} ({info.dtype}) through gRPC "
        f"in {response.timing.total_ms:.1f} ms:"
    )
    for i, row in enumerate(rows):
        chosen, rejected = response.results[2 * i].reward, response.results[2 * i + 1].reward
        print(
            f"  {row['prompt'][:50]:50}  chosen {chosen:+.3f}  rejected {rejected:+.3f}  "
            f"{'ok' if chosen > rejected else 'WRONG'}"
        )


if __name__ == "__main__":
    main()
