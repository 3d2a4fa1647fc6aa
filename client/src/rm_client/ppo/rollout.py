"""Rollouts: prompts in (plain or chat), sampled responses out, with the token-level tensors PPO needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import TopPLogitsWarper

from rm_contract.padding import pad_batch, position_ids
from rm_contract.records import DataError, read_records


class PromptError(ValueError):
    """A prompts file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Prompt:
    """What the reward service gets as the prompt: the text, or the chat messages."""

    text: str | None = None
    messages: tuple[dict, ...] | None = None

    def for_service(self) -> str | list[dict]:
        return self.text if self.messages is None else list(self.messages)


def read_prompts(path: str | Path) -> list[Prompt]:
    """JSONL with `prompt` (a string, or a list of messages) or `messages` per line."""
    prompts = []
    try:
        records = list(read_records(path))
    except DataError as e:
        raise PromptError(str(e)) from None
    for where, record in records:
        value = record.get("prompt", record.get("messages")) if isinstance(record, dict) else None
        if isinstance(value, str) and value:
            prompts.append(Prompt(text=value))
        elif (
            isinstance(value, list)
            and value
            and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value)
        ):
            prompts.append(Prompt(messages=tuple({"role": m["role"], "content": m["content"]} for m in value)))
        else:
            raise PromptError(f"{where}: expected 'prompt' (text or messages) or 'messages'")
    if not prompts:
        raise PromptError(f"{path}: no prompts")
    return prompts


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """The policy's input: the chat template with the generation prompt where the tokenizer has one."""
    if tokenizer.chat_template:
        messages = list(prompt.messages) if prompt.messages else [{"role": "user", "content": prompt.text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    text = prompt.text if prompt.messages is None else "\n".join(m["content"] for m in prompt.messages)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


@dataclass
class Rollout:
    """A batch of sampled responses. Queries are left-padded, responses right-padded."""

    query_ids: torch.Tensor  # (B, Q)
    query_mask: torch.Tensor
    response_ids: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # 1 up to and including EOS
    ended_with_eos: torch.Tensor  # (B,) bool
    logprobs: torch.Tensor  # (B, R) policy logprobs at sampling time (logits / temperature, top-p nucleus)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)


def response_mask_until_eos(response_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 on every token up to and including the first EOS (all tokens when there is none); (mask, has_eos)."""
    is_eos = response_ids == eos_id
    has_eos = is_eos.any(dim=1)
    first = torch.where(
        has_eos, is_eos.float().argmax(dim=1), torch.full_like(has_eos, response_ids.shape[1], dtype=torch.long)
    )
    positions = torch.arange(response_ids.shape[1]).unsqueeze(0)
    last = torch.where(has_eos, first, first - 1)
    return (positions <= last.unsqueeze(1)).long(), has_eos


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_response: int,
    temperature: float,
    top_p: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of the last `n_response` tokens under `model`, in the distribution the tokens were
    drawn from: logits divided by the sampling temperature and, with `top_p` < 1, cut to the nucleus (the
    rule of transformers' TopPLogitsWarper, which `generate` samples with) and renormalized. The taken token
    always stays in: it was sampled, so it was in the nucleus then; when an update moves it out, it keeps a
    renormalized probability instead of 0 (a log-ratio of -inf). Entropy is that distribution's. Position
    ids come from the mask, so left padding does not shift them."""
    positions = position_ids(attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    logits = logits[:, -n_response - 1 : -1].float() / temperature
    taken_ids = input_ids[:, -n_response:].unsqueeze(-1)
    if top_p < 1.0:
        kept = nucleus(logits, top_p)
        kept.scatter_(-1, taken_ids, True)
        logits = logits.masked_fill(~kept, float("-inf"))
    logp = F.log_softmax(logits, dim=-1)
    taken = logp.gather(-1, taken_ids).squeeze(-1)
    entropy = None
    if with_entropy:  # tokens out of the nucleus add 0 (and no NaN gradient: 0 * -inf)
        entropy = -(logp.exp() * logp.masked_fill(logp.isneginf(), 0.0)).sum(-1)
    return taken, entropy


def sampling_options(temperature: float, top_p: float, max_new_tokens: int, eos_id: int, pad_id: int) -> dict:
    """`generate`'s arguments for a rollout: sampling at `temperature` within the top-p nucleus, and nothing
    else that reshapes the distribution (`token_logprobs` computes exactly this one). Set explicitly:
    transformers fills what is left unset from the checkpoint's generation_config, which may hold a
    repetition penalty, top-k, min-p and the like."""
    return {
        "do_sample": True,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": 0,
        "min_p": 0.0,
        "typical_p": 1.0,
        "epsilon_cutoff": 0.0,
        "eta_cutoff": 0.0,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "min_new_tokens": 0,
        "max_new_tokens": max_new_tokens,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }


@torch.no_grad()
def nucleus(logits: torch.Tensor, top_p: float, max_elements: int = 2**24) -> torch.Tensor:
    """Where transformers' TopPLogitsWarper keeps a token, computed a few rows at a time: it sorts and sums
    the whole vocabulary, which for a batch of long responses over a 150k vocabulary is gigabytes at once."""
    flat = logits.reshape(-1, logits.shape[-1])
    kept = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
    warp = TopPLogitsWarper(top_p, filter_value=float("-inf"))
    rows = max(1, max_elements // flat.shape[-1])
    for start in range(0, flat.shape[0], rows):
        kept[start : start + rows] = warp(None, flat[start : start + rows]).isfinite()
    return kept.view_as(logits)


@torch.no_grad()
def sample(
    policy,
    tokenizer,
    prompts: list[Prompt],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_id: int,
    pad_id: int,
) -> Rollout:
    query_ids, query_mask = map(
        torch.from_numpy, pad_batch([prompt_ids(tokenizer, p) for p in prompts], pad_id, "left")
    )
    output = policy.generate(
        input_ids=query_ids,
        attention_mask=query_mask,
        **sampling_options(temperature, top_p, max_new_tokens, eos_id, pad_id),
    )
    response_ids = output[:, query_ids.shape[1] :]
    response_mask, has_eos = response_mask_until_eos(response_ids, eos_id)
    response_ids = torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    rollout = Rollout(query_ids, query_mask, response_ids, response_mask, has_eos, torch.empty(0))
    rollout.logprobs, _ = token_logprobs(
        policy, rollout.input_ids, rollout.attention_mask, response_ids.shape[1], temperature, top_p
    )
    return rollout


def response_texts(tokenizer, rollout: Rollout) -> list[str]:
    """The responses as text, EOS and padding removed (what the reward service scores)."""
    return [
        tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        for ids, mask in zip(rollout.response_ids, rollout.response_mask)
    ]
