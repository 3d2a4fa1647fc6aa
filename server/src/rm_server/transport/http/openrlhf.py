"""OpenRLHF's remote reward protocol on the HTTP port, answered through the inference core.

OpenRLHF (`--reward.remote_url http://HOST:PORT/get_reward`; `--remote_rm_url` before 0.10.2) posts
`{"query": [...], "prompts": [...], "labels": [...]}` where each query is the prompt followed by the
generated response (one query per call since OpenRLHF's agent executor; with several URLs, the others get
empty lists); the answer is `{"rewards": [...], "scores": [...], "extra_logs": {...}, "reward_model":
{name, version, sha256}}`, one entry per query, with the same model in an `X-Reward-Model` header. The
response is what follows the prompt in its query (an empty response is scored, as on gRPC: one empty
generation must not fail a training step); the bundle's input recipe then formats (prompt, response)
exactly as for gRPC, so send raw prompts (no chat template applied on the OpenRLHF side) to chat-template
bundles. With a bearer token configured, requests need `Authorization: Bearer <token>` (401 otherwise).
Errors: 400 for bad input, 404 for a model not loaded, 503 (with Retry-After) when the queue is full or the
server is not ready, 500 for an inference failure; the body is `{"error": message, "code": status name}`.
"""

from __future__ import annotations

from aiohttp import web

from rm_contract.recipe import Sample
from rm_server import errors
from rm_server.core.inference import Inference, new_request_id
from rm_server.core.inputs import Limits, ScoreRequest
from rm_server.core.results import ModelIdentity
from rm_server.transport.http.body import BodyError, json_body
from rm_server.transport.http.identity import model_headers
from rm_server.transport.http.status import http_status

PATH = "/get_reward"


def error_response(status: int, message: str, code: str | None = None) -> web.Response:
    code = code or ("UNAUTHENTICATED" if status == 401 else "INVALID_ARGUMENT")  # refusals before scoring
    headers = {"Retry-After": "1"} if status == 503 else None
    return web.json_response({"error": message, "code": code}, status=status, headers=headers)


def split_queries(body: object, limits: Limits) -> list[Sample]:
    """(prompt, response) per query; every problem names the field and the index. The count is checked
    first, before any per-query work."""
    if not isinstance(body, dict):
        raise errors.InvalidRequest("body must be a JSON object with 'query' and 'prompts' lists")
    queries, prompts = body.get("query"), body.get("prompts")
    bad_queries = errors.InvalidRequest("'query' must be a list of strings (prompt followed by response)")
    bad_prompts = errors.InvalidRequest(
        "'prompts' must be a list of strings, one per query (needed to find each response)"
    )
    if not isinstance(queries, list):
        raise bad_queries
    if not isinstance(prompts, list):
        raise bad_prompts
    if len(prompts) != len(queries):
        raise errors.InvalidRequest(f"{len(queries)} queries but {len(prompts)} prompts")
    if queries:
        limits.check_count(len(queries))
    if not all(isinstance(q, str) for q in queries):
        raise bad_queries
    if not all(isinstance(p, str) for p in prompts):
        raise bad_prompts
    samples = []
    for i, (query, prompt) in enumerate(zip(queries, prompts)):
        if not query.startswith(prompt):
            raise errors.InvalidRequest(f"query {i} does not start with prompts[{i}]")
        samples.append(Sample.from_text(prompt, query[len(prompt) :]))
    return samples


def add_routes(app: web.Application, inference: Inference) -> list[str]:
    app.router.add_post(PATH, OpenRLHFRoute(inference).get_reward)
    return [PATH]


class OpenRLHFRoute:
    def __init__(self, inference: Inference):
        self.inference = inference

    async def get_reward(self, request: web.Request) -> web.Response:
        request_id = request.headers.get("x-request-id") or new_request_id()
        try:
            body = await json_body(request)
        except BodyError as e:
            return error_response(e.status, str(e))
        try:
            answer = await self.inference.call("OpenRLHF", request_id, self._score(body))
        except errors.RewardServiceError as e:
            return error_response(http_status(e), str(e), e.status)
        scored_by = answer.get("reward_model")
        return web.json_response(answer, headers=model_headers(ModelIdentity(**scored_by)) if scored_by else None)

    async def _score(self, body: object) -> dict:
        samples = split_queries(body, self.inference.limits)
        if not samples:  # OpenRLHF sends empty lists to all but the first of several URLs
            return {"rewards": [], "scores": [], "extra_logs": {}}
        scored = await self.inference.score(ScoreRequest(samples))  # the default model
        return {
            "rewards": scored.rewards,
            "scores": scored.rewards,
            "extra_logs": {"num_tokens": scored.num_tokens},
            "reward_model": scored.model.as_dict(),
        }
