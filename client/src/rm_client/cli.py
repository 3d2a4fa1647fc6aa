"""`rm-client`: score files, compare two responses, and inspect a reward service from the shell.

    rm-client score --target localhost:50051 --input pairs.jsonl --output scored.jsonl
    rm-client compare --target localhost:50051 --prompt "Hi" --a "Hello!" --b "Go away."
    rm-client info --target localhost:50051
    rm-client health --target localhost:50051

Exit codes: 0 success, 1 the service failed (its status and message are printed), 2 bad usage or input.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from rm_client.channel import Security, read_token
from rm_client.client import RewardClient
from rm_client.errors import RewardServiceError
from rm_client.samples import sample_to_pb
from rm_contract.config_cli import option, parse_subcommands
from rm_contract.records import DataError, holds_steps, parse_record, parse_step_record, read_records

BLOCK = 1024
"""Samples per progress step (the client splits each block further into concurrent requests)."""


@dataclass(kw_only=True)
class ServiceOptions:
    """Where the reward service is and how to reach it: the options of every command."""

    target: str = option(help="host:port, comma-separated replicas, or dns:///name:port")
    timeout: float = option(120.0, "deadline per call in seconds, retries included")
    tls: bool = option(False, "connect with TLS")
    ca: str | None = option(None, "CA certificate (PEM) that signed the server's certificate")
    cert: str | None = option(None, "client certificate (PEM) for mutual TLS")
    key: str | None = option(None, "client private key (PEM) for mutual TLS")
    auth_token_file: str | None = option(
        None,
        "file holding the bearer token, as rm-serve's --auth-token-file; without it, the token is the "
        "RM_AUTH_TOKEN environment variable, else RM_TOKEN",
    )
    token_file: str | None = option(None, "the same as --auth-token-file, which wins when both are given")

    def security(self, environ: Mapping[str, str] | None = None) -> Security:
        return Security(
            tls=self.tls or bool(self.ca or self.cert),
            ca_file=self.ca,
            cert_file=self.cert,
            key_file=self.key,
            token=read_token(self.auth_token_file or self.token_file, environ),
        )


@dataclass(kw_only=True)
class ScoreArgs(ServiceOptions):
    """score a JSONL file of any training data format"""

    input: Path = option(help="JSONL records: pairs, single responses, rankings, conversations or process-reward rows")
    output: Path = option(help="where the records go, in input order, each with its rewards")
    normalize: bool = option(False, "rewards normalized with the bundle's statistics")
    step_reduce: str = option(
        "min",
        "process reward models: how a solution's step scores become its reward",
        choices=("min", "last", "product", "mean"),
    )


@dataclass(kw_only=True)
class CompareArgs(ServiceOptions):
    """P(A preferred to B) for one prompt"""

    prompt: str = option(help="the prompt both responses answer")
    a: str = option(help="response A")
    b: str = option(help="response B")


@dataclass(kw_only=True)
class InfoArgs(ServiceOptions):
    """the served model's name, version, limits, bundle.json"""


@dataclass(kw_only=True)
class HealthArgs(ServiceOptions):
    """grpc.health.v1 status (exit 1 unless SERVING)"""


COMMANDS = {"score": ScoreArgs, "compare": CompareArgs, "info": InfoArgs, "health": HealthArgs}


def parse_args(argv: list[str] | None = None) -> tuple[str, ServiceOptions]:
    """(command, its options); argparse exits with code 2 and a message on bad usage."""
    return parse_subcommands(COMMANDS, argv, prog="rm-client", description=__doc__)


REWARD_FIELDS = {"pair": ("reward_chosen", "reward_rejected"), "response": ("reward",)}
"""Where the rewards of a record go; a ranking's go to `rewards`, one per response."""


def score_file(
    client: RewardClient, source: Path, destination: Path, normalize: bool, step_reduce: str = "min"
) -> dict:
    """Score every record of `source` and write it, with its rewards, to `destination` (same order)."""
    if holds_steps(source):
        if normalize:
            raise DataError("--normalize: process-reward rows are scored as probabilities, never normalized")
        return score_step_file(client, source, destination, step_reduce)
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


def score_step_file(client: RewardClient, source: Path, destination: Path, step_reduce: str) -> dict:
    """Process-reward rows (`prompt`, `completions`, `labels`): each row gets `step_rewards` (P(step correct),
    one per completion step, in order) and `reward` (their `step_reduce`); the summary gives the step
    accuracy against the rows' labels."""
    rows = [(record, parse_step_record(record, where)) for where, record in read_records(source)]
    if not rows:
        raise DataError(f"{source}: no records")
    rewards: list[float] = []
    steps: list[list[float]] = []
    with tqdm(total=len(rows), unit="solution", desc="scoring", file=sys.stderr) as bar:
        for start in range(0, len(rows), BLOCK):
            block = [solution for _, solution in rows[start : start + BLOCK]]
            scored = client.score_steps([s.prompt for s in block], [s.steps for s in block], reduce=step_reduce)
            rewards.extend(scored.rewards.tolist())
            steps.extend(a.tolist() for a in scored.steps)
            bar.update(len(block))
    right = total = 0
    destination.parent.mkdir(parents=True, exist_ok=True)
    with open(destination, "w", encoding="utf-8") as out:
        for (record, solution), reward, step_scores in zip(rows, rewards, steps):
            record |= {"reward": reward, "step_rewards": step_scores}
            right += sum((p >= 0.5) == label for p, label in zip(step_scores, solution.labels))
            total += len(step_scores)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return {"records": len(rows), "samples": len(rows), "steps": total, "step_accuracy": right / total}


def run(args: ServiceOptions) -> int:
    with RewardClient(args.target, timeout_s=args.timeout, security=args.security()) as client:
        if isinstance(args, ScoreArgs):
            summary = score_file(client, args.input, args.output, args.normalize, args.step_reduce)
            line = f"scored {summary['samples']} samples in {summary['records']} records -> {args.output}"
            if "steps" in summary:
                line += f"; step accuracy {summary['step_accuracy']:.4f} on {summary['steps']} steps"
            if "pairs" in summary:
                line += f"; pairwise accuracy {summary['pairwise_accuracy']:.4f} on {summary['pairs']} pairs"
            print(line)
        elif isinstance(args, CompareArgs):
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
        elif isinstance(args, InfoArgs):
            print(json.dumps(MessageToDict(client.model_info(), preserving_proto_field_name=True), indent=2))
        elif isinstance(args, HealthArgs):
            status = client.health()
            print(status)
            return 0 if status == "SERVING" else 1
    return 0


def main(argv: list[str] | None = None) -> None:
    _, args = parse_args(argv)
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
