"""rm-ppo's options: one dataclass, one flag per field, each documented once in its `option`."""

from __future__ import annotations

from dataclasses import dataclass

from rm_contract.config_cli import ConfigError, option


@dataclass
class PPOConfig:
    policy: str = option(
        help="Causal LM to train: a local Hugging Face checkpoint directory, or `smollm2` (bundled "
        "SmolLM2-135M-Instruct).",
    )
    reward_target: str = option(help="Reward service: host:port, comma-separated replicas, or dns:///name:port.")
    prompts: str = option(help="JSONL of prompts: `prompt` (text or chat messages) or `messages` per line.")
    output: str = option(help="Directory for metrics.jsonl, curves.png, checkpoint/ and the trained policy (policy/).")
    steps: int = option(20, "PPO steps (one rollout batch each).")
    batch_size: int = option(16, "Responses sampled per step.")
    minibatch_size: int = option(4, "Responses per gradient step.")
    ppo_epochs: int = option(2, "Passes over each rollout batch.")
    lr: float = option(3e-6, "Policy learning rate (AdamW).")
    value_lr: float = option(1e-5, "Value-model learning rate (AdamW).")
    max_new_tokens: int = 48
    temperature: float = option(0.7, "Sampling temperature; log-probabilities use logits / temperature to match.")
    top_p: float = 1.0
    beta: float = option(0.05, "KL coefficient (initial value when adaptive).")
    target_kl: float = option(0.0, "Adaptive KL controller target (Ziegler et al.); 0 keeps beta fixed.")
    kl_horizon: float = option(10000.0, "Adaptive controller horizon, in samples.")
    kl_estimator: str = option("k1", "k1 (logp - logp_ref) or k3 (exp(logp_ref - logp) - 1 - (logp_ref - logp)).")
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    max_grad_norm: float = 1.0
    missing_eos_penalty: float | None = option(
        None,
        "Subtracted from the score of a response that hit max_new_tokens without EOS.",
    )
    reward_normalization: str = option(
        "none",
        "none, server (the bundle's statistics, applied by the service) or running (whitened with running moments).",
    )
    reward_model: str = option("", "Model on the reward service (default: the server's default model).")
    ensemble_reduce: str = option("mean", "For an ensemble reward model: mean, mean_minus_k_std (conservative) or min.")
    ensemble_k: float = option(1.0, "k of mean_minus_k_std.")
    step_reduce: str = option(
        "min", "Process reward models: how the step scores become the final reward (min, last, product, mean)."
    )
    step_reward_weight: float = option(
        1.0,
        "Process reward models: each step's score times this is also given on the token ending the step (dense"
        " rewards; 0: the final reward only).",
    )
    reward_timeout_s: float = option(
        120.0,
        "Deadline of one reward call, retries included; the run stops (never trains on missing rewards) after it.",
    )
    save_every: int = option(10, "Steps between checkpoints (0: only at the end).")
    resume: bool = option(False, "Continue from OUTPUT/checkpoint when it exists.")
    seed: int = 0

    def validate(self) -> None:
        if self.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"--kl-estimator must be k1 or k3, not {self.kl_estimator!r}")
        if self.ensemble_reduce not in ("mean", "mean_minus_k_std", "min"):
            raise ConfigError("--ensemble-reduce must be mean, mean_minus_k_std or min")
        if self.step_reduce not in ("min", "last", "product", "mean"):
            raise ConfigError("--step-reduce must be min, last, product or mean")
        if self.reward_normalization not in ("none", "server", "running"):
            raise ConfigError("--reward-normalization must be none, server or running")
        for name in ("steps", "batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.batch_size % self.minibatch_size:
            raise ConfigError("--batch-size must be a multiple of --minibatch-size")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ConfigError("--temperature must be positive and --top-p in (0, 1]")
