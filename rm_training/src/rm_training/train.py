"""Train a reward model with the pairwise (Bradley-Terry) loss (`rm-train`), or a process reward model.

    rm-train --data rm_training/data/demo/train.jsonl --eval-data rm_training/data/demo/test.jsonl \\
        --model minilm --output runs/demo/rm
    torchrun --nproc-per-node 2 -m rm_training.train ...   # DDP: gloo on CPU, NCCL on GPU

Data of process-reward rows (`prompt`, `completions`, `labels`: TRL's stepwise format) trains a process
reward model instead (rm_training.prm_train), with the same options and optimization loop.

The output directory receives the checkpoint (safetensors, tokenizer, reward_model.json with the input
recipe and the reward normalization statistics), report.json and curves.png.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from transformers import get_scheduler

from rm_contract.backbones import BackboneError
from rm_contract.config_cli import ConfigError, option, parse_config
from rm_contract.recipe import RecipeError
from rm_contract.records import DataError, holds_steps, load_groups
from rm_training.batching import TokenizedGroup, collate, score_sequences, tokenize_groups
from rm_training.evaluate import evaluate_groups
from rm_training.losses import reward_model_loss
from rm_training.model import RewardNormalization, new_reward_model, sample_encoder, save_reward_model
from rm_training.plots import plot_training_curves
from rm_training.progress import bar, on_terminal


@dataclass
class TrainConfig:
    data: str = option(
        help="Training preference data: JSONL or a saved `datasets` directory, any supported format; "
        "process-reward rows (prompt, completions, labels) train a process reward model.",
    )
    eval_data: str = option(help="Held-out data of the same kind, evaluated periodically and at the end.")
    output: str = option(help="Directory for the checkpoint, report.json and curves.png.")
    model: str = option(
        "minilm",
        "Backbone: a local Hugging Face checkpoint directory, or a bundled name (minilm, smollm2).",
    )
    epochs: float = option(2.0, "Passes over the training data (fractions allowed).")
    lr: float = option(5e-5, "Peak learning rate of AdamW.")
    max_length: int = option(
        256,
        "Longest sequence in tokens; longer samples are truncated (prompt from the left, final token kept).",
    )
    batch_size: int = option(16, "Preference groups (pairs, or K-way rankings) per process per micro-batch.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    weight_decay: float = 0.0
    warmup_ratio: float = option(0.1, "Fraction of optimizer steps with a linear warmup.")
    lr_scheduler: str = option(
        "linear",
        "Decay after warmup: any transformers scheduler name (linear, cosine, constant_with_warmup).",
    )
    center_rewards_coefficient: float = option(
        0.0,
        "Weight of the reward-centering term mean((r_chosen + r_rejected)^2); 0 turns it off.",
    )
    max_grad_norm: float = 1.0
    bf16: str = option("auto", "bf16 autocast: auto (on CUDA with bf16 support), on, or off.")
    gradient_checkpointing: bool = option(False, "Trade compute for memory on large backbones.")
    keep_dropout: bool = option(
        False,
        "Keep the backbone's dropout; by default it is disabled, as in TRL (pairwise rewards are noisier with it).",
    )
    eval_every: int = option(0, "Optimizer steps between evaluations; 0 means five evaluations over the run.")
    eval_batch_size: int = 64
    norm_samples: int = option(
        2000,
        "Training responses used to compute the reward mean and std saved for normalized serving.",
    )
    seed: int = 0
    step_token: str | None = option(
        None,
        "Process reward models: the token ending each step (default: TRL's newline for decoders, [SEP] for encoders).",
    )
    train_on_last_step_only: bool = option(
        False, "Process reward models: learn only each solution's last step label (TRL's flag)."
    )

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "max_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.epochs > 0:
            raise ConfigError("--epochs must be positive")
        if not self.lr > 0:
            raise ConfigError("--lr must be positive")
        if self.bf16 not in ("auto", "on", "off"):
            raise ConfigError("--bf16 must be auto, on or off")


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    """Join the process group started by torchrun or accelerate launch (environment read here only)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Distributed(dist.get_rank(), dist.get_world_size())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def global_batches(n: int, global_batch: int, epochs: float, seed: int) -> list[list[int]]:
    """Shuffled index batches over `epochs`; every process computes the same list (incomplete batches dropped)."""
    batches: list[list[int]] = []
    total = max(1, math.floor(epochs * (n // global_batch)))
    epoch = 0
    while len(batches) < total:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        batches += [perm[i : i + global_batch] for i in range(0, n - global_batch + 1, global_batch)]
        epoch += 1
    return batches[:total]


def use_bf16(setting: str, device: torch.device) -> bool:
    if setting == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return setting == "on"


def train(cfg: TrainConfig) -> dict:
    """Train, evaluate, compute normalization statistics and save; returns the report."""
    started = time.time()
    cfg.validate()
    if holds_steps(cfg.data):
        from rm_training.prm_train import train_steps  # it builds on this module

        return train_steps(cfg, started)
    if cfg.step_token is not None or cfg.train_on_last_step_only:
        raise ConfigError("--step-token and --train-on-last-step-only are for process-reward data, not preferences")
    ddp, device, log = start_run(cfg)

    # Data and model
    train_groups, eval_groups = load_groups(cfg.data), load_groups(cfg.eval_data)
    model, tokenizer, metadata = new_reward_model(cfg.model, cfg.max_length)
    check_max_length(model.model, cfg)
    encoder = sample_encoder(tokenizer, metadata.recipe)
    train_set = tokenize_groups(train_groups, encoder, desc="tokenize train")
    eval_set = tokenize_groups(eval_groups, encoder, desc="tokenize eval")
    pad_id = tokenizer.pad_token_id
    log(
        f"backbone {cfg.model} ({metadata.pooling} pooling, {metadata.recipe.template} template); "
        f"{len(train_set)} train groups, {len(eval_set)} eval groups; "
        f"{sum(g.n_truncated for g in train_set)} train responses truncated to {cfg.max_length} tokens"
    )
    prepare_model(model, cfg, device)

    # Training loop
    eval_curve = []

    def batch_loss(forward: Forward, indices: list[int]) -> torch.Tensor:
        batch = collate([train_set[i] for i in indices], pad_id).to(device)
        rewards = forward(batch.input_ids, batch.attention_mask)
        return reward_model_loss(
            rewards,
            batch.chosen,
            batch.rejected,
            batch.margin,
            batch.group,
            batch.n_groups,
            cfg.center_rewards_coefficient,
        )

    def evaluate_and_log(step: int, total_steps: int) -> dict:
        metrics = evaluate_groups(model, eval_set, pad_id, cfg.eval_batch_size)
        eval_curve.append([step, metrics["accuracy"], metrics["loss"]])
        log(
            f"step {step}/{total_steps}: eval accuracy {metrics['accuracy']:.4f}, "
            f"loss {metrics['loss']:.4f}, mean margin {metrics['mean_margin']:.3f}"
        )
        return metrics

    loss_curve, final, total_steps = fit(
        cfg, model, len(train_set), "training groups", batch_loss, evaluate_and_log, ddp, device, log, started
    )

    report = {}
    if ddp.is_main:
        metadata.normalization = normalization_stats(model, train_set, pad_id, cfg)
        report = {
            "eval_accuracy": final["accuracy"],
            "eval_loss": final["loss"],
            "eval_mean_margin": final["mean_margin"],
            "eval_std_margin": final["std_margin"],
            "n_eval_pairs": final["n_pairs"],
            "n_train_groups": len(train_set),
            "n_train_pairs": sum(len(g.pairs) for g in train_set),
            "steps": total_steps,
            "world_size": ddp.world_size,
            "normalization": vars(metadata.normalization),
            "loss_curve": loss_curve,
            "eval_curve": eval_curve,
            "config": asdict(cfg),
            "seconds": round(time.time() - started, 1),
        }
        output = Path(cfg.output)
        save_reward_model(output, model, tokenizer, metadata)
        (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_training_curves(loss_curve, eval_curve, output / "curves.png")
        log(
            f"eval accuracy {final['accuracy']:.4f} on {final['n_pairs']} pairs; wrote {output} "
            f"(checkpoint, report.json, curves.png) in {report['seconds']} s"
        )
    end_run(ddp)
    return report


def start_run(cfg: TrainConfig) -> tuple[Distributed, torch.device, Callable[..., None]]:
    """Join the process group, seed, pick the device; `log` prints on the main process only."""
    ddp = setup_distributed()
    seed_everything(cfg.seed)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    return ddp, device, tqdm.write if ddp.is_main else (lambda *a, **k: None)


def end_run(ddp: Distributed) -> None:
    if ddp.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def check_max_length(backbone: torch.nn.Module, cfg: TrainConfig) -> None:
    positions = getattr(backbone.config, "max_position_embeddings", None)
    if positions and cfg.max_length > positions:
        raise ConfigError(f"--max-length {cfg.max_length} exceeds the backbone's {positions} position embeddings")


def prepare_model(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """Dropout off unless kept (as TRL), gradient checkpointing where asked, on the device in train mode."""
    if not cfg.keep_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if cfg.gradient_checkpointing:
        model.model.gradient_checkpointing_enable()
    model.to(device).train()


Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(input_ids, attention_mask) -> the network's output in float32, run under the run's autocast (and DDP)."""


def fit(
    cfg: TrainConfig,
    network: torch.nn.Module,
    n_train: int,
    what: str,
    batch_loss: Callable[[Forward, list[int]], torch.Tensor],
    evaluate: Callable[[int, int], dict],
    ddp: Distributed,
    device: torch.device,
    log: Callable[..., None],
    started: float,
) -> tuple[list, dict, int]:
    """The optimization loop every rm-train model shares: AdamW with warmup and decay over shuffled global
    batches of `n_train` examples (`what` names them), gradient accumulation, a progress bar (about ten lines
    in a log file), and `evaluate(step, total_steps)` on the main process at step 0, every `eval_every` steps
    and at the end. `batch_loss(forward, indices)` is this process's loss on its share of a batch. Returns
    (loss curve, the final evaluation, optimizer steps)."""
    trained = DistributedDataParallel(network) if ddp.world_size > 1 else network

    # Optimizer and schedule
    global_batch = cfg.batch_size * ddp.world_size
    if n_train < global_batch:
        raise ConfigError(f"{n_train} {what} are fewer than one global batch of {global_batch}")
    batches = global_batches(n_train, global_batch, cfg.epochs, cfg.seed)
    total_steps = max(1, len(batches) // cfg.grad_accum)
    eval_every = cfg.eval_every or math.ceil(total_steps / 5)
    optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=round(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    bf16 = use_bf16(cfg.bf16, device)

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return trained(input_ids, attention_mask).float()

    # Training loop
    loss_curve = []
    step, running = 0, []
    if ddp.is_main:
        evaluate(step, total_steps)  # step 0: the untrained head, so the report shows what training bought
    # in a log file, about ten lines per run that carry the loss and learning rate, instead of the bar
    progress = bar(total=total_steps, desc="train", disable=not ddp.is_main or not on_terminal())
    line_every = math.ceil(total_steps / 10)
    final = None
    for micro, batch_indices in enumerate(batches[: total_steps * cfg.grad_accum]):
        mine = batch_indices[ddp.rank * cfg.batch_size : (ddp.rank + 1) * cfg.batch_size]
        loss = batch_loss(forward, mine)
        (loss / cfg.grad_accum).backward()
        running.append(loss.item())
        if (micro + 1) % cfg.grad_accum:
            continue
        torch.nn.utils.clip_grad_norm_(network.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_loss = torch.tensor(float(np.mean(running)))
        if ddp.world_size > 1:  # log the loss of the whole global batch, not of this process's share
            dist.all_reduce(step_loss)  # gloo has no AVG
            step_loss /= ddp.world_size
        loss_curve.append([step, step_loss.item()])
        running = []
        progress.update()
        progress.set_postfix(loss=f"{loss_curve[-1][1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if progress.disable and (step % line_every == 0 or step == total_steps):
            log(
                f"train step {step}/{total_steps}: loss {loss_curve[-1][1]:.4f}, "
                f"lr {scheduler.get_last_lr()[0]:.2e} ({time.time() - started:.0f} s in)"
            )
        if ddp.is_main and (step % eval_every == 0 or step == total_steps):
            final = evaluate(step, total_steps)  # the last one is the final model's: the report reuses it
    progress.close()
    if ddp.is_main and final is None:  # fewer micro-batches than --grad-accum: no optimizer step was taken
        final = evaluate(step, total_steps)
    return loss_curve, final or {}, total_steps


def normalization_stats(
    model: torch.nn.Module, train_set: list[TokenizedGroup], pad_id: int, cfg: TrainConfig
) -> RewardNormalization:
    """Reward mean and std over (up to `norm_samples`) distinct training responses."""
    sequences = list(dict.fromkeys(ids for g in train_set for ids in g.ids))
    if len(sequences) > cfg.norm_samples:
        sequences = random.Random(cfg.seed).sample(sequences, cfg.norm_samples)
    model.eval()
    rewards = score_sequences(model, sequences, pad_id, cfg.eval_batch_size, desc="normalization")
    return RewardNormalization(
        mean=rewards.mean().item(),
        std=rewards.std().item() if len(rewards) > 1 else 1.0,
        size=len(sequences),
        description=f"distinct responses of the training data {cfg.data}",
    )


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse_config(TrainConfig, argv, prog="rm-train", description=__doc__)
        train(cfg)
    except (ConfigError, DataError, BackboneError, RecipeError) as e:
        print(f"rm-train: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
