"""veRL's custom reward function, scored by rm-serve over gRPC: `compute_score`.

veRL's reward loop calls `await compute_score(data_source=..., solution_str=..., ground_truth=...,
extra_info=..., **reward_kwargs)` once per sample, many samples at once, and takes a float or a dict with
"score" (its other keys are logged as reward_extra_info). rm-serve batches the concurrent single-sample
calls across workers. veRL passes the decoded response but not the prompt: it is read from `extra_info`
under `prompt_key` (default: the first of "prompt" and "question" present, the keys veRL's example datasets
write); a string is scored as (prompt, response) with the bundle's recipe, a list of chat messages as a
conversation with the response appended as the assistant's message. A sample without a prompt raises: a
reward for the response alone would be a wrong reward, silently trained on.

Config (veRL's `reward.custom_reward_function`; before its 2026 config move, the top-level
`custom_reward_function`), with the path printed by
`python -c "import rm_client.verl_reward as m; print(m.__file__)"`:

    reward:
      custom_reward_function:
        path: /usr/lib/python3.11/site-packages/rm_client/verl_reward.py
        name: compute_score
        reward_kwargs:
          target: rm-serve.rlhf.svc:50051
          timeout_s: 180

Failures (after the client's retries within `timeout_s`) raise `RewardServiceError`, which stops the step
rather than training on a missing reward. When rm-serve requires a bearer token, the reward workers read it
from the RM_AUTH_TOKEN environment variable (or RM_TOKEN), the name rm-serve reads its own from.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Mapping
from typing import Any

from rm_client.channel import Security, read_token
from rm_client.client import AsyncRewardClient
from rm_client.samples import conversation_sample, text_samples

PROMPT_KEYS = ("prompt", "question")
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, AsyncRewardClient]] = (
    weakref.WeakKeyDictionary()
)
"""One client (one gRPC channel) per event loop, target and options: veRL calls once per sample. Dropped
with its loop."""


async def compute_score(
    data_source: str | None,
    solution_str: str,
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    *,
    target: str = "localhost:50051",
    prompt_key: str | None = None,
    model: str = "",
    normalize: bool = False,
    timeout_s: float = 180.0,
    **trainer_kwargs: Any,
) -> dict[str, float]:
    """The reward of `solution_str` given the prompt in `extra_info`, as {"score": reward, "rm_latency_s": s};
    a process reward model's answer adds its step scores as scalars veRL logs per sample (`rm_num_steps`,
    `rm_step_min`, `rm_step_last`, `rm_step_mean`; "score" is their min, the server's default reduction).
    `trainer_kwargs` takes what veRL passes for its own reward models (reward_router_address,
    reward_model_tokenizer), unused here."""
    prompt = prompt_of(extra_info, prompt_key)
    client = _client(target, model, timeout_s)
    started = time.perf_counter()
    if isinstance(prompt, str):
        sample = text_samples([prompt], [solution_str])[0]
    else:
        sample = conversation_sample([*prompt, {"role": "assistant", "content": solution_str}])
    (result,) = await client.score_results([sample], normalize=normalize)
    answer = {"score": float(result.reward), "rm_latency_s": time.perf_counter() - started}
    steps = list(result.step_rewards)
    if steps:
        answer |= {"rm_num_steps": len(steps), "rm_step_min": min(steps), "rm_step_last": steps[-1]}
        answer["rm_step_mean"] = sum(steps) / len(steps)
    return answer


def prompt_of(extra_info: Mapping[str, Any] | None, prompt_key: str | None = None) -> str | list[dict]:
    """The sample's prompt: a string, or chat messages ({"role", "content"} mappings)."""
    info = extra_info or {}
    keys = (prompt_key,) if prompt_key else PROMPT_KEYS
    key = next((k for k in keys if k in info), None)
    if key is None:
        raise ValueError(
            f"no prompt in extra_info under {' or '.join(map(repr, keys))} (it has {sorted(info) or 'no keys'}): "
            "write the prompt into each row's extra_info, or name its key with reward_kwargs.prompt_key"
        )
    prompt = info[key]
    if isinstance(prompt, str) and prompt:
        return prompt
    messages = list(prompt) if isinstance(prompt, list | tuple) else None
    if not messages or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise ValueError(
            f"extra_info[{key!r}] must be a non-empty string or a list of chat messages with string role and content"
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _client(target: str, model: str, timeout_s: float) -> AsyncRewardClient:
    clients = _clients.setdefault(asyncio.get_running_loop(), {})
    key = (target, model, timeout_s)
    if key not in clients:
        security = Security(token=read_token())
        clients[key] = AsyncRewardClient(target, model=model, timeout_s=timeout_s, security=security)
    return clients[key]
