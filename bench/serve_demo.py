"""The serving step of `make demo`: start rm-serve on a bundle, score held-out pairs through gRPC, stop it.

.venv/bin/python bench/serve_demo.py --bundle runs/demo/bundle --data rm_training/data/demo/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from servers import free_port, wait_until_serving

from rm_contract.pb import reward_pb2 as pb
from rm_contract.pb import reward_pb2_grpc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--data", required=True, help="preference pairs (JSONL with prompt, chosen, rejected)")
    parser.add_argument("--pairs", type=int, default=4, help="pairs to show")
    parser.add_argument("--variant", default="int8")
    args = parser.parse_args()

    port = free_port()
    serve = Path(sys.executable).parent / "rm-serve"
    command = [
        str(serve),
        "--bundle",
        args.bundle,
        "--port",
        str(port),
        "--metrics-port",
        "-1",
        "--variant",
        args.variant,
    ]
    process = subprocess.Popen(command)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            wait_until_serving(channel, process)
        except RuntimeError as e:
            sys.exit(str(e))
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()[: args.pairs]]
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
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


if __name__ == "__main__":
    main()
