"""Python values -> reward.v1 Samples: text pairs, chat conversations, token ids, parsed data records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rm_contract.pb import reward_pb2 as pb
from rm_contract.recipe import Sample

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


def sample_to_pb(sample: Sample) -> pb.Sample:
    """A parsed sample on the wire: a text pair where it is one, else its conversation, which the server
    splits by the same rule the parser used (Sample.from_messages), so it encodes the very same sample."""
    if len(sample.prompt) == 1 and len(sample.response) == 1:
        prompt, response = sample.prompt[0].content, sample.response[0].content
        if sample == Sample.from_text(prompt, response):
            return pb.Sample(text=pb.TextPair(prompt=prompt, response=response))
    messages = [pb.Message(role=m.role, content=m.content) for m in (*sample.prompt, *sample.response)]
    return pb.Sample(conversation=pb.Conversation(messages=messages))
