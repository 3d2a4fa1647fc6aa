"""`rm-client`: score files, compare two responses, and inspect a reward service from the shell.

    rm-client score --target localhost:50051 --input pairs.jsonl --output scored.jsonl
    rm-client compare --target localhost:50051 --prompt "Hi" --a "Hello!" --b "Go away."
    rm-client info --target localhost:50051
    rm-client health --target localhost:50051

Exit codes: 0 success, 1 the service failed (its status and message are printed), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from rm_client.channel import Security
from rm_client.client import RewardClient
from rm_client.errors import RewardServiceError
from rm_client.samples import sample_to_pb
from rm_contract.records import DataError, parse_record, read_records

BLOCK = 1024
"""Samples per progress step (the client splits each block further into concurrent requests)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rm-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", required=True, help="host:port, comma-separated replicas, or dns:///name:port")
    common.add_argument("--timeout", type=float, default=120.0, help="deadline per call in seconds, retries included")
    common.add_argument("--tls", action="store_true", help="connect with TLS")
    common.add_argument("--ca", help="CA certificate (PEM) that signed the server's certificate")
    common.add_argument("--cert", help="client certificate (PEM) for mutual TLS")
    common.add_argument("--key", help="client private key (PEM) for mutual TLS")
    common.add_argument(
        "--token-file", help="file holding the bearer token (default: the RM_TOKEN environment variable)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", parents=[common], help="score a JSONL file of any training data format")
    score.add_argument("--input", required=True, type=Path)
    score.add_argument("--output", required=True, type=Path)
    score.add_argument("--normalize", action="store_true", help="rewards normalized with the bundle's statistics")

    compare = commands.add_parser("compare", parents=[common], help="P(A preferred to B) for one prompt")
    compare.add_argument("--prompt", required=True)
    compare.add_argument("--a", required=True, help="response A")
    compare.add_argument("--b", required=True, help="response B")

    commands.add_parser("info", parents=[common], help="the served model's name, version, limits, bundle.json")
    commands.add_parser("health", parents=[common], help="grpc.health.v1 status (exit 1 unless SERVING)")
    return parser


def security_from(args: argparse.Namespace) -> Security:
    token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get("RM_TOKEN")
    return Security(
        tls=args.tls or bool(args.ca or args.cert),
        ca_file=args.ca,
        cert_file=args.cert,
        key_file=args.key,
        token=token or None,
    )


REWARD_FIELDS = {"pair": ("reward_chosen", "reward_rejected"), "response": ("reward",)}
"""Where the rewards of a record go; a ranking's go to `rewards`, one per response."""


def score_file(client: RewardClient, source: Path, destination: Path, normalize: bool) -> dict:
    """Score every record of `source` and write it, with its rewards, to `destination` (same order)."""
    records = [(record, parse_record(record, where)) for where, record in read_records(source)]
    if not records:
        raise DataError(f"{source}: no records")
    samples = [sample_to_pb(s) for _, group in records for s in group.samples]
    rewards: list[float] = []
    with tqdm(total=len(samples), unit="sample", desc="scoring", file=sys.stderr) as bar:
        for start in range(0, len(samples), BLOCK):
            block = samples[start : start + BLOCK]
            rewards.extend(client.score_samples(block, normalize=normalize).tolist())
            bar.update(len(block))
    pairs = correct = 0
    destination.parent.mkdir(parents=True, exist_ok=True)
    with open(destination, "w", encoding="utf-8") as out:
        position = 0
        for record, group in records:
            mine = rewards[position : position + len(group.samples)]
            position += len(group.samples)
            if group.kind == "ranking":
                record["rewards"] = mine
            else:
                record.update(zip(REWARD_FIELDS[group.kind], mine))
            if group.kind == "pair":
                pairs += 1
                correct += mine[0] > mine[1]
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary = {"records": len(records), "samples": len(samples)}
    if pairs:
        summary |= {"pairs": pairs, "pairwise_accuracy": correct / pairs}
    return summary


def run(args: argparse.Namespace) -> int:
    options = {"timeout_s": args.timeout, "security": security_from(args)}
    with RewardClient(args.target, **options) as client:
        if args.command == "score":
            summary = score_file(client, args.input, args.output, args.normalize)
            line = f"scored {summary['samples']} samples in {summary['records']} records -> {args.output}"
            if "pairs" in summary:
                line += f"; pairwise accuracy {summary['pairwise_accuracy']:.4f} on {summary['pairs']} pairs"
            print(line)
        elif args.command == "compare":
            c = client.compare(args.prompt, args.a, args.b)
            print(
                json.dumps(
                    {
                        "probability_a_preferred": c.probability_a_preferred,
                        "reward_a": c.reward_a,
                        "reward_b": c.reward_b,
                    }
                )
            )
        elif args.command == "info":
            print(json.dumps(MessageToDict(client.model_info(), preserving_proto_field_name=True), indent=2))
        elif args.command == "health":
            status = client.health()
            print(status)
            return 0 if status == "SERVING" else 1
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(run(args))
    except (ValueError, OSError) as e:  # DataError is a ValueError
        print(f"rm-client: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RewardServiceError as e:
        print(f"rm-client: error: the service answered {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
