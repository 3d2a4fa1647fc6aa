"""vLLM's pooling API on the HTTP port, for a single-label reward model: what veRL's reward loop, per-sample
remote-reward callers and any vLLM client send, with vLLM's request, response and error shapes (upstream:
vllm/entrypoints/pooling/classify/protocol.py, pooling/pooling/protocol.py, openai/engine/protocol.py).

- `POST /classify`: `input` (a string, a list of strings, token ids or a list of token-id lists) or
  `messages` (one conversation ending with the assistant's response, encoded by the bundle's recipe as a
  gRPC Conversation is); `model` (optional: a loaded model's name), `use_activation` (false: the raw
  reward; true or absent, vLLM's default for one label: sigmoid(reward); the legacy `activation` is read
  too), `truncate_prompt_tokens` (absent: an input over the model's maximum is refused, as vLLM does; -1:
  cut to the maximum; k: keep the last k ids), `add_special_tokens`, `request_id`. Answer: `data[i].probs
  == [reward]`, `num_classes` 1.
- `POST /pooling`: the same inputs, task absent or "classify"; `data[i].data == [reward]`. A process reward
  model answers task "token_classify" as vLLM's STEP pooling does, the bundle fixing what vLLM's
  `step_tag_id` and `returned_token_ids` fix at server start: `data[i].data` holds one row per step token of
  the input (every one it holds, the prompt's too), its class probabilities ([P(wrong), P(correct)] for
  TRL's two labels); without a task too, as vLLM answers a token classifier. With task "classify" (and on
  /classify) it answers the weakest step's P(correct).
- `GET /v1/models`: the models served, with their max length and identity; `GET /health`: 200 once ready.

A text input is the model's whole input, tokenized as it is (`SampleEncoder.encode_text`: a conversation
rendered by the bundle's chat template, with or without its BOS, gets the ids of the same `messages`).
Every answer names the model in `reward_model` and in an `X-Reward-Model` header. Errors are vLLM's
(>= 0.10.1) `{"error": {"message", "type", "param", "code"}}`: 400 BadRequestError, 401 (bearer token),
404 NotFoundError (model), 503 ServiceUnavailableError with Retry-After (queue full, not ready), 500.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from aiohttp import web

from rm_contract.recipe import Message, Sample, TextInput
from rm_server import errors
from rm_server.core.inference import Inference, new_request_id
from rm_server.core.inputs import Limits, SampleInput, ScoreRequest, TokenInput, check_conversation_length, conversation
from rm_server.core.results import ScoreResult
from rm_server.core.scoring import sigmoid
from rm_server.errors import InvalidRequest
from rm_server.transport.http.body import BodyError, json_body
from rm_server.transport.http.identity import model_headers
from rm_server.transport.http.status import http_status

ERROR_TYPES = {  # HTTP status -> vLLM's error type
    400: "BadRequestError",
    401: "Unauthorized",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    413: "BadRequestError",
    415: "BadRequestError",
    503: "ServiceUnavailableError",
}
INPUT_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


def bad_field(param: str, message: str) -> InvalidRequest:
    """Bad input in one named field (vLLM's `param`)."""
    return InvalidRequest(message, field=param)


@dataclass(frozen=True)
class PoolingRequest:
    model: str
    inputs: list[SampleInput]
    use_activation: bool
    strict: bool
    max_tokens: int | None
    task: str | None = None
    kind: str = "sequence"
    """The model's output kind (`Inference.output_kind`), known before any work."""
    step_classes: int = 1
    """A process reward model's classes (2: TRL's softmax pair), for its token_classify rows."""


def add_routes(app: web.Application, inference: Inference) -> list[str]:
    routes = VllmRoutes(inference)
    app.router.add_post("/classify", routes.classify)
    app.router.add_post("/pooling", routes.pooling)
    app.router.add_get("/v1/models", routes.models)
    app.router.add_get("/health", routes.health)
    return ["/classify", "/pooling", "/v1/models", "/health"]


def error_response(status: int, message: str, kind: str | None = None, param: str | None = None) -> web.Response:
    kind = kind or ERROR_TYPES.get(status, "InternalServerError")
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status, headers={"Retry-After": "1"} if status == 503 else None)


