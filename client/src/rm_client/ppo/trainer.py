"""`rm-ppo`: PPO on a local causal LM, rewards from the reward service, KL to a frozen reference computed here.

    rm-ppo --policy smollm2 --reward-target localhost:50051 --prompts prompts.jsonl --steps 20 --output runs/ppo

One step, read top to bottom in `PPOTrainer.step`:
1. sample responses for a batch of prompts (temperature, top-p, cut at EOS);
2. send (prompt, response) to the reward service without waiting for the answer;
3. meanwhile compute the reference log-probs and the values locally (this hides the service's latency);
4. collect the scores, build per-token rewards r_t = -beta * kl_t (+ score on the last token; with a process
   reward model, + step_reward_weight x each step's score on the token ending the step), GAE;
5. several epochs of clipped PPO updates over minibatches; update the KL coefficient.
The value model is a separate copy of the policy's backbone with a scalar head (so value regression never
pulls on the policy's features); the reference is a frozen copy of the initial policy.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from rm_client.client import RewardClient
from rm_client.ppo import core
from rm_client.ppo.config import PPOConfig
from rm_client.ppo.rollout import Prompt, Rollout, response_texts, sample, token_logprobs
from rm_client.ppo.steps import StepSplit, dense_step_rewards, split_steps, step_end_tokens
from rm_contract.padding import position_ids

log = logging.getLogger("rm_ppo")


class ValueModel(nn.Module):
    """A transformer backbone and a scalar head: one value per token."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int) -> torch.Tensor:
        """(B, n_response): the value of the state from which response token t was generated (the hidden
        state one position before it)."""
        positions = position_ids(attention_mask)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
        values = self.head(hidden.last_hidden_state.float()).squeeze(-1)
        return values[:, -n_response - 1 : -1]


@dataclass
class Batch:
    """Everything PPO's update needs for one rollout batch (all (B, R) unless noted)."""

    rollout: Rollout
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


