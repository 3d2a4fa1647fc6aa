"""Protobuf <-> domain conversion: the only module besides the servicer that knows reward.v1 types."""

from __future__ import annotations

import json

from rm_contract.pb import reward_pb2 as pb
from rm_contract.recipe import Message, Sample
from rm_server.core.inputs import (
    Limits,
    SampleInput,
    ScoreRequest,
    TokenInput,
    check_conversation_length,
    check_ensemble_options,
    check_step_count,
    conversation,
)
from rm_server.core.results import Comparison, ModelIdentity, ModelInfo, Ranking, ScoreResult
from rm_server.errors import InvalidRequest

REDUCTIONS = {
    pb.ENSEMBLE_REDUCE_UNSPECIFIED: "mean",
    pb.ENSEMBLE_REDUCE_MEAN: "mean",
    pb.ENSEMBLE_REDUCE_MEAN_MINUS_K_STD: "mean_minus_k_std",
    pb.ENSEMBLE_REDUCE_MIN: "min",
}
STEP_REDUCTIONS = {
    pb.STEP_REDUCE_UNSPECIFIED: "min",
    pb.STEP_REDUCE_MIN: "min",
    pb.STEP_REDUCE_LAST: "last",
    pb.STEP_REDUCE_PRODUCT: "product",
    pb.STEP_REDUCE_MEAN: "mean",
}


def sample_from_pb(index: int, sample: pb.Sample) -> SampleInput:
    kind = sample.WhichOneof("input")
    if kind == "text":  # an empty response is scored: a policy may answer with EOS alone
        return Sample.from_text(sample.text.prompt, sample.text.response)
    if kind == "conversation":
        messages = sample.conversation.messages
        try:
            check_conversation_length(len(messages))  # counted on the wire message, before converting any
            return conversation([Message(m.role, m.content) for m in messages])
        except InvalidRequest as e:
            raise InvalidRequest(f"sample {index}: {e}") from None
    if kind == "tokens":
        return TokenInput(tuple(sample.tokens.ids))
    if kind == "steps":
        try:
            check_step_count(len(sample.steps.steps))
        except InvalidRequest as e:
            raise InvalidRequest(f"sample {index}: {e}") from None
        return Sample.from_steps(sample.steps.prompt, sample.steps.steps)
    raise InvalidRequest(f"sample {index}: no input; set one of text, conversation, tokens or steps")


def score_request(request: pb.ScoreRequest, limits: Limits) -> ScoreRequest:
    """The domain request; options are checked first, then the sample count on the wire message, before any
    sample is converted."""
    if request.truncation not in pb.TruncationPolicy.values():  # a newer client's value: not silently ignored
        raise InvalidRequest(f"unknown truncation {request.truncation}")
    if request.ensemble_reduce not in REDUCTIONS:
        raise InvalidRequest(f"unknown ensemble_reduce {request.ensemble_reduce}")
    if request.step_reduce not in STEP_REDUCTIONS:
        raise InvalidRequest(f"unknown step_reduce {request.step_reduce}")
    reduce, k = REDUCTIONS[request.ensemble_reduce], request.ensemble_k or 1.0  # k 0: unset
    check_ensemble_options(reduce, k)
    limits.check_count(len(request.samples))
    return ScoreRequest(
        samples=[sample_from_pb(i, s) for i, s in enumerate(request.samples)],
        model=request.model,
        version=request.model_version,
        normalize=request.normalize,
        strict=request.truncation == pb.TRUNCATION_POLICY_STRICT,
        ensemble_reduce=reduce,
        ensemble_k=k,
        step_reduce=STEP_REDUCTIONS[request.step_reduce],
    )


def _scored_by(model: ModelIdentity) -> dict[str, str]:
    """The model identity fields every reward-carrying answer has."""
    return {"model_name": model.name, "model_version": model.version, "model_sha256": model.sha256}


def score_response(request_id: str, result: ScoreResult) -> pb.ScoreResponse:
    t = result.timing
    return pb.ScoreResponse(
        request_id=request_id,
        results=[
            pb.SampleResult(
                reward=r.reward,
                num_tokens=r.num_tokens,
                truncated=r.truncated,
                ensemble=None
                if r.ensemble is None
                else pb.EnsembleStats(
                    mean=r.ensemble.mean, std=r.ensemble.std, min=r.ensemble.min, members=r.ensemble.members
                ),
                step_rewards=r.step_rewards or (),
                step_positions=r.step_positions or (),
            )
            for r in result.results
        ],
        **_scored_by(result.model),
        timing=pb.Timing(
            queue_ms=t.queue_ms, tokenization_ms=t.tokenization_ms, inference_ms=t.inference_ms, total_ms=t.total_ms
        ),
        normalized=result.normalized,
    )


def compare_response(comparison: Comparison) -> pb.CompareResponse:
    return pb.CompareResponse(
        probability_a_preferred=comparison.probability_a_preferred,
        reward_a=comparison.reward_a,
        reward_b=comparison.reward_b,
        **_scored_by(comparison.model),
    )


def rank_response(ranking: Ranking) -> pb.RankResponse:
    return pb.RankResponse(
        order=ranking.order,
        rewards=ranking.rewards,
        **_scored_by(ranking.model),
    )


def model_info_response(info: ModelInfo) -> pb.ModelInfo:
    loaded = [
        pb.LoadedModel(
            name=m.name,
            version=m.version,
            is_default_version=m.serving,
            is_default_model=m.is_default_model,
            members=m.members,
            model_sha256=m.sha256,
        )
        for m in info.held
    ]
    if info.manifest is None:  # an ensemble
        return pb.ModelInfo(name=info.name, version=info.version, pooling=info.pooling, loaded=loaded)
    normalization = info.normalization or {}
    return pb.ModelInfo(
        name=info.name,
        version=info.version,
        max_length=info.max_length,
        pooling=info.pooling,
        normalization=pb.NormalizationStats(
            mean=normalization.get("mean", 0.0),
            std=normalization.get("std", 1.0),
            size=normalization.get("size", 0),
            description=normalization.get("description", ""),
        ),
        dtype=info.variant,
        max_samples_per_request=info.max_samples_per_request,
        bundle_json=json.dumps(info.manifest),
        loaded=loaded,
        model_sha256=info.sha256,
        output_kind=info.manifest.get("output_kind", "sequence"),
        step_token=info.manifest["recipe"].get("step_token") or "",
    )
