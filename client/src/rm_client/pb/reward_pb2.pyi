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
TRUNCATION_POLICY_UNSPECIFIED: TruncationPolicy
TRUNCATION_POLICY_TRUNCATE: TruncationPolicy
TRUNCATION_POLICY_STRICT: TruncationPolicy

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

class Sample(_message.Message):
    __slots__ = ("text", "conversation", "tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: TextPair
    conversation: Conversation
    tokens: TokenIds
    def __init__(self, text: _Optional[_Union[TextPair, _Mapping]] = ..., conversation: _Optional[_Union[Conversation, _Mapping]] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "samples", "normalize", "truncation")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    normalize: bool
    truncation: TruncationPolicy
    def __init__(self, request_id: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., normalize: _Optional[bool] = ..., truncation: _Optional[_Union[TruncationPolicy, str]] = ...) -> None: ...

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
    __slots__ = ("reward", "num_tokens", "truncated")
    REWARD_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    reward: float
    num_tokens: int
    truncated: bool
    def __init__(self, reward: _Optional[float] = ..., num_tokens: _Optional[int] = ..., truncated: _Optional[bool] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "results", "model_name", "model_version", "timing", "normalized", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[SampleResult]
    model_name: str
    model_version: str
    timing: Timing
    normalized: bool
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[SampleResult, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., normalized: _Optional[bool] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("prompt", "response_a", "response_b")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_A_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_B_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    response_a: str
    response_b: str
    def __init__(self, prompt: _Optional[str] = ..., response_a: _Optional[str] = ..., response_b: _Optional[str] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("probability_a_preferred", "reward_a", "reward_b", "model_name", "model_version")
    PROBABILITY_A_PREFERRED_FIELD_NUMBER: _ClassVar[int]
    REWARD_A_FIELD_NUMBER: _ClassVar[int]
    REWARD_B_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    probability_a_preferred: float
    reward_a: float
    reward_b: float
    model_name: str
    model_version: str
    def __init__(self, probability_a_preferred: _Optional[float] = ..., reward_a: _Optional[float] = ..., reward_b: _Optional[float] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("prompt", "responses")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    responses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., responses: _Optional[_Iterable[str]] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("order", "rewards", "model_name", "model_version")
    ORDER_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    order: _containers.RepeatedScalarFieldContainer[int]
    rewards: _containers.RepeatedScalarFieldContainer[float]
    model_name: str
    model_version: str
    def __init__(self, order: _Optional[_Iterable[int]] = ..., rewards: _Optional[_Iterable[float]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

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
    __slots__ = ("name", "version", "max_length", "pooling", "normalization", "dtype", "max_samples_per_request", "bundle_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    max_length: int
    pooling: str
    normalization: NormalizationStats
    dtype: str
    max_samples_per_request: int
    bundle_json: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., max_length: _Optional[int] = ..., pooling: _Optional[str] = ..., normalization: _Optional[_Union[NormalizationStats, _Mapping]] = ..., dtype: _Optional[str] = ..., max_samples_per_request: _Optional[int] = ..., bundle_json: _Optional[str] = ...) -> None: ...