class VllmRoutes:
    def __init__(self, inference: Inference):
        self.inference = inference
        self.created = int(time.time())

    async def classify(self, request: web.Request) -> web.Response:
        return await self._score(request, "Classify", classify_body)

    async def pooling(self, request: web.Request) -> web.Response:
        return await self._score(request, "Pooling", pooling_body)

    async def _score(self, request: web.Request, method: str, answer: Callable[..., dict]) -> web.Response:
        try:
            body = await json_body(request)
        except BodyError as e:
            return error_response(e.status, str(e))
        request_id = request.headers.get("X-Request-Id") or _request_id_of(body)
        parsed = None

        async def work() -> ScoreResult:
            nonlocal parsed
            parsed = parse_request(body, self.inference.limits, pooling=method == "Pooling")
            kind, classes = self.inference.output_kind(parsed.model)
            check_task(parsed, kind)
            task = parsed.task or ("token_classify" if kind == "steps" and method == "Pooling" else None)
            parsed = replace(parsed, kind=kind, step_classes=classes, task=task)
            score = ScoreRequest(parsed.inputs, parsed.model, strict=parsed.strict, max_tokens=parsed.max_tokens)
            return await self.inference.score(score)

        try:
            result = await self.inference.call(method, request_id, work())
        except errors.RewardServiceError as e:
            return error_response(http_status(e), str(e), param=_param_of(e, body))
        return web.json_response(answer(request_id, parsed, result), headers=model_headers(result.model))

    async def models(self, request: web.Request) -> web.Response:
        cards = [  # one card per name a request may give, as vLLM lists each --served-model-name
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "rewardserve",
                "root": m.name,
                "parent": None,
                "max_model_len": m.max_length,
                "permission": [],
                "reward_model": {"name": m.name, "version": m.version, "sha256": m.sha256},
            }
            for m in self.inference.served_models()
            for name in (m.name, *m.aliases)
        ]
        return web.json_response({"object": "list", "data": cards})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.inference.ready else 503)


def _param_of(error: errors.RewardServiceError, body: object) -> str | None:
    """vLLM's `param`: the field an error is about."""
    if isinstance(error, errors.ModelNotFound):
        return "model"
    if not isinstance(error, InvalidRequest):
        return None
    if error.field is not None:
        return error.field
    if str(error).startswith("truncate_prompt_tokens"):
        return "truncate_prompt_tokens"
    fields = ("input", "messages") if isinstance(body, dict) else ()  # found while scoring: the samples
    return next((f for f in fields if f in body), None)


def _request_id_of(body: object) -> str:
    given = body.get("request_id") if isinstance(body, dict) else None
    return given if isinstance(given, str) and given else new_request_id()


def parse_request(body: object, limits: Limits, pooling: bool = False) -> PoolingRequest:
    """vLLM's ClassificationRequest (or PoolingRequest) as scoring inputs; every problem names its field.
    Counts are checked before any per-sample work."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object (vLLM's ClassificationRequest)")
    model = body.get("model")
    model = "" if model is None else model
    if not isinstance(model, str):
        raise bad_field("model", "'model' must be a string: the name of a loaded model (GET /v1/models)")
    if pooling:
        _check_pooling_options(body)
    add_special_tokens = body.get("add_special_tokens")
    if add_special_tokens is not None and not isinstance(add_special_tokens, bool):
        raise bad_field("add_special_tokens", "'add_special_tokens' must be true or false")
    has_input, has_messages = body.get("input") is not None, body.get("messages") is not None
    if has_input == has_messages:
        raise InvalidRequest("send exactly one of 'input' and 'messages'")
    if has_input:
        inputs = _inputs(body["input"], limits, add_special_tokens)
    else:
        _check_chat_options(body)
        inputs = [_conversation(body["messages"])]
    strict, max_tokens = _truncation(body)
    return PoolingRequest(model, inputs, _use_activation(body), strict, max_tokens, body.get("task"))


def check_task(request: PoolingRequest, kind: str) -> None:
    """A task the model's output kind can answer: token_classify for a process reward model only, whose
    scores are probabilities already (no raw value for `use_activation: false`)."""
    if request.task == "token_classify" and kind != "steps":
        raise bad_field("task", "Task token_classify is not supported: this reward model gives one score per sequence")
    if kind == "steps" and not request.use_activation:
        raise bad_field(
            "use_activation", "'use_activation': false is not supported: this process reward model gives probabilities"
        )


def _inputs(value: object, limits: Limits, add_special_tokens: bool | None) -> list[SampleInput]:
    if isinstance(value, str):
        return [_text(0, value, add_special_tokens)]
    if not isinstance(value, list) or not value:
        raise bad_field("input", f"'input' must be {INPUT_SHAPES} (not empty)")
    if _is_int(value[0]):  # one token-id sequence
        return [TokenInput(_token_ids(0, value, limits))]
    limits.check_count(len(value))
    if all(isinstance(v, str) for v in value):
        return [_text(i, v, add_special_tokens) for i, v in enumerate(value)]
    if all(isinstance(v, list) for v in value):
        return [TokenInput(_token_ids(i, v, limits)) for i, v in enumerate(value)]
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise bad_field("input", "input 0: token ids must be integers >= 0")
    raise bad_field("input", f"'input' must be {INPUT_SHAPES}; this list mixes kinds")


def _text(index: int, text: str, add_special_tokens: bool | None) -> TextInput:
    if not text:
        raise bad_field("input", f"input {index}: empty text")
    return TextInput(text, add_special_tokens)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(index: int, ids: list, limits: Limits) -> tuple[int, ...]:
    if not ids:
        raise bad_field("input", f"input {index}: empty token ids")
    if len(ids) > limits.max_chars_per_sample:  # before looking at each one, on the event loop
        raise bad_field("input", f"input {index}: {len(ids)} token ids; at most {limits.max_chars_per_sample}")
    if not all(_is_int(t) and t >= 0 for t in ids):
        raise bad_field("input", f"input {index}: token ids must be integers >= 0")
    return tuple(ids)


def _conversation(messages: object) -> Sample:
    if not isinstance(messages, list) or not messages:
        raise bad_field("messages", "'messages' must be a non-empty list of {role, content} objects")
    try:
        check_conversation_length(len(messages))  # before looking at each one
        return conversation([_message(i, m) for i, m in enumerate(messages)])
    except InvalidRequest as e:
        raise bad_field("messages", str(e)) from None


def _message(index: int, message: object) -> Message:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise bad_field("messages", f"message {index}: must be an object with a string 'role' and a 'content'")
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts: only text can be scored
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise bad_field("messages", f"message {index}: only text content parts are supported")
        content = "\n".join(p["text"] for p in content)  # as vLLM joins text parts
    if not isinstance(content, str):
        raise bad_field("messages", f"message {index}: 'content' must be a string or a list of text parts")
    return Message(message["role"], content)


def _check_chat_options(body: dict) -> None:
    """The conversation is scored as the model was trained: with the bundle's own template, ending after
    the assistant's response."""
    for flag in ("add_generation_prompt", "continue_final_message"):
        if body.get(flag):
            raise bad_field(flag, f"'{flag}' is not supported: a reward is read after the assistant's response")
    for field in ("chat_template", "chat_template_kwargs"):
        if body.get(field):
            raise bad_field(field, f"'{field}' is not supported: the bundle's chat template (from training) is used")


