"""Train a process reward model (`rm-train` on process-reward rows), with TRL PRMTrainer's objective.

    python -m rm_training.demo_prm --output rm_training/data/demo_prm
    rm-train --data rm_training/data/demo_prm/train.jsonl --eval-data rm_training/data/demo_prm/test.jsonl \\
        --model minilm --max-length 64 --output runs/demo-prm/rm

A token classifier with two labels (rm_training.step_model) learns each step's label at its step token:
cross-entropy there, nothing elsewhere (rm_training.prm_metrics). Rows the input recipe refuses (too long
for --max-length, a step holding the step token) are skipped and counted. Options, optimizer, schedule,
batching and progress lines are the pairwise trainer's (rm_training.train.fit). The output directory
receives the checkpoint (its recipe names the step token), report.json and curves.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from rm_contract.config_cli import ConfigError
from rm_contract.records import holds_steps, load_step_solutions
from rm_training.model import sample_encoder, save_reward_model
from rm_training.plots import plot_step_curves
from rm_training.prm_data import TokenizedSolution, collate_steps, evaluate_solutions, tokenize_solutions
from rm_training.prm_metrics import step_loss
from rm_training.step_model import StepRewardModel, new_step_model
from rm_training.train import Forward, TrainConfig, check_max_length, end_run, fit, prepare_model, start_run

CURVE_METRICS = ("step_accuracy", "first_error_accuracy", "step_auroc", "loss")
"""The held-out numbers kept at each evaluation (report.json's eval_curve, curves.png)."""


class StepLogits(nn.Module):
    """The model's logits (B, T, 2) as its forward, so that DDP, which syncs gradients through forward
    only, sees the call the loss is computed on (the model's own forward returns probabilities)."""

    def __init__(self, model: StepRewardModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.logits(input_ids, attention_mask)


def train_steps(cfg: TrainConfig, started: float) -> dict:
    """rm-train's process-reward path: train, evaluate and save; returns the report."""
    if cfg.center_rewards_coefficient:
        raise ConfigError("--center-rewards-coefficient is for pairwise rewards, not process-reward data")
    if not holds_steps(cfg.eval_data):
        raise ConfigError(f"--data holds process-reward rows but --eval-data {cfg.eval_data} preference records")
    ddp, device, log = start_run(cfg)

    # Data and model
    train_rows, eval_rows = load_step_solutions(cfg.data), load_step_solutions(cfg.eval_data)
    model, tokenizer, metadata = new_step_model(cfg.model, cfg.max_length, cfg.step_token)
    check_max_length(model.model, cfg)
    encoder = sample_encoder(tokenizer, metadata.recipe)
    train_set, train_refused = tokenize_solutions(train_rows, encoder, desc="tokenize train")
    eval_set, eval_refused = tokenize_solutions(eval_rows, encoder, desc="tokenize eval")
    for name, refused, rows in (("train", train_refused, train_rows), ("eval", eval_refused, eval_rows)):
        if refused:
            log(f"skipped {len(refused)} of {len(rows)} {name} rows the input recipe refuses, as {refused[0]}")
    pad_id = tokenizer.pad_token_id
    log(
        f"backbone {cfg.model} (process reward model, {'bidirectional' if metadata.pooling == 'cls' else 'causal'} "
        f"attention, step token "
        f"{metadata.recipe.step_token!r}); {len(train_set)} train solutions ({n_steps(train_set)} steps), "
        f"{len(eval_set)} eval solutions ({n_steps(eval_set)} steps); "
        f"{sum(s.truncated for s in train_set)} train prompts cut to fit {cfg.max_length} tokens"
    )
    prepare_model(model, cfg, device)

    # Training loop
    eval_curve = []

    def batch_loss(forward: Forward, indices: list[int]) -> torch.Tensor:
        batch = collate_steps([train_set[i] for i in indices], pad_id, cfg.train_on_last_step_only).to(device)
        return step_loss(forward(batch.input_ids, batch.attention_mask), batch.targets)

    def evaluate_and_log(step: int, total_steps: int) -> dict:
        metrics = evaluate_solutions(model, eval_set, pad_id, cfg.eval_batch_size)
        eval_curve.append({"step": step, **{k: metrics[k] for k in CURVE_METRICS}})
        log(f"step {step}/{total_steps}: eval {summary(metrics)}")
        return metrics

    network = StepLogits(model)
    loss_curve, final, total_steps = fit(
        cfg, network, len(train_set), "training solutions", batch_loss, evaluate_and_log, ddp, device, log, started
    )

    report = {}
    if ddp.is_main:
        report = {
            **final,
            "n_train_solutions": len(train_set),
            "n_train_steps": n_steps(train_set),
            "n_skipped_train": len(train_refused),
            "n_skipped_eval": len(eval_refused),
            "steps": total_steps,
            "world_size": ddp.world_size,
            "loss_curve": loss_curve,
            "eval_curve": eval_curve,
            "config": asdict(cfg),
            "seconds": round(time.time() - started, 1),
        }
        output = Path(cfg.output)
        save_reward_model(output, model, tokenizer, metadata)
        (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_step_curves(loss_curve, eval_curve, output / "curves.png")
        log(f"eval {summary(final)}; wrote {output} (checkpoint, report.json, curves.png) in {report['seconds']} s")
    end_run(ddp)
    return report


def n_steps(solutions: list[TokenizedSolution]) -> int:
    return sum(len(s.steps) for s in solutions)


def summary(metrics: dict) -> str:
    """One line of the numbers that show a process reward model is learning, against the majority label."""

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    return (
        f"step accuracy {number(metrics['step_accuracy'])} (majority label "
        f"{number(metrics['majority_step_accuracy'])}), first-error accuracy "
        f"{number(metrics['first_error_accuracy'])}, AUROC {number(metrics['step_auroc'])}, "
        f"loss {number(metrics['loss'])} on {metrics['n_steps']} steps of {metrics['n_solutions']} solutions"
    )
