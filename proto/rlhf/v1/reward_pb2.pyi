from rlhf.v1 import common_pb2 as _common_pb2
from rlhf.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TextPairs(_message.Message):
    __slots__ = ("prompts", "responses")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    responses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., responses: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("tokens", "texts")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    tokens: _tensor_pb2.RaggedTensor
    texts: TextPairs
    def __init__(self, tokens: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ..., texts: _Optional[_Union[TextPairs, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "model_version", "values")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    scores: _tensor_pb2.Tensor
    model_version: int
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, scores: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., model_version: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class ComparePairs(_message.Message):
    __slots__ = ("prompts", "chosen", "rejected")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    chosen: _containers.RepeatedScalarFieldContainer[str]
    rejected: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., chosen: _Optional[_Iterable[str]] = ..., rejected: _Optional[_Iterable[str]] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("pairs",)
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    pairs: ComparePairs
    def __init__(self, pairs: _Optional[_Union[ComparePairs, _Mapping]] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("chosen_scores", "rejected_scores", "p_chosen", "model_version", "chosen_values", "rejected_values", "p_chosen_values")
    CHOSEN_SCORES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_SCORES_FIELD_NUMBER: _ClassVar[int]
    P_CHOSEN_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_VALUES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_VALUES_FIELD_NUMBER: _ClassVar[int]
    P_CHOSEN_VALUES_FIELD_NUMBER: _ClassVar[int]
    chosen_scores: _tensor_pb2.Tensor
    rejected_scores: _tensor_pb2.Tensor
    p_chosen: _tensor_pb2.Tensor
    model_version: int
    chosen_values: _containers.RepeatedScalarFieldContainer[float]
    rejected_values: _containers.RepeatedScalarFieldContainer[float]
    p_chosen_values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, chosen_scores: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., rejected_scores: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., p_chosen: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., model_version: _Optional[int] = ..., chosen_values: _Optional[_Iterable[float]] = ..., rejected_values: _Optional[_Iterable[float]] = ..., p_chosen_values: _Optional[_Iterable[float]] = ...) -> None: ...
