from fareway.inference.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt", "chat", "sampling", "cache_salt", "call_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt: str
    chat: _inference_pb2.ChatMessages
    sampling: _inference_pb2.SamplingParams
    cache_salt: str
    call_id: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., chat: _Optional[_Union[_inference_pb2.ChatMessages, _Mapping]] = ..., sampling: _Optional[_Union[_inference_pb2.SamplingParams, _Mapping]] = ..., cache_salt: _Optional[str] = ..., call_id: _Optional[str] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("call_id",)
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    def __init__(self, call_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("was_running",)
    WAS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    was_running: bool
    def __init__(self, was_running: _Optional[bool] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("call_id",)
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    def __init__(self, call_id: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("state", "response")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[GetRunResponse.State]
        STATE_UNKNOWN: _ClassVar[GetRunResponse.State]
        STATE_RUNNING: _ClassVar[GetRunResponse.State]
        STATE_FINISHED: _ClassVar[GetRunResponse.State]
    STATE_UNSPECIFIED: GetRunResponse.State
    STATE_UNKNOWN: GetRunResponse.State
    STATE_RUNNING: GetRunResponse.State
    STATE_FINISHED: GetRunResponse.State
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    state: GetRunResponse.State
    response: GenerateResponse
    def __init__(self, state: _Optional[_Union[GetRunResponse.State, str]] = ..., response: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "usage", "finish_reason", "stop_sequence", "index", "logprobs", "prompt_logprobs", "choices")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    usage: _inference_pb2.Usage
    finish_reason: _inference_pb2.FinishReason
    stop_sequence: str
    index: int
    logprobs: _containers.RepeatedCompositeFieldContainer[_inference_pb2.TokenLogprobs]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_inference_pb2.TokenLogprobs]
    choices: _containers.RepeatedCompositeFieldContainer[_inference_pb2.Choice]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., usage: _Optional[_Union[_inference_pb2.Usage, _Mapping]] = ..., finish_reason: _Optional[_Union[_inference_pb2.FinishReason, str]] = ..., stop_sequence: _Optional[str] = ..., index: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[_inference_pb2.TokenLogprobs, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_inference_pb2.TokenLogprobs, _Mapping]]] = ..., choices: _Optional[_Iterable[_Union[_inference_pb2.Choice, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("sequence_length",)
    SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    sequence_length: int
    def __init__(self, sequence_length: _Optional[int] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("worker_id", "model", "context_length", "vocab_size", "parameter_count", "weight_bytes", "compute_dtype", "hardware_class", "device_type", "device_count", "tensor_parallel_size", "kv_bytes_per_token", "kv_capacity_tokens", "kv_block_size", "kv_cache_bytes", "max_sequences_at_length", "prefix_caching", "max_num_seqs", "weight_dtype", "kv_cache_dtype", "linear_kernel", "execution", "execution_reason", "compile_seconds")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_CLASS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_COUNT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCES_AT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHING_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LINEAR_KERNEL_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_REASON_FIELD_NUMBER: _ClassVar[int]
    COMPILE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    model: str
    context_length: int
    vocab_size: int
    parameter_count: int
    weight_bytes: int
    compute_dtype: str
    hardware_class: str
    device_type: str
    device_count: int
    tensor_parallel_size: int
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    kv_block_size: int
    kv_cache_bytes: int
    max_sequences_at_length: int
    prefix_caching: bool
    max_num_seqs: int
    weight_dtype: str
    kv_cache_dtype: str
    linear_kernel: str
    execution: str
    execution_reason: str
    compile_seconds: float
    def __init__(self, worker_id: _Optional[str] = ..., model: _Optional[str] = ..., context_length: _Optional[int] = ..., vocab_size: _Optional[int] = ..., parameter_count: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., compute_dtype: _Optional[str] = ..., hardware_class: _Optional[str] = ..., device_type: _Optional[str] = ..., device_count: _Optional[int] = ..., tensor_parallel_size: _Optional[int] = ..., kv_bytes_per_token: _Optional[int] = ..., kv_capacity_tokens: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., max_sequences_at_length: _Optional[int] = ..., prefix_caching: _Optional[bool] = ..., max_num_seqs: _Optional[int] = ..., weight_dtype: _Optional[str] = ..., kv_cache_dtype: _Optional[str] = ..., linear_kernel: _Optional[str] = ..., execution: _Optional[str] = ..., execution_reason: _Optional[str] = ..., compile_seconds: _Optional[float] = ...) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLoadResponse(_message.Message):
    __slots__ = ("num_running", "num_waiting", "kv_tokens_used", "kv_tokens_capacity", "prefix_cache_hit_rate", "attributed_gpu_seconds", "idle_gpu_seconds", "kv_blocks_used", "kv_blocks_free", "kv_blocks_cached", "num_preemptions")
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTED_GPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDLE_GPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    num_running: int
    num_waiting: int
    kv_tokens_used: int
    kv_tokens_capacity: int
    prefix_cache_hit_rate: float
    attributed_gpu_seconds: float
    idle_gpu_seconds: float
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_cached: int
    num_preemptions: int
    def __init__(self, num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., kv_tokens_used: _Optional[int] = ..., kv_tokens_capacity: _Optional[int] = ..., prefix_cache_hit_rate: _Optional[float] = ..., attributed_gpu_seconds: _Optional[float] = ..., idle_gpu_seconds: _Optional[float] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., kv_blocks_cached: _Optional[int] = ..., num_preemptions: _Optional[int] = ...) -> None: ...

class CountTokensRequest(_message.Message):
    __slots__ = ("model", "prompt", "chat")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    chat: _inference_pb2.ChatMessages
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., chat: _Optional[_Union[_inference_pb2.ChatMessages, _Mapping]] = ...) -> None: ...

class CountTokensResponse(_message.Message):
    __slots__ = ("prompt_tokens", "context_length")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    context_length: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., context_length: _Optional[int] = ...) -> None: ...
