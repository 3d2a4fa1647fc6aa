"""Protobuf <-> domain conversion: the only module besides the servicer that knows reward.v1 types."""

from __future__ import annotations

import numpy as np

from rm_contract.pb import reward_pb2 as pb
from rm_contract.recipe import Message, RecipeError, Sample
from rm_server.errors import InvalidRequest
from rm_server.models import EnsembleScores, ModelIdentity
from rm_server.scoring import SampleInput, ScoreOutcome, TokenInput

MAX_MESSAGES_PER_CONVERSATION = 1024
"""Turns in one conversation sample: far beyond any chat a reward model scores, far below what stalls the
chat template (2 million empty messages once took 25-52 s to render and score)."""


def sample_from_pb(index: int, sample: pb.Sample) -> SampleInput:
    kind = sample.WhichOneof("input")
    if kind == "text":  # an empty response is scored: a policy may answer with EOS alone
        return Sample.from_text(sample.text.prompt, sample.text.response)
    if kind == "conversation":
        return _conversation(index, sample.conversation.messages)
    if kind == "tokens":
        return TokenInput(tuple(sample.tokens.ids))
    raise InvalidRequest(f"sample {index}: no input; set one of text, conversation or tokens")


def _conversation(index: int, messages) -> Sample:
    if len(messages) > MAX_MESSAGES_PER_CONVERSATION:  # counted on the wire message, before converting any
        raise InvalidRequest(
            f"sample {index}: {len(messages)} messages; at most {MAX_MESSAGES_PER_CONVERSATION} per conversation"
        )
    try:
        return Sample.from_messages([Message(m.role, m.content) for m in messages])
    except RecipeError as e:
        raise InvalidRequest(f"sample {index}: {e}") from None


def samples_from_request(request: pb.ScoreRequest) -> list[SampleInput]:
    return [sample_from_pb(i, s) for i, s in enumerate(request.samples)]


def score_response(request_id: str, outcome: ScoreOutcome, model: ModelIdentity) -> pb.ScoreResponse:
    t = outcome.timing
    return pb.ScoreResponse(
        request_id=request_id,
        results=[
            pb.SampleResult(reward=r.reward, num_tokens=r.num_tokens, truncated=r.truncated) for r in outcome.results
        ],
        model_name=model.name,
        model_version=model.version,
        model_sha256=model.sha256,
        timing=pb.Timing(
            queue_ms=t.queue_ms, tokenization_ms=t.tokenization_ms, inference_ms=t.inference_ms, total_ms=t.total_ms
        ),
        normalized=outcome.normalized,
    )


def ensemble_response(
    request_id: str, scores: EnsembleScores, rewards: np.ndarray, total_ms: float
) -> pb.ScoreResponse:
    """The selected reduction as `reward`, with every member's normalized reward beside it."""
    mean, std, low = scores.mean, scores.std, scores.min
    return pb.ScoreResponse(
        request_id=request_id,
        results=[
            pb.SampleResult(
                reward=float(rewards[i]),
                num_tokens=scores.num_tokens[i],
                truncated=scores.truncated[i],
                ensemble=pb.EnsembleStats(
                    mean=float(mean[i]), std=float(std[i]), min=float(low[i]), members=scores.members[:, i].tolist()
                ),
            )
            for i in range(len(rewards))
        ],
        model_name=scores.identity.name,
        model_version=scores.identity.version,
        model_sha256=scores.identity.sha256,
        timing=pb.Timing(total_ms=total_ms),
        normalized=True,
    )
