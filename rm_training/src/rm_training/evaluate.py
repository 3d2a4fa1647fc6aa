"""Pairwise accuracy and margin statistics of a reward model on preference data (`rm-eval`).

rm-eval --model runs/demo/rm --data rm_training/data/demo/test.jsonl

A process reward model on process-reward rows (prompt, completions, labels) gets rm-train's step metrics
instead (step accuracy, first-error accuracy, AUROC; rm_training.prm_data.evaluate_solutions).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch

from rm_contract.config_cli import ConfigError, option, parse_config
from rm_contract.recipe import RecipeError
from rm_contract.records import DataError, holds_steps, load_groups, load_step_solutions
from rm_training.batching import TokenizedGroup, pair_rows, score_sequences, tokenize_groups
from rm_training.losses import bradley_terry_loss, pairwise_accuracy
from rm_training.model import CheckpointError, RewardModel, load_reward_model, sample_encoder
from rm_training.prm_data import evaluate_solutions, tokenize_solutions


@dataclass(frozen=True)
class EvalArgs:
    model: str = option(help="reward-model checkpoint directory written by rm-train")
    data: str = option(help="preference data, or process-reward rows: JSONL or a saved datasets directory")
    batch_size: int = option(32, "sequences per forward pass")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")


def evaluate_groups(model: RewardModel, groups: list[TokenizedGroup], pad_id: int, batch_size: int = 32) -> dict:
    """Score every response once, then compare each pair: accuracy (ties wrong), margins, loss."""
    was_training = model.training
    model.eval()
    sequences = [ids for g in groups for ids in g.ids]
    rewards = score_sequences(model, sequences, pad_id, batch_size, desc="eval")
    model.train(was_training)
    chosen, rejected, margin = pair_rows(groups)
    r_chosen, r_rejected = rewards[chosen], rewards[rejected]
    margins = r_chosen - r_rejected
    return {
        "accuracy": pairwise_accuracy(r_chosen, r_rejected),
        "n_pairs": len(chosen),
        "loss": bradley_terry_loss(r_chosen, r_rejected, torch.tensor(margin)).mean().item(),
        "mean_margin": margins.mean().item(),
        "std_margin": margins.std().item() if len(chosen) > 1 else 0.0,
        "median_margin": margins.median().item(),
        "n_truncated": sum(g.n_truncated for g in groups),
    }


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_config(EvalArgs, argv, prog="rm-eval", description=__doc__)
        args.validate()
        steps = holds_steps(args.data)
        rows = load_step_solutions(args.data) if steps else load_groups(args.data)
        model, tokenizer, metadata = load_reward_model(args.model)
        if steps and metadata.output_kind != "steps":
            raise DataError(f"{args.data} holds process-reward rows, and {args.model} is no process reward model")
        if not steps and metadata.output_kind == "steps":
            raise DataError(f"{args.model} is a process reward model: evaluate it on process-reward rows")
        encoder = sample_encoder(tokenizer, metadata.recipe)
        if steps:
            tokenized, refused = tokenize_solutions(rows, encoder)
        else:
            tokenized = tokenize_groups(rows, encoder)
    except (ConfigError, DataError, CheckpointError, RecipeError) as e:
        print(f"rm-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    if steps:
        if refused:
            print(f"rm-eval: skipped {len(refused)} rows the input recipe refuses, as {refused[0]}", file=sys.stderr)
        metrics = evaluate_solutions(model, tokenized, tokenizer.pad_token_id, args.batch_size)
        metrics["n_skipped"] = len(refused)
    else:
        metrics = evaluate_groups(model, tokenized, tokenizer.pad_token_id, args.batch_size)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
