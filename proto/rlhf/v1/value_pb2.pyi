from rlhf.v1 import common_pb2 as _common_pb2
from rlhf.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ValuesRequest(_message.Message):
    __slots__ = ("sequences",)
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    sequences: _tensor_pb2.SequenceBatch
    def __init__(self, sequences: _Optional[_Union[_tensor_pb2.SequenceBatch, _Mapping]] = ...) -> None: ...

class ValuesResponse(_message.Message):
    __slots__ = ("values", "model_version", "instance_id")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    values: _tensor_pb2.RaggedTensor
    model_version: int
    instance_id: str
    def __init__(self, values: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ..., model_version: _Optional[int] = ..., instance_id: _Optional[str] = ...) -> None: ...

class ValueTrainRequest(_message.Message):
    __slots__ = ("key", "sequences", "old_values", "returns", "clip_range_value", "micro_batch_size", "rows")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    OLD_VALUES_FIELD_NUMBER: _ClassVar[int]
    RETURNS_FIELD_NUMBER: _ClassVar[int]
    CLIP_RANGE_VALUE_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.TrainKey
    sequences: _tensor_pb2.SequenceBatch
    old_values: _tensor_pb2.RaggedTensor
    returns: _tensor_pb2.RaggedTensor
    clip_range_value: float
    micro_batch_size: int
    rows: _common_pb2.RowRefs
    def __init__(self, key: _Optional[_Union[_common_pb2.TrainKey, _Mapping]] = ..., sequences: _Optional[_Union[_tensor_pb2.SequenceBatch, _Mapping]] = ..., old_values: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ..., returns: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ..., clip_range_value: _Optional[float] = ..., micro_batch_size: _Optional[int] = ..., rows: _Optional[_Union[_common_pb2.RowRefs, _Mapping]] = ...) -> None: ...

class ValueTrainResponse(_message.Message):
    __slots__ = ("loss", "clip_fraction", "grad_norm", "model_version", "tokens", "replayed", "explained_variance", "instance_id", "skipped")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FRACTION_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    EXPLAINED_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    loss: float
    clip_fraction: float
    grad_norm: float
    model_version: int
    tokens: int
    replayed: bool
    explained_variance: float
    instance_id: str
    skipped: bool
    def __init__(self, loss: _Optional[float] = ..., clip_fraction: _Optional[float] = ..., grad_norm: _Optional[float] = ..., model_version: _Optional[int] = ..., tokens: _Optional[int] = ..., replayed: _Optional[bool] = ..., explained_variance: _Optional[float] = ..., instance_id: _Optional[str] = ..., skipped: _Optional[bool] = ...) -> None: ...