class PPOTrainer:
    def __init__(self, config: PPOConfig, policy, tokenizer, client: RewardClient, prompts: list[Prompt]):
        self.config, self.policy, self.tokenizer, self.client, self.prompts = config, policy, tokenizer, client, prompts
        self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        self.value_model = ValueModel(copy.deepcopy(policy.base_model), policy.config.hidden_size)
        self.policy_optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
        self.value_optimizer = torch.optim.AdamW(self.value_model.parameters(), lr=config.value_lr, weight_decay=0.0)
        self.kl_controller = (
            core.AdaptiveKLController(config.beta, config.target_kl, config.kl_horizon)
            if config.target_kl > 0
            else core.FixedKLController(config.beta)
        )
        self.score_moments = core.RunningMoments()
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.step_index = 0
        self._rng = random.Random(config.seed)
        self._reward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        info = client.model_info() if client is not None else None  # None: the update alone, offline
        self.step_token = info.step_token if info is not None and info.output_kind == "steps" else None
        """A process reward model's step token: responses are scored step by step (dense rewards)."""
        if self.step_token is not None and any(p.messages is not None for p in prompts):
            raise ValueError("a process reward model scores text prompts with steps; these prompts are chat messages")
        if self.step_token is not None and config.reward_normalization == "server":
            raise ValueError("--reward-normalization server: a process reward model's scores are never normalized")

    # --- one step ----------------------------------------------------------------------------------------

    def step(self) -> dict:
        cfg, timings = self.config, {}
        started = time.perf_counter()
        prompts = [self._rng.choice(self.prompts) for _ in range(cfg.batch_size)]
        self.policy.eval()
        self.value_model.eval()
        rollout = sample(
            self.policy,
            self.tokenizer,
            prompts,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_p,
            self.eos_id,
            self.pad_id,
        )
        texts = response_texts(self.tokenizer, rollout)
        timings["generate"] = time.perf_counter() - started

        splits = [split_steps(t, self.step_token) for t in texts] if self.step_token is not None else None
        pending = self._request_scores(prompts, texts, splits)  # in flight while the local work below runs
        mark = time.perf_counter()
        n = rollout.response_ids.shape[1]
        with torch.no_grad():
            ref_logprobs, _ = token_logprobs(  # the reference sampling the same way: KL 0 before any update
                self.reference, rollout.input_ids, rollout.attention_mask, n, cfg.temperature, cfg.top_p
            )
            values = self.value_model(rollout.input_ids, rollout.attention_mask, n) * rollout.response_mask
        timings["ref_and_value"] = time.perf_counter() - mark

        mark = time.perf_counter()
        answer = pending.result()  # raises if the service failed: no made-up rewards
        timings["reward_wait"] = time.perf_counter() - mark
        dense = torch.zeros(rollout.response_ids.shape)
        if self.step_token is not None:
            dense = self._dense_rewards(rollout, splits, answer.steps)
            answer = answer.rewards
        raw_scores = torch.from_numpy(answer).float()

        mark = time.perf_counter()
        scores = self._shape_scores(raw_scores, rollout.ended_with_eos)
        mask = rollout.response_mask.float()
        kl = core.kl_per_token(rollout.logprobs, ref_logprobs, cfg.kl_estimator) * mask
        beta = self.kl_controller.beta
        rewards, non_score = core.per_token_rewards(scores, kl, mask, beta)
        rewards = rewards + dense * mask
        advantages, returns = core.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        advantages = core.masked_whiten(advantages, mask)
        batch = Batch(rollout, rollout.logprobs, values, advantages, returns)
        stats = self._optimize(batch)
        mean_kl = (kl.sum(1)).mean().item()
        self.kl_controller.update(mean_kl, cfg.batch_size)
        timings["train"] = time.perf_counter() - mark
        timings["step"] = time.perf_counter() - started
        self.step_index += 1
        return {
            "step": self.step_index,
            "score": raw_scores.mean().item(),
            "score_std": raw_scores.std().item() if len(raw_scores) > 1 else 0.0,
            "non_score_reward": non_score.sum(1).mean().item(),
            "step_reward": dense.sum(1).mean().item(),
            "kl": mean_kl,
            "beta": beta,
            "response_length": mask.sum(1).mean().item(),
            "eos_fraction": rollout.ended_with_eos.float().mean().item(),
            **stats,
            **{f"time/{k}": round(v, 4) for k, v in timings.items()},
            "reward_wait_fraction": timings["reward_wait"] / timings["step"],
            "reward_model": ", ".join(self.client.last_models),
            "example": {"prompt": prompts[0].for_service(), "response": texts[0], "score": raw_scores[0].item()},
        }

    def _request_scores(self, prompts: list[Prompt], texts: list[str], splits: list[StepSplit] | None) -> Future:
        if splits is not None:  # a process reward model: the responses' steps
            steps = [split.steps for split in splits]
            cfg = self.config
            return self._reward_pool.submit(
                self.client.score_steps, [p.text for p in prompts], steps, reduce=cfg.step_reduce
            )
        service_prompts = [p.for_service() for p in prompts]
        completions = [
            t if p.messages is None else [{"role": "assistant", "content": t}] for p, t in zip(prompts, texts)
        ]
        normalize = self.config.reward_normalization == "server"
        return self._reward_pool.submit(
            self.client.score_completions, service_prompts, completions, normalize=normalize
        )

    def _dense_rewards(self, rollout: Rollout, splits: list[StepSplit], step_scores: list) -> torch.Tensor:
        """Each step's score (times --step-reward-weight) on the policy token where the step ends."""
        ends = []
        for split, ids, mask in zip(splits, rollout.response_ids, rollout.response_mask):
            ends.append(step_end_tokens(self.tokenizer, ids[mask.bool()].tolist(), split.end_chars))
        shape = tuple(rollout.response_ids.shape)
        return dense_step_rewards([s.tolist() for s in step_scores], ends, shape, self.config.step_reward_weight)

    def _shape_scores(self, scores: torch.Tensor, ended_with_eos: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.reward_normalization == "running":
            self.score_moments.update(scores)
            scores = (scores - self.score_moments.mean) / self.score_moments.std
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(ended_with_eos, scores, scores - cfg.missing_eos_penalty)
        return scores

    def _optimize(self, batch: Batch) -> dict:
        cfg, rollout = self.config, batch.rollout
        n = rollout.response_ids.shape[1]
        # dropout off here as in sampling, where the old log-probs came from (TRL disables it too): with
        # it on, the first minibatch's ratio is not 1 before any update
        self.policy.eval()
        self.value_model.eval()
        history: dict[str, list[float]] = {}
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size)
            for start in range(0, cfg.batch_size, cfg.minibatch_size):
                rows = order[start : start + cfg.minibatch_size]
                ids, attention, mask = (
                    rollout.input_ids[rows],
                    rollout.attention_mask[rows],
                    rollout.response_mask[rows].float(),
                )
                logprobs, entropy = token_logprobs(
                    self.policy, ids, attention, n, cfg.temperature, cfg.top_p, with_entropy=True
                )
                pg_loss, pg_clip, approx_kl = core.policy_loss(
                    logprobs, batch.old_logprobs[rows], batch.advantages[rows], mask, cfg.clip_range
                )
                values = self.value_model(ids, attention, n)
                vf_loss, vf_clip = core.value_loss(
                    values, batch.old_values[rows], batch.returns[rows], mask, cfg.value_clip_range
                )
                entropy_mean = core.masked_mean(entropy, mask)
                loss = pg_loss - cfg.entropy_coef * entropy_mean
                self.policy_optimizer.zero_grad(set_to_none=True)
                self.value_optimizer.zero_grad(set_to_none=True)
                (loss + cfg.vf_coef * vf_loss).backward()
                nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                nn.utils.clip_grad_norm_(self.value_model.parameters(), cfg.max_grad_norm)
                self.policy_optimizer.step()
                self.value_optimizer.step()
                for name, value in (
                    ("policy_loss", pg_loss),
                    ("policy_clip_fraction", pg_clip),
                    ("approx_kl", approx_kl),
                    ("value_loss", vf_loss),
                    ("value_clip_fraction", vf_clip),
                    ("entropy", entropy_mean),
                ):
                    history.setdefault(name, []).append(value.item())
        return {name: float(np.mean(values)) for name, values in history.items()}

    # --- checkpoints -------------------------------------------------------------------------------------

    def save_checkpoint(self, directory: Path) -> None:
        """Everything needed to resume: models, optimizers, KL coefficient, running moments, RNG states."""
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step_index,
            "policy": self.policy.state_dict(),
            "value_model": self.value_model.state_dict(),
            "policy_optimizer": self.policy_optimizer.state_dict(),
            "value_optimizer": self.value_optimizer.state_dict(),
            "beta": self.kl_controller.beta,
            "score_moments": vars(self.score_moments),
            "rng": self._rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        partial = directory / "trainer_state.pt.partial"
        with open(partial, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a power cut never leaves an empty checkpoint
        partial.replace(directory / "trainer_state.pt")  # a crash mid-save never leaves a torn checkpoint
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)  # the rename itself
        finally:
            os.close(directory_fd)

    def load_checkpoint(self, directory: Path) -> None:
        state = torch.load(directory / "trainer_state.pt", weights_only=True)  # no pickle of arbitrary objects
        self.step_index = state["step"]
        self.policy.load_state_dict(state["policy"])
        self.value_model.load_state_dict(state["value_model"])
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        self.value_optimizer.load_state_dict(state["value_optimizer"])
        self.kl_controller.beta = state["beta"]
        vars(self.score_moments).update(state["score_moments"])
        self._rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])


def train(config: PPOConfig, policy, tokenizer, client: RewardClient, prompts: list[Prompt]) -> PPOTrainer:
    """Run `config.steps` steps, appending one JSON line per step to OUTPUT/metrics.jsonl."""
    output = Path(config.output)
    trainer = PPOTrainer(config, policy, tokenizer, client, prompts)
    checkpoint = output / "checkpoint"
    if config.resume and (checkpoint / "trainer_state.pt").is_file():
        trainer.load_checkpoint(checkpoint)
        log.info("resumed from %s at step %d", checkpoint, trainer.step_index)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    with (
        open(output / "metrics.jsonl", "a" if config.resume else "w") as metrics,
        tqdm(total=config.steps, initial=trainer.step_index, desc="ppo", unit="step") as bar,
    ):
        while trainer.step_index < config.steps:
            row = trainer.step()
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.set_postfix(score=f"{row['score']:.3f}", kl=f"{row['kl']:.3f}")
            bar.update()
            if config.save_every and trainer.step_index % config.save_every == 0:
                trainer.save_checkpoint(checkpoint)
    trainer.save_checkpoint(checkpoint)
    return trainer
