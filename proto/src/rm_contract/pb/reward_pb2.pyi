from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TruncationPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATION_POLICY_UNSPECIFIED: _ClassVar[TruncationPolicy]
    TRUNCATION_POLICY_TRUNCATE: _ClassVar[TruncationPolicy]
    TRUNCATION_POLICY_STRICT: _ClassVar[TruncationPolicy]

class StepReduce(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_REDUCE_UNSPECIFIED: _ClassVar[StepReduce]
    STEP_REDUCE_MIN: _ClassVar[StepReduce]
    STEP_REDUCE_LAST: _ClassVar[StepReduce]
    STEP_REDUCE_PRODUCT: _ClassVar[StepReduce]
    STEP_REDUCE_MEAN: _ClassVar[StepReduce]

class EnsembleReduce(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENSEMBLE_REDUCE_UNSPECIFIED: _ClassVar[EnsembleReduce]
    ENSEMBLE_REDUCE_MEAN: _ClassVar[EnsembleReduce]
    ENSEMBLE_REDUCE_MEAN_MINUS_K_STD: _ClassVar[EnsembleReduce]
    ENSEMBLE_REDUCE_MIN: _ClassVar[EnsembleReduce]
TRUNCATION_POLICY_UNSPECIFIED: TruncationPolicy
TRUNCATION_POLICY_TRUNCATE: TruncationPolicy
TRUNCATION_POLICY_STRICT: TruncationPolicy
STEP_REDUCE_UNSPECIFIED: StepReduce
STEP_REDUCE_MIN: StepReduce
STEP_REDUCE_LAST: StepReduce
STEP_REDUCE_PRODUCT: StepReduce
STEP_REDUCE_MEAN: StepReduce
ENSEMBLE_REDUCE_UNSPECIFIED: EnsembleReduce
ENSEMBLE_REDUCE_MEAN: EnsembleReduce
ENSEMBLE_REDUCE_MEAN_MINUS_K_STD: EnsembleReduce
ENSEMBLE_REDUCE_MIN: EnsembleReduce

class Message(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class TextPair(_message.Message):
    __slots__ = ("prompt", "response")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    response: str
    def __init__(self, prompt: _Optional[str] = ..., response: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    def __init__(self, messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Steps(_message.Message):
    __slots__ = ("prompt", "steps")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    steps: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., steps: _Optional[_Iterable[str]] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("text", "conversation", "tokens", "steps")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    text: TextPair
    conversation: Conversation
    tokens: TokenIds
    steps: Steps
    def __init__(self, text: _Optional[_Union[TextPair, _Mapping]] = ..., conversation: _Optional[_Union[Conversation, _Mapping]] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., steps: _Optional[_Union[Steps, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "samples", "normalize", "truncation", "model", "model_version", "ensemble_reduce", "ensemble_k", "step_reduce")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_REDUCE_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_K_FIELD_NUMBER: _ClassVar[int]
    STEP_REDUCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    normalize: bool
    truncation: TruncationPolicy
    model: str
    model_version: str
    ensemble_reduce: EnsembleReduce
    ensemble_k: float
    step_reduce: StepReduce
    def __init__(self, request_id: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., normalize: _Optional[bool] = ..., truncation: _Optional[_Union[TruncationPolicy, str]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., ensemble_reduce: _Optional[_Union[EnsembleReduce, str]] = ..., ensemble_k: _Optional[float] = ..., step_reduce: _Optional[_Union[StepReduce, str]] = ...) -> None: ...

class EnsembleStats(_message.Message):
    __slots__ = ("mean", "std", "min", "members")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    mean: float
    std: float
    min: float
    members: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, mean: _Optional[float] = ..., std: _Optional[float] = ..., min: _Optional[float] = ..., members: _Optional[_Iterable[float]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "tokenization_ms", "inference_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZATION_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    tokenization_ms: float
    inference_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., tokenization_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class SampleResult(_message.Message):
    __slots__ = ("reward", "num_tokens", "truncated", "ensemble", "step_rewards", "step_positions")
    REWARD_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_FIELD_NUMBER: _ClassVar[int]
    STEP_REWARDS_FIELD_NUMBER: _ClassVar[int]
    STEP_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    reward: float
    num_tokens: int
    truncated: bool
    ensemble: EnsembleStats
    step_rewards: _containers.RepeatedScalarFieldContainer[float]
    step_positions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, reward: _Optional[float] = ..., num_tokens: _Optional[int] = ..., truncated: _Optional[bool] = ..., ensemble: _Optional[_Union[EnsembleStats, _Mapping]] = ..., step_rewards: _Optional[_Iterable[float]] = ..., step_positions: _Optional[_Iterable[int]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "results", "model_name", "model_version", "timing", "normalized", "error", "model_sha256")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[SampleResult]
    model_name: str
    model_version: str
    timing: Timing
    normalized: bool
    error: Error
    model_sha256: str
    def __init__(self, request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[SampleResult, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., normalized: _Optional[bool] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., model_sha256: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("prompt", "response_a", "response_b", "model", "model_version")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_A_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_B_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    response_a: str
    response_b: str
    model: str
    model_version: str
    def __init__(self, prompt: _Optional[str] = ..., response_a: _Optional[str] = ..., response_b: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("probability_a_preferred", "reward_a", "reward_b", "model_name", "model_version", "model_sha256")
    PROBABILITY_A_PREFERRED_FIELD_NUMBER: _ClassVar[int]
    REWARD_A_FIELD_NUMBER: _ClassVar[int]
    REWARD_B_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    probability_a_preferred: float
    reward_a: float
    reward_b: float
    model_name: str
    model_version: str
    model_sha256: str
    def __init__(self, probability_a_preferred: _Optional[float] = ..., reward_a: _Optional[float] = ..., reward_b: _Optional[float] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., model_sha256: _Optional[str] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("prompt", "responses", "model", "model_version")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    responses: _containers.RepeatedScalarFieldContainer[str]
    model: str
    model_version: str
    def __init__(self, prompt: _Optional[str] = ..., responses: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("order", "rewards", "model_name", "model_version", "model_sha256")
    ORDER_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    order: _containers.RepeatedScalarFieldContainer[int]
    rewards: _containers.RepeatedScalarFieldContainer[float]
    model_name: str
    model_version: str
    model_sha256: str
    def __init__(self, order: _Optional[_Iterable[int]] = ..., rewards: _Optional[_Iterable[float]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., model_sha256: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class NormalizationStats(_message.Message):
    __slots__ = ("mean", "std", "size", "description")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    mean: float
    std: float
    size: int
    description: str
    def __init__(self, mean: _Optional[float] = ..., std: _Optional[float] = ..., size: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "max_length", "pooling", "normalization", "dtype", "max_samples_per_request", "bundle_json", "loaded", "model_sha256", "output_kind", "step_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_JSON_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    max_length: int
    pooling: str
    normalization: NormalizationStats
    dtype: str
    max_samples_per_request: int
    bundle_json: str
    loaded: _containers.RepeatedCompositeFieldContainer[LoadedModel]
    model_sha256: str
    output_kind: str
    step_token: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., max_length: _Optional[int] = ..., pooling: _Optional[str] = ..., normalization: _Optional[_Union[NormalizationStats, _Mapping]] = ..., dtype: _Optional[str] = ..., max_samples_per_request: _Optional[int] = ..., bundle_json: _Optional[str] = ..., loaded: _Optional[_Iterable[_Union[LoadedModel, _Mapping]]] = ..., model_sha256: _Optional[str] = ..., output_kind: _Optional[str] = ..., step_token: _Optional[str] = ...) -> None: ...

class LoadedModel(_message.Message):
    __slots__ = ("name", "version", "is_default_version", "is_default_model", "members", "model_sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    is_default_version: bool
    is_default_model: bool
    members: _containers.RepeatedScalarFieldContainer[str]
    model_sha256: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., is_default_version: _Optional[bool] = ..., is_default_model: _Optional[bool] = ..., members: _Optional[_Iterable[str]] = ..., model_sha256: _Optional[str] = ...) -> None: ...

class ReloadModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadModelsResponse(_message.Message):
    __slots__ = ("loaded", "unloaded", "rejected")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    loaded: _containers.RepeatedScalarFieldContainer[str]
    unloaded: _containers.RepeatedScalarFieldContainer[str]
    rejected: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, loaded: _Optional[_Iterable[str]] = ..., unloaded: _Optional[_Iterable[str]] = ..., rejected: _Optional[_Iterable[str]] = ...) -> None: ...
