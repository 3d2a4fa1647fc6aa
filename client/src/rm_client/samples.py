"""Python values -> reward.v1 Samples: text pairs, chat conversations, token ids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rm_client.pb import reward_pb2 as pb

Conversation = Sequence[Mapping[str, str]]
"""Chat messages `{"role", "content"}` ending with the assistant message(s) to score."""


def text_samples(prompts: Sequence[str], responses: Sequence[str]) -> list[pb.Sample]:
    if isinstance(prompts, str) or isinstance(responses, str):
        raise TypeError("prompts and responses must be sequences of strings, not a single string")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [pb.Sample(text=pb.TextPair(prompt=p, response=r)) for p, r in zip(prompts, responses)]


def conversation_sample(messages: Conversation) -> pb.Sample:
    try:
        return pb.Sample(
            conversation=pb.Conversation(messages=[pb.Message(role=m["role"], content=m["content"]) for m in messages])
        )
    except (KeyError, TypeError):
        raise ValueError("a conversation is a list of {'role': ..., 'content': ...} messages") from None


def conversation_samples(conversations: Sequence[Conversation]) -> list[pb.Sample]:
    return [conversation_sample(c) for c in conversations]


def prompt_completion_samples(prompts: Sequence, completions: Sequence) -> list[pb.Sample]:
    """What TRL passes to reward functions: both strings, or both conversations (prompt messages and the
    generated assistant messages)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [
        pb.Sample(text=pb.TextPair(prompt=p, response=c))
        if isinstance(c, str)
        else conversation_sample([*([{"role": "user", "content": p}] if isinstance(p, str) else p), *c])
        for p, c in zip(prompts, completions)
    ]


def token_samples(sequences: Sequence[Sequence[int]]) -> list[pb.Sample]:
    return [pb.Sample(tokens=pb.TokenIds(ids=[int(t) for t in ids])) for ids in sequences]