def _check_pooling_options(body: dict) -> None:
    task = body.get("task")
    if task not in (None, "classify", "token_classify"):
        raise bad_field("task", f"Task {task} is not supported: tasks are 'classify' and 'token_classify'")
    if body.get("dimensions") is not None:
        raise bad_field("dimensions", "dimensions is currently not supported")
    if body.get("encoding_format") not in (None, "float"):
        raise bad_field("encoding_format", "only encoding_format 'float' is supported")


def _truncation(body: dict) -> tuple[bool, int | None]:
    """(strict, max_tokens) from truncate_prompt_tokens: absent refuses over-long inputs, -1 cuts them to the
    model's maximum, k keeps the last k ids (a reward model reads its score at the end)."""
    side = body.get("truncation_side")
    if side not in (None, "left"):
        raise bad_field(
            "truncation_side",
            "only truncation_side 'left' is supported: the end of an input, where a reward model "
            "reads its score, is kept",
        )
    k = body.get("truncate_prompt_tokens")
    if k is None:
        return True, None
    if not _is_int(k) or k == 0 or k < -1:
        raise bad_field("truncate_prompt_tokens", "'truncate_prompt_tokens' must be -1 (the model's maximum) or >= 1")
    return False, None if k == -1 else k


def _use_activation(body: dict) -> bool:
    for field in ("use_activation", "activation", "softmax"):  # the last two: vLLM's older names
        value = body.get(field)
        if value is not None:
            if not isinstance(value, bool):
                raise bad_field(field, f"'{field}' must be true or false")
            return value
    return True


def _values(request: PoolingRequest, rewards: ScoreResult) -> list[float]:
    if request.kind == "steps":  # probabilities already
        return rewards.rewards
    return [sigmoid(r) if request.use_activation else r for r in rewards.rewards]


def _envelope(prefix: str, request_id: str, rewards: ScoreResult, data: list[dict]) -> dict:
    tokens = sum(rewards.num_tokens)
    return {
        "id": f"{prefix}-{request_id}",
        "object": "list",
        "created": int(time.time()),
        "model": rewards.model.name,
        "data": data,
        "usage": {
            "prompt_tokens": tokens,
            "total_tokens": tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        },
        "reward_model": rewards.model.as_dict(),
    }


def classify_body(request_id: str, request: PoolingRequest, rewards: ScoreResult) -> dict:
    data = [
        {"index": i, "label": None, "probs": [value], "num_classes": 1}
        for i, value in enumerate(_values(request, rewards))
    ]
    return _envelope("classify", request_id, rewards, data)


def pooling_body(request_id: str, request: PoolingRequest, rewards: ScoreResult) -> dict:
    if request.task == "token_classify":
        rows = [step_rows(r.step_rewards or (), request.step_classes) for r in rewards.results]
        data = [{"index": i, "object": "pooling", "data": row} for i, row in enumerate(rows)]
    else:
        data = [{"index": i, "object": "pooling", "data": [v]} for i, v in enumerate(_values(request, rewards))]
    return _envelope("pool", request_id, rewards, data)


def step_rows(scores: tuple[float, ...], classes: int = 2) -> list[list[float]]:
    """vLLM STEP pooling's rows: per step, the class probabilities ([P(wrong), P(correct)] for two labels)."""
    return [[1.0 - p, p] if classes == 2 else [p] for p in scores]
