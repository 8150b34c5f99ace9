from rlhf.v1 import common_pb2 as _common_pb2
from rlhf.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LossAggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOSS_AGGREGATION_TOKEN: _ClassVar[LossAggregation]
    LOSS_AGGREGATION_SEQUENCE: _ClassVar[LossAggregation]
LOSS_AGGREGATION_TOKEN: LossAggregation
LOSS_AGGREGATION_SEQUENCE: LossAggregation

class TokenizeRequest(_message.Message):
    __slots__ = ("prompts", "responses")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    responses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., responses: _Optional[_Iterable[str]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "max_new_tokens", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    max_new_tokens: int
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt_tokens", "prompt_texts", "sampling", "first_row_index")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FIRST_ROW_INDEX_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: _tensor_pb2.RaggedTensor
    prompt_texts: _tensor_pb2.TextBatch
    sampling: SamplingParams
    first_row_index: int
    def __init__(self, prompt_tokens: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ..., prompt_texts: _Optional[_Union[_tensor_pb2.TextBatch, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., first_row_index: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("prompt_tokens", "response_tokens", "response_logprobs", "response_texts", "policy_version", "finished", "instance_id")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TEXTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: _tensor_pb2.RaggedTensor
    response_tokens: _tensor_pb2.RaggedTensor
    response_logprobs: _tensor_pb2.RaggedTensor
    response_texts: _containers.RepeatedScalarFieldContainer[str]
    policy_version: int
    finished: _containers.RepeatedScalarFieldContainer[bool]
    instance_id: str
    def __init__(self, prompt_tokens: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ..., response_tokens: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ..., response_logprobs: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ..., response_texts: _Optional[_Iterable[str]] = ..., policy_version: _Optional[int] = ..., finished: _Optional[_Iterable[bool]] = ..., instance_id: _Optional[str] = ...) -> None: ...

class PPOObjective(_message.Message):
    __slots__ = ("sequences", "old_logprobs", "advantages", "clip_range", "entropy_coef", "temperature", "ref_logprobs", "kl_coef", "aggregation")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    OLD_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    CLIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_COEF_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    REF_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    KL_COEF_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    sequences: _tensor_pb2.SequenceBatch
    old_logprobs: _tensor_pb2.RaggedTensor
    advantages: _tensor_pb2.RaggedTensor
    clip_range: float
    entropy_coef: float
    temperature: float
    ref_logprobs: _tensor_pb2.RaggedTensor
    kl_coef: float
    aggregation: LossAggregation
    def __init__(self, sequences: _Optional[_Union[_tensor_pb2.SequenceBatch, _Mapping]] = ..., old_logprobs: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ..., advantages: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ..., clip_range: _Optional[float] = ..., entropy_coef: _Optional[float] = ..., temperature: _Optional[float] = ..., ref_logprobs: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ..., kl_coef: _Optional[float] = ..., aggregation: _Optional[_Union[LossAggregation, str]] = ...) -> None: ...

class PtxBatch(_message.Message):
    __slots__ = ("tokens", "texts", "coef")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    COEF_FIELD_NUMBER: _ClassVar[int]
    tokens: _tensor_pb2.RaggedTensor
    texts: _tensor_pb2.TextBatch
    coef: float
    def __init__(self, tokens: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ..., texts: _Optional[_Union[_tensor_pb2.TextBatch, _Mapping]] = ..., coef: _Optional[float] = ...) -> None: ...

class DPOObjective(_message.Message):
    __slots__ = ("sequences", "reference_logps", "beta", "label_smoothing")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_LOGPS_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    sequences: _tensor_pb2.SequenceBatch
    reference_logps: _tensor_pb2.Tensor
    beta: float
    label_smoothing: float
    def __init__(self, sequences: _Optional[_Union[_tensor_pb2.SequenceBatch, _Mapping]] = ..., reference_logps: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., beta: _Optional[float] = ..., label_smoothing: _Optional[float] = ...) -> None: ...

class PolicyTrainRequest(_message.Message):
    __slots__ = ("key", "ppo", "dpo", "ptx", "micro_batch_size", "rows")
    KEY_FIELD_NUMBER: _ClassVar[int]
    PPO_FIELD_NUMBER: _ClassVar[int]
    DPO_FIELD_NUMBER: _ClassVar[int]
    PTX_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.TrainKey
    ppo: PPOObjective
    dpo: DPOObjective
    ptx: PtxBatch
    micro_batch_size: int
    rows: _common_pb2.RowRefs
    def __init__(self, key: _Optional[_Union[_common_pb2.TrainKey, _Mapping]] = ..., ppo: _Optional[_Union[PPOObjective, _Mapping]] = ..., dpo: _Optional[_Union[DPOObjective, _Mapping]] = ..., ptx: _Optional[_Union[PtxBatch, _Mapping]] = ..., micro_batch_size: _Optional[int] = ..., rows: _Optional[_Union[_common_pb2.RowRefs, _Mapping]] = ...) -> None: ...

class PolicyTrainResponse(_message.Message):
    __slots__ = ("loss", "policy_loss", "clip_fraction", "approx_kl", "entropy", "grad_norm", "ptx_loss", "model_version", "tokens", "replayed", "reward_accuracy", "reward_margin", "instance_id", "skipped", "kl_loss")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    POLICY_LOSS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FRACTION_FIELD_NUMBER: _ClassVar[int]
    APPROX_KL_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    PTX_LOSS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    REWARD_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    REWARD_MARGIN_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    KL_LOSS_FIELD_NUMBER: _ClassVar[int]
    loss: float
    policy_loss: float
    clip_fraction: float
    approx_kl: float
    entropy: float
    grad_norm: float
    ptx_loss: float
    model_version: int
    tokens: int
    replayed: bool
    reward_accuracy: float
    reward_margin: float
    instance_id: str
    skipped: bool
    kl_loss: float
    def __init__(self, loss: _Optional[float] = ..., policy_loss: _Optional[float] = ..., clip_fraction: _Optional[float] = ..., approx_kl: _Optional[float] = ..., entropy: _Optional[float] = ..., grad_norm: _Optional[float] = ..., ptx_loss: _Optional[float] = ..., model_version: _Optional[int] = ..., tokens: _Optional[int] = ..., replayed: _Optional[bool] = ..., reward_accuracy: _Optional[float] = ..., reward_margin: _Optional[float] = ..., instance_id: _Optional[str] = ..., skipped: _Optional[bool] = ..., kl_loss: _Optional[float] = ...) -> None: ...
