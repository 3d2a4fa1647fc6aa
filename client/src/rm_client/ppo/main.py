"""`rm-ppo`: PPO against a reward service (see rm_client.ppo.trainer for the loop).

    rm-ppo --policy smollm2 --reward-target localhost:50051 --prompts prompts.jsonl --steps 20 --output runs/ppo

OUTPUT receives metrics.jsonl (one line per step), curves.png, checkpoint/ (resume with --resume) and
policy/: the trained policy with its tokenizer and chat template, loadable by transformers alone.
The reward service's bearer token, when it requires one, is read from RM_AUTH_TOKEN (or RM_TOKEN).
Exit codes: 0 done, 1 the reward service failed (after the client's retries), 2 bad options or inputs.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rm_client.channel import Security, read_token
from rm_client.client import RewardClient
from rm_client.errors import RewardServiceError
from rm_client.ppo.config import PPOConfig
from rm_client.ppo.plots import plot_curves
from rm_client.ppo.rollout import PromptError, read_prompts
from rm_client.ppo.trainer import train
from rm_contract.backbones import BackboneError, load_pretrained, resolve_backbone
from rm_contract.config_cli import ConfigError, parse_config

log = logging.getLogger("rm_ppo")


def load_policy(name_or_path: str):
    """(policy, tokenizer) in float32 from a local checkpoint or a bundled name."""
    backbone = resolve_backbone(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(backbone.path, **backbone.from_pretrained_kwargs())
    policy = load_pretrained(AutoModelForCausalLM, backbone, dtype=torch.float32)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {name_or_path} has no EOS token: responses could never end")
    pad_id = tokenizer.pad_token_id  # 0 is a pad id like any other
    policy.generation_config.pad_token_id = pad_id if pad_id is not None else tokenizer.eos_token_id
    return policy, tokenizer


def run(config: PPOConfig) -> Path:
    config.validate()
    torch.manual_seed(config.seed)
    prompts = read_prompts(config.prompts)
    policy, tokenizer = load_policy(config.policy)
    options = {"model": config.reward_model, "ensemble_reduce": config.ensemble_reduce, "ensemble_k": config.ensemble_k}
    options["security"] = Security(token=read_token())
    with RewardClient(config.reward_target, timeout_s=config.reward_timeout_s, **options) as client:
        info = client.model_info()  # fail before any work when the service is unreachable
        log.info("reward model %s v%s (%s) at %s", info.name, info.version, info.dtype, config.reward_target)
        trainer = train(config, policy, tokenizer, client, prompts)
    output = Path(config.output)
    rows = [json.loads(line) for line in open(output / "metrics.jsonl")]
    plot_curves(rows, output / "curves.png")
    trainer.policy.save_pretrained(output / "policy", safe_serialization=True)
    tokenizer.save_pretrained(output / "policy")
    return output


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        config = parse_config(PPOConfig, argv, prog="rm-ppo", description=__doc__)
        output = run(config)
    except (ConfigError, PromptError, BackboneError, OSError) as e:
        print(f"rm-ppo: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RewardServiceError as e:
        print(
            f"rm-ppo: error: the reward service failed, stopping without training on missing rewards: {e}",
            file=sys.stderr,
        )
        sys.exit(1)
    print(f"wrote {output / 'metrics.jsonl'}, {output / 'curves.png'} and the policy in {output / 'policy'}")


if __name__ == "__main__":
    main()
