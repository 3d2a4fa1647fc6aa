"""Run in .venv-verl (veRL 0.9.1) by tests/client/test_adapters.py: veRL's own custom-reward-function loader
and its naive reward manager (the reward loop's default) score rollouts through rm_client.verl_reward
against a live rm-serve, configured as docs/integrations.md says.

    .venv-verl/bin/python tests/client/verl_reward_manager.py TARGET TOKENIZER_DIR SAMPLES_JSON

Prints one JSON object per sample: veRL's answer and the response text veRL decoded.
"""

import json
import sys

import numpy as np
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer
from verl import DataProto
from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager
from verl.trainer.ppo.reward import get_custom_reward_fn

import rm_client.verl_reward


def rollout(tokenizer, prompt: str, response: str, pad: int = 3) -> DataProto:
    """One sample as veRL's reward loop hands it over: padded response ids, the attention mask of prompt and
    response, the dataset row's non-tensor fields."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    pad_id = tokenizer.pad_token_id
    mask = [1] * (len(prompt_ids) + len(response_ids)) + [0] * pad
    return DataProto.from_dict(
        tensors={
            "responses": torch.tensor([response_ids + [pad_id] * pad]),
            "attention_mask": torch.tensor([mask]),
        },
        non_tensors={
            "data_source": np.array(["openai/gsm8k"], dtype=object),
            "reward_model": np.array([{"ground_truth": "42", "style": "model"}], dtype=object),
            "extra_info": np.array([{"split": "train", "index": 0, "question": prompt}], dtype=object),
        },
    )


def main() -> None:
    target, tokenizer_dir, samples = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    config = OmegaConf.create(
        {
            "reward": {
                "custom_reward_function": {
                    "path": rm_client.verl_reward.__file__,
                    "name": "compute_score",
                    "reward_kwargs": {"target": target, "timeout_s": 60},
                }
            }
        }
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    manager = NaiveRewardManager(config, tokenizer, get_custom_reward_fn(config))
    assert manager.is_async_reward_score  # awaited, not run in a thread

    async def score_all() -> list[dict]:
        import asyncio

        data = [rollout(tokenizer, prompt, response) for prompt, response in samples]
        return await asyncio.gather(*(manager.run_single(d) for d in data))

    results = manager.loop.run_until_complete(score_all())
    for (prompt, response), result in zip(samples, results):
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        print(json.dumps({"prompt": prompt, "decoded": decoded, **result}))


if __name__ == "__main__":
    main()
