from rlhf.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainKey(_message.Message):
    __slots__ = ("run_id", "step", "minibatch_index", "secret")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MINIBATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    minibatch_index: int
    secret: str
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., minibatch_index: _Optional[int] = ..., secret: _Optional[str] = ...) -> None: ...

class RowRefs(_message.Message):
    __slots__ = ("keep", "cached")
    KEEP_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    keep: _containers.RepeatedScalarFieldContainer[int]
    cached: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, keep: _Optional[_Iterable[int]] = ..., cached: _Optional[_Iterable[int]] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("run_id", "secret")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    secret: str
    def __init__(self, run_id: _Optional[str] = ..., secret: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("role", "model_name", "tokenizer_fingerprint", "vocab_size", "max_sequence_length", "device", "dtype", "model_version", "eos_token_id", "pad_token_id", "num_parameters", "data_parallel_rank", "data_parallel_size", "instance_id", "torch_threads", "cpu_limit")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PAD_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DATA_PARALLEL_RANK_FIELD_NUMBER: _ClassVar[int]
    DATA_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TORCH_THREADS_FIELD_NUMBER: _ClassVar[int]
    CPU_LIMIT_FIELD_NUMBER: _ClassVar[int]
    role: str
    model_name: str
    tokenizer_fingerprint: str
    vocab_size: int
    max_sequence_length: int
    device: str
    dtype: str
    model_version: int
    eos_token_id: int
    pad_token_id: int
    num_parameters: int
    data_parallel_rank: int
    data_parallel_size: int
    instance_id: str
    torch_threads: int
    cpu_limit: float
    def __init__(self, role: _Optional[str] = ..., model_name: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., model_version: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., pad_token_id: _Optional[int] = ..., num_parameters: _Optional[int] = ..., data_parallel_rank: _Optional[int] = ..., data_parallel_size: _Optional[int] = ..., instance_id: _Optional[str] = ..., torch_threads: _Optional[int] = ..., cpu_limit: _Optional[float] = ...) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("path", "training_state", "keep", "lease", "overwrite")
    PATH_FIELD_NUMBER: _ClassVar[int]
    TRAINING_STATE_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    path: str
    training_state: bool
    keep: int
    lease: Lease
    overwrite: bool
    def __init__(self, path: _Optional[str] = ..., training_state: _Optional[bool] = ..., keep: _Optional[int] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("path", "model_version", "files", "instance_id")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    path: str
    model_version: int
    files: _containers.RepeatedScalarFieldContainer[str]
    instance_id: str
    def __init__(self, path: _Optional[str] = ..., model_version: _Optional[int] = ..., files: _Optional[_Iterable[str]] = ..., instance_id: _Optional[str] = ...) -> None: ...

class LoadCheckpointRequest(_message.Message):
    __slots__ = ("path", "lease")
    PATH_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    path: str
    lease: Lease
    def __init__(self, path: _Optional[str] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class LoadCheckpointResponse(_message.Message):
    __slots__ = ("path", "model_version", "instance_id")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    path: str
    model_version: int
    instance_id: str
    def __init__(self, path: _Optional[str] = ..., model_version: _Optional[int] = ..., instance_id: _Optional[str] = ...) -> None: ...

class LogProbsRequest(_message.Message):
    __slots__ = ("sequences", "temperature")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    sequences: _tensor_pb2.SequenceBatch
    temperature: float
    def __init__(self, sequences: _Optional[_Union[_tensor_pb2.SequenceBatch, _Mapping]] = ..., temperature: _Optional[float] = ...) -> None: ...

class LogProbsResponse(_message.Message):
    __slots__ = ("logprobs", "model_version", "instance_id")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    logprobs: _tensor_pb2.RaggedTensor
    model_version: int
    instance_id: str
    def __init__(self, logprobs: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ..., model_version: _Optional[int] = ..., instance_id: _Optional[str] = ...) -> None: ...
