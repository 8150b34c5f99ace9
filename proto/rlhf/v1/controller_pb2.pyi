from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EvaluateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("accuracy", "mean_margin", "ece", "pairs", "step", "seconds")
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MEAN_MARGIN_FIELD_NUMBER: _ClassVar[int]
    ECE_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    accuracy: float
    mean_margin: float
    ece: float
    pairs: int
    step: int
    seconds: float
    def __init__(self, accuracy: _Optional[float] = ..., mean_margin: _Optional[float] = ..., ece: _Optional[float] = ..., pairs: _Optional[int] = ..., step: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("run_id", "state", "step", "total_steps", "policy_version", "stats", "error", "algorithm", "last_evaluation", "waiting_for", "waiting_since", "last_error", "checkpoint_step", "restores", "phase")
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    LAST_EVALUATION_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    WAITING_SINCE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    RESTORES_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: str
    step: int
    total_steps: int
    policy_version: int
    stats: _containers.ScalarMap[str, float]
    error: str
    algorithm: str
    last_evaluation: EvaluateResponse
    waiting_for: str
    waiting_since: float
    last_error: str
    checkpoint_step: int
    restores: int
    phase: str
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., policy_version: _Optional[int] = ..., stats: _Optional[_Mapping[str, float]] = ..., error: _Optional[str] = ..., algorithm: _Optional[str] = ..., last_evaluation: _Optional[_Union[EvaluateResponse, _Mapping]] = ..., waiting_for: _Optional[str] = ..., waiting_since: _Optional[float] = ..., last_error: _Optional[str] = ..., checkpoint_step: _Optional[int] = ..., restores: _Optional[int] = ..., phase: _Optional[str] = ...) -> None: ...
