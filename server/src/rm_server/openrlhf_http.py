"""OpenRLHF's remote reward protocol on an optional HTTP port, backed by the same batcher as gRPC.

OpenRLHF (`--reward.remote_url http://HOST:PORT/get_reward`; `--remote_rm_url` before 0.10.2) posts
`{"query": [...], "prompts": [...], "labels": [...]}` where each query is the prompt followed by the
generated response (one query per call since OpenRLHF's agent executor; with several URLs, the others get
empty lists); the answer is `{"rewards": [...], "scores": [...], "extra_logs": {...}, "reward_model":
{name, version, sha256}}`, one entry per query, with the same model in an `X-Reward-Model` header. The response is what
follows the prompt in its query; the bundle's input recipe then formats (prompt, response) exactly as for
gRPC, so send raw prompts (no chat template applied on the OpenRLHF side) to chat-template bundles.
With a bearer token configured, requests need `Authorization: Bearer <token>` (401 otherwise).
Errors: 400 for bad input, 503 (with Retry-After) when the queue is full or the server is not ready,
500 for an inference failure; the body is `{"error": message, "code": gRPC status name}`.
"""

from __future__ import annotations

import grpc
from aiohttp import web

from rm_contract.recipe import Sample
from rm_server.errors import InvalidRequest
from rm_server.http_body import BodyError, json_body
from rm_server.models import ModelIdentity
from rm_server.scoring import Limits
from rm_server.security import authorized
from rm_server.service import RewardService, new_request_id

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
}
PATH = "/get_reward"


def split_queries(body: object, limits: Limits) -> list[Sample]:
    """(prompt, response) per query; every problem names the field and the index. The count is checked
    first, before any per-query work."""
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object with 'query' and 'prompts' lists")
    queries, prompts = body.get("query"), body.get("prompts")
    bad_queries = InvalidRequest("'query' must be a list of strings (prompt followed by response)")
    bad_prompts = InvalidRequest("'prompts' must be a list of strings, one per query (needed to find each response)")
    if not isinstance(queries, list):
        raise bad_queries
    if not isinstance(prompts, list):
        raise bad_prompts
    if len(prompts) != len(queries):
        raise InvalidRequest(f"{len(queries)} queries but {len(prompts)} prompts")
    if queries:
        limits.check_count(len(queries))
    if not all(isinstance(q, str) for q in queries):
        raise bad_queries
    if not all(isinstance(p, str) for p in prompts):
        raise bad_prompts
    samples = []
    for i, (query, prompt) in enumerate(zip(queries, prompts)):
        if not query.startswith(prompt):
            raise InvalidRequest(f"query {i} does not start with prompts[{i}]")
        if len(query) == len(prompt):
            raise InvalidRequest(f"query {i} has no response after its prompt")
        samples.append(Sample.from_text(prompt, query[len(prompt) :]))
    return samples


def add_routes(app: web.Application, service: RewardService, token: str | None) -> None:
    app.router.add_post(PATH, OpenRLHFRoute(service, token).get_reward)


class OpenRLHFRoute:
    def __init__(self, service: RewardService, token: str | None):
        self.service, self.token = service, token

    async def get_reward(self, request: web.Request) -> web.Response:
        request_id = request.headers.get("x-request-id") or new_request_id()
        if not authorized(request.headers, self.token):
            body = {"error": "missing or invalid bearer token (Authorization header)", "code": "UNAUTHENTICATED"}
            return web.json_response(body, status=401, headers={"WWW-Authenticate": "Bearer"})
        try:
            body = await json_body(request)
        except BodyError as e:
            return web.json_response({"error": str(e), "code": "INVALID_ARGUMENT"}, status=e.status)
        code, result = await self.service.answer("OpenRLHF", request_id, self._score(body))
        if code != grpc.StatusCode.OK:
            status = HTTP_STATUS.get(code, 500)
            headers = {"Retry-After": "1"} if status == 503 else None
            return web.json_response({"error": result, "code": code.name}, status=status, headers=headers)
        body, model = result
        return web.json_response(body, headers=model.http_headers if model else None)

    async def _score(self, body: object) -> tuple[dict, ModelIdentity | None]:
        samples = split_queries(body, self.service.registry.settings.limits)
        if not samples:  # OpenRLHF sends empty lists to all but the first of several URLs
            return {"rewards": [], "scores": [], "extra_logs": {}}, None
        scored = await self.service.rewards_of(samples)  # the default model
        body = {
            "rewards": scored.rewards,
            "scores": scored.rewards,
            "extra_logs": {"num_tokens": scored.num_tokens},
            "reward_model": scored.model.as_dict(),
        }
        return body, scored.model
