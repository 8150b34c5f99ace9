"""Hypothesis strategies of malformed and extreme requests for every RPC of the four model services.

A request is drawn valid, then `Faults` picks the parts of it to break: none,
one (most often) or two, so that the deep code paths see the damage one
piece at a time. Breaking a part means: tensors whose dtype enum (even out of
range), shape or bytes disagree, huge declared shapes, ragged lengths that do
not add up or are negative, zero or huge, token ids outside the vocabulary,
NaN/inf/1e38/denormal floats, too many rows or tokens, texts from empty to
2 MB of garbage unicode, scalars at their extremes, bad keys, leases and
checkpoint names. `cases()` pairs every RPC of every service (from the
generated descriptors) with its strategies, and with one that sends bytes the
server must parse itself. Every strategy draws a `Sent`: the wire bytes and a
short description, so that a failing example prints readably.
"""

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from google.protobuf import descriptor, message, message_factory, text_format
from hypothesis import strategies as st

from rlhf.v1 import common_pb2, policy_pb2, reference_pb2, reward_pb2, tensor_pb2, value_pb2
from services import codec
from services.config import BatchingConfig

FUZZ_RUN = "fuzz"  # the run that holds the trainers' lease during the fuzz
FUZZ_SECRET = "fuzz-secret"
FUZZ_LEASE = common_pb2.Lease(run_id=FUZZ_RUN, secret=FUZZ_SECRET)
SAVED_STATE = "state-0"  # a training state of FUZZ_RUN that the fixture writes, for LoadCheckpoint to find
MAX_ROWS = BatchingConfig().max_request_rows  # the services' default rows-per-request limit
MAX_TEXT_BYTES = BatchingConfig().max_text_bytes
FLOAT32_MAX = float(np.finfo(np.float32).max)
EXTREME_FLOATS = (math.nan, math.inf, -math.inf, 1e38, -1e38, FLOAT32_MAX, -FLOAT32_MAX, 1e-40, -1e-40, 1e-45,
                  0.0, -0.0, 1.0, -1.0, 1e7, -1e7,
                  # at the services' own bounds (temperature, coefficients, label smoothing, max_abs_input)
                  1e-2, 100.0, 1e3, 0.5, 0.49999997, 1e6, -1e6)
DTYPES = tuple(tensor_pb2.DType.values())
TENSOR = tensor_pb2.Tensor.DESCRIPTOR.full_name
INT_DTYPES = (tensor_pb2.DTYPE_UINT16, tensor_pb2.DTYPE_INT32, tensor_pb2.DTYPE_INT64)
FLOAT_DTYPES = (tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_FLOAT16, tensor_pb2.DTYPE_BFLOAT16)
# NUL, controls, NEL, zero-width, LRM/RLM, bidi embeddings and isolates, BOM, replacement, non-characters,
# the last code point, an emoji, combining marks, whitespace.
GARBAGE = ("\x00\x01\x07\x1b\x7f\x85\u200b\u200e\u200f\u202a\u202e\u2066\u2069\ufeff\ufffd\uffff\U0010ffff"
           "\U0001f600\u0301\u0336 \t\n\r")
BAD_PATHS = ("", ".", "..", "../escape", "a/../..", "/abs", "/tmp/fuzz-abs", "a/b", "a\\b", "\x00", "a\x00b",
             "a" * 128, "a" * 129, "a" * 300, "\u00e9\U0001f600", "\u202e", " ", "~", "-", "runs", "version-0",
             SAVED_STATE, "x\n")


@dataclass(frozen=True)
class Bounds:
    """What the model behind a service accepts: ids in [0, vocab_size), at most max_length tokens per row."""

    vocab_size: int
    max_length: int


class Sent:
    """One input: the serialized request (a list of them for a client stream) and how to show it.

    Not a dataclass: Hypothesis would print every field of one, megabytes of wire included.
    """

    def __init__(self, wire: bytes | list[bytes], shown: str):
        self.wire = wire
        self.shown = shown

    def __repr__(self) -> str:
        return self.shown

    def _repr_pretty_(self, printer, cycle) -> None:  # how Hypothesis prints a failing example
        printer.text(self.shown)


@dataclass(frozen=True)
class Case:
    """One RPC (method descriptor) and one family of inputs for it."""

    name: str
    method: descriptor.MethodDescriptor
    inputs: Callable[[Bounds], st.SearchStrategy]  # Bounds -> strategy of Sent


class Faults:
    """The parts of one request to break (none, one or two of `parts`); every other part is drawn valid."""

    def __init__(self, draw, parts: tuple[str, ...]):
        self.draw = draw
        count = min(len(parts), draw(st.sampled_from([0, 1, 1, 1, 2])))
        self.broken = frozenset(draw(st.lists(st.sampled_from(parts), min_size=count, max_size=count, unique=True)))

    def __contains__(self, part: str) -> bool:
        return part in self.broken

    def pick(self, part: str, good: st.SearchStrategy, bad: st.SearchStrategy):
        """A draw from `bad` when `part` is broken, else from `good`."""
        return self.draw(bad if part in self else good)

    def number(self, part: str, *ordinary: float) -> float:
        """A float field: one of its ordinary values, or (broken) any float32 or extreme."""
        return self.pick(part, st.sampled_from(ordinary), floats())

    def integer(self, part: str, bits: int, *ordinary: int) -> int:
        """A signed integer field: one of its ordinary values, or (broken) its edges or anything in range."""
        return self.pick(part, st.sampled_from(ordinary), ints(bits))


# --- scalars, texts, keys ------------------------------------------------------------------------------------
def floats() -> st.SearchStrategy[float]:
    """float32 scalars: the extremes (NaN, inf, 1e38, denormals) and anything else."""
    return st.one_of(st.sampled_from(EXTREME_FLOATS), st.floats(width=32))


def ints(bits: int, signed: bool = True) -> st.SearchStrategy[int]:
    """Integers of a proto field: its edges and anything in range."""
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = [v for v in (low, low + 1, -1, 0, 1, 2**16, 2**31 - 1, 2**31, 2**40, high - 1, high) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _repeat(unit: str, size: int) -> str:
    """A text of `unit`s with at least `size` UTF-8 bytes (exactly `size` for a one-byte unit)."""
    return unit * max(1, -(-size // len(unit.encode())))


def ordinary_texts() -> st.SearchStrategy[str]:
    """Non-empty texts, garbage unicode included (no lone surrogates: protobuf strings are UTF-8)."""
    return st.one_of(st.text(min_size=1, max_size=30), st.text(alphabet=st.sampled_from(GARBAGE), min_size=1,
                                                                max_size=30))


def huge_texts() -> st.SearchStrategy[str]:
    """At, just past and far past the per-text byte limit (up to 2 MB)."""
    return st.builds(_repeat, st.sampled_from(["a", "ab cd ", "\u00e9", "\U0001f600", "\u202e", "\x00", "\u0301"]),
                     st.sampled_from([MAX_TEXT_BYTES, MAX_TEXT_BYTES + 1, 2 * 1024 * 1024]))


def text_column(faults: Faults, part: str, n: int) -> list[str]:
    """n ordinary texts; broken: one empty or huge, one too many or too few, or more rows than allowed."""
    texts = faults.draw(st.lists(ordinary_texts(), min_size=n, max_size=n))
    if part not in faults:
        return texts
    how = faults.draw(st.sampled_from(["empty", "huge", "huge", "count", "rows"]))
    at = faults.draw(st.integers(0, len(texts)))
    if how == "empty":
        texts.insert(at, "")
    elif how == "huge":
        texts.insert(at, faults.draw(huge_texts()))
    elif how == "count":
        texts = texts[:-1] if texts and faults.draw(st.booleans()) else texts + ["extra"]
    else:
        texts = ["a"] * (MAX_ROWS + 1)
    return texts


def garbage_strings() -> st.SearchStrategy[str]:
    """Empty, garbage unicode, or 1 MB."""
    return st.one_of(st.just(""), st.text(alphabet=st.sampled_from(GARBAGE), max_size=20),
                     st.builds(lambda: "r" * (1 << 20)))


def lease(faults: Faults, part: str = "lease"):
    """The fuzz run's lease; broken: none, its run with another secret, or another run's."""
    if part not in faults:
        return FUZZ_LEASE
    return faults.draw(st.one_of(
        st.none(), st.builds(common_pb2.Lease, run_id=st.just(FUZZ_RUN), secret=garbage_strings()),
        st.builds(common_pb2.Lease, run_id=garbage_strings(), secret=st.sampled_from(["", FUZZ_SECRET]))))


_fresh = itertools.count(1)
_issued = [0]  # the step of the last fresh key


def fresh_key() -> common_pb2.TrainKey:
    """A key of the fuzz run never used before (steps only grow), so that a valid request trains."""
    _issued[0] = next(_fresh)
    return common_pb2.TrainKey(run_id=FUZZ_RUN, step=_issued[0], minibatch_index=0, secret=FUZZ_SECRET)


def last_key() -> common_pb2.TrainKey:
    """The last fresh key again: a retry (answered from the stored result, or applied if it never was)."""
    return common_pb2.TrainKey(run_id=FUZZ_RUN, step=_issued[0], minibatch_index=0, secret=FUZZ_SECRET)


def fresh_name() -> str:
    """A checkpoint name not used before."""
    return f"fuzz-{next(_fresh)}"


def train_key(faults: Faults):
    """A fresh key; broken: none, a retry of the last one, the fuzz run's step 0 (below its mark) or a negative
    minibatch, or any run id, step, minibatch and secret. (Never a huge step of the fuzz run: it would lift
    the run's mark past every fresh key.)"""
    if "key" not in faults:
        return fresh_key()
    ours = st.builds(common_pb2.TrainKey, run_id=st.just(FUZZ_RUN), step=st.sampled_from([0, -1, -(2**63)]),
                     minibatch_index=st.sampled_from([0, -1]), secret=st.sampled_from([FUZZ_SECRET, ""]))
    other = st.builds(common_pb2.TrainKey, run_id=garbage_strings(), step=ints(64), minibatch_index=ints(64),
                      secret=st.one_of(garbage_strings(), st.just(FUZZ_SECRET)))
    return faults.draw(st.one_of(st.none(), st.builds(last_key), ours, other))


# --- tensors -------------------------------------------------------------------------------------------------
def encode(values, dtype: int) -> bytes:
    """Little-endian raw bytes of `values` as a wire dtype (ints wrap to the width, floats round)."""
    values = np.asarray(values)
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype == tensor_pb2.DTYPE_INT32:
            return (values.astype(np.int64) & 0xFFFFFFFF).astype("<u4").view("<i4").tobytes()
        if dtype == tensor_pb2.DTYPE_INT64:
            return values.astype("<i8").tobytes()
        if dtype == tensor_pb2.DTYPE_UINT16:
            return (values.astype(np.int64) & 0xFFFF).astype("<u2").tobytes()
        if dtype == tensor_pb2.DTYPE_FLOAT16:
            return values.astype("<f2").tobytes()
        if dtype == tensor_pb2.DTYPE_BFLOAT16:
            return (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        return values.astype("<f4").tobytes()


def mangled(draw, pb: tensor_pb2.Tensor) -> tensor_pb2.Tensor:
    """The tensor with a wrong (or out-of-range) dtype, a shape that disagrees with its bytes, a huge declared
    shape, random or truncated bytes, or nothing at all."""
    how = draw(st.sampled_from(["dtype", "shape", "huge", "raw", "truncate", "unset"]))
    out = tensor_pb2.Tensor()
    out.CopyFrom(pb)
    if how == "dtype":
        out.dtype = draw(st.one_of(st.sampled_from(DTYPES), ints(32)))
    elif how == "shape":
        out.shape[:] = draw(st.lists(st.one_of(st.integers(0, 64), ints(64)), max_size=4))
    elif how == "huge":
        out.shape[:] = draw(st.sampled_from([[2**40], [2**31, 2**31], [2**62, 4], [2**63 - 1], [-(2**63)], [0, 2**62]]))
    elif how == "raw":
        out.raw = draw(st.binary(max_size=256))
    elif how == "truncate":
        out.raw = pb.raw[: draw(st.integers(0, max(0, len(pb.raw) - 1)))]
    else:
        out.Clear()
    return out


def bad_lengths(draw, lengths: list[int]) -> list[int]:
    """Row lengths that do not add up, are negative (even when they add up), zero, huge, missing or extra."""
    lengths = list(lengths)
    how = draw(st.sampled_from(["sum", "negative", "zero", "huge", "none", "extra"]))
    i = draw(st.integers(0, max(0, len(lengths) - 1)))
    if how == "sum" and lengths:
        lengths[i] += draw(st.sampled_from([-1, 1, 7]))
    elif how == "negative" and lengths:
        if draw(st.booleans()):  # a row of -1 and one of n + 1: they still add up
            lengths.append(lengths[i] + 1)
            lengths[i] = -1
        else:
            lengths[i] = -(2**63)
    elif how == "zero":
        lengths.insert(i, 0)
    elif how == "huge" and lengths:
        lengths[i] = draw(st.sampled_from([2**31, 2**62, 2**63 - 1]))
    elif how == "none":
        lengths = []
    else:
        lengths.append(draw(st.integers(1, 4)))
    return lengths


def ragged(faults: Faults, part: str, rows: list, dtype: int) -> tensor_pb2.RaggedTensor:
    """Rows as a RaggedTensor; broken `part.lengths` or `part.values` (the tensor) are mangled."""
    flat = np.concatenate([np.asarray(r) for r in rows]) if rows else np.zeros(0)
    lengths = [len(r) for r in rows]
    if f"{part}.lengths" in faults:
        lengths = bad_lengths(faults.draw, lengths)
    values = tensor_pb2.Tensor(dtype=dtype, shape=[len(flat)], raw=encode(flat, dtype))
    if f"{part}.values" in faults:
        values = mangled(faults.draw, values)
    return tensor_pb2.RaggedTensor(values=values, lengths=lengths)


def token_parts(part: str) -> tuple[str, ...]:
    """The breakable parts of ragged token ids at `part`."""
    return (f"{part}.rows", f"{part}.ids", f"{part}.lengths", f"{part}.values")


def token_rows(faults: Faults, part: str, b: Bounds) -> list[list[int]]:
    """A few short rows of in-vocabulary ids (>= 2 each). Broken rows: one at or past the context length,
    many rows, more than a request may hold, or more tokens than its budget; broken ids: one outside the
    vocabulary."""
    draw = faults.draw
    shape = draw(st.sampled_from(["long", "many", "too_many", "budget"])) if f"{part}.rows" in faults else "few"
    if shape == "few":
        rows = draw(st.lists(st.lists(st.integers(0, b.vocab_size - 1), min_size=2, max_size=12), min_size=1,
                             max_size=6))
    elif shape == "long":
        n = draw(st.sampled_from([b.max_length - 1, b.max_length, b.max_length + 1, 4 * b.max_length]))
        rows = [[(3 + j) % b.vocab_size for j in range(n)]]
    elif shape == "many":
        rows = [[3, 4, 5]] * draw(st.sampled_from([64, 300]))
    elif shape == "too_many":
        rows = [[3, 4]] * (MAX_ROWS + 1)
    else:  # rows x longest row past batching.max_request_tokens
        rows = [[3] * (2 * b.max_length + 1)] * MAX_ROWS
    if f"{part}.ids" in faults:
        v = b.vocab_size
        i = draw(st.integers(0, len(rows) - 1))
        rows = list(rows)
        rows[i] = list(rows[i])
        rows[i][draw(st.integers(0, len(rows[i]) - 1))] = draw(
            st.sampled_from([v, v + 1, 2**31 - 1, -1, -(2**31), 2**40, -(2**63), 2**63 - 1]))
    return rows


def token_ragged(faults: Faults, part: str, b: Bounds) -> tensor_pb2.RaggedTensor:
    """token_rows as a RaggedTensor."""
    return token_ragged_rows(faults, part, token_rows(faults, part, b))


def token_ragged_rows(faults: Faults, part: str, rows: list[list[int]]) -> tensor_pb2.RaggedTensor:
    """Token rows as int32 or int64 ragged (the broken parts mangled)."""
    return ragged(faults, part, rows, faults.draw(st.sampled_from(INT_DTYPES)))


def sequence_parts(part: str) -> tuple[str, ...]:
    """The breakable parts of a SequenceBatch at `part`."""
    return (*token_parts(f"{part}.tokens"), f"{part}.prompt_lengths")


def sequences(faults: Faults, part: str, b: Bounds, even: bool = False) -> tuple[tensor_pb2.SequenceBatch,
                                                                                  list[int]]:
    """A SequenceBatch and each row's response length (as meant). Broken prompt_lengths: one is 0, negative,
    the whole row, past it or huge, or one is missing or extra. even: chosen/rejected pairs."""
    draw = faults.draw
    rows = token_rows(faults, f"{part}.tokens", b)
    if even and len(rows) % 2:
        rows = rows[:-1] or rows * 2
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    prompts = [int(1 + rng.integers(0, max(1, len(r) - 1))) for r in rows]
    responses = [len(r) - p for r, p in zip(rows, prompts, strict=True)]
    if f"{part}.prompt_lengths" in faults:
        how = draw(st.sampled_from(["zero", "negative", "whole", "past", "huge", "missing", "extra"]))
        i = draw(st.integers(0, len(rows) - 1))
        bad = {"zero": 0, "negative": -1, "whole": len(rows[i]), "past": len(rows[i]) + 5, "huge": 2**62}
        if how in bad:
            prompts[i] = bad[how]
        elif how == "missing":
            prompts.pop(i)
        else:
            prompts.append(1)
    tokens = token_ragged_rows(faults, f"{part}.tokens", rows)
    return tensor_pb2.SequenceBatch(tokens=tokens, prompt_lengths=prompts), responses


def float_parts(part: str) -> tuple[str, ...]:
    """The breakable parts of per-token floats at `part`: the numbers, the row lengths, the tensor."""
    return (f"{part}.numbers", f"{part}.lengths", f"{part}.values")


def float_values(faults: Faults, part: str, n: int) -> np.ndarray:
    """n ordinary float32 values; broken numbers: a scale up to 1e38 and perhaps one NaN, inf or denormal."""
    draw = faults.draw
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    broken = f"{part}.numbers" in faults
    scale = draw(st.sampled_from([1e3, 1e6, 1e7, 1e38] if broken else [0.0, 0.1, 1.0, 5.0]))
    values = (rng.standard_normal(n) * scale).astype(np.float32)
    if n and broken and draw(st.booleans()):
        values[draw(st.integers(0, n - 1))] = draw(st.sampled_from(EXTREME_FLOATS))
    return values


def float_ragged(faults: Faults, part: str, lengths: list[int]) -> tensor_pb2.RaggedTensor:
    """Per-token floats laid out like `lengths`, in float32, float16 or bfloat16."""
    values = float_values(faults, part, sum(lengths))
    rows = np.split(values, np.cumsum(lengths)[:-1]) if lengths else []
    return ragged(faults, part, rows, faults.draw(st.sampled_from(FLOAT_DTYPES)))


# --- requests, one strategy (or more) per request message -----------------------------------------------------
GENERATE_PARTS = ("prompts", *token_parts("prompt_tokens"), "prompt_texts", "sampling", "sampling.temperature",
                  "sampling.max_new_tokens", "sampling.top_k", "sampling.top_p")


@st.composite
def generate_requests(draw, b: Bounds) -> policy_pb2.GenerateRequest:
    """Token or text prompts (broken: neither), sampling parameters (broken: unset), any seed and first row."""
    faults = Faults(draw, GENERATE_PARTS)
    request = policy_pb2.GenerateRequest(first_row_index=draw(ints(32, signed=False)))
    if "prompts" not in faults and draw(st.booleans()):
        request.prompt_tokens.CopyFrom(token_ragged(faults, "prompt_tokens", b))
    elif "prompts" not in faults:
        request.prompt_texts.texts.extend(text_column(faults, "prompt_texts", draw(st.integers(1, 4))))
    if "sampling" not in faults:
        request.sampling.CopyFrom(policy_pb2.SamplingParams(
            temperature=faults.number("sampling.temperature", 0.0, 0.7, 1.0),
            max_new_tokens=faults.integer("sampling.max_new_tokens", 32, 1, 4, 8),
            top_k=faults.integer("sampling.top_k", 32, 0, 5), top_p=faults.number("sampling.top_p", 0.0, 0.9, 1.0),
            seed=draw(ints(64, signed=False))))
    return request


@st.composite
def logprobs_requests(draw, b: Bounds) -> common_pb2.LogProbsRequest:
    """Sequences and a temperature."""
    faults = Faults(draw, (*sequence_parts("sequences"), "temperature"))
    seqs, _ = sequences(faults, "sequences", b)
    return common_pb2.LogProbsRequest(sequences=seqs, temperature=faults.number("temperature", 0.0, 0.7, 1.0))


PPO_PARTS = (*sequence_parts("ppo.sequences"), *float_parts("ppo.old_logprobs"), *float_parts("ppo.advantages"),
             "ppo.clip_range", "ppo.entropy_coef", "ppo.temperature")
DPO_PARTS = (*sequence_parts("dpo.sequences"), "dpo.reference_logps.numbers", "dpo.reference_logps.values",
             "dpo.reference_logps.count", "dpo.beta", "dpo.label_smoothing")
PTX_PARTS = ("ptx.source", *token_parts("ptx.tokens"), "ptx.texts", "ptx.coef")


def ppo_objective(faults: Faults, b: Bounds) -> policy_pb2.PPOObjective:
    """A PPO minibatch: sequences, old log-probs and advantages per response token, clip, entropy, temperature."""
    seqs, responses = sequences(faults, "ppo.sequences", b)
    return policy_pb2.PPOObjective(
        sequences=seqs, old_logprobs=float_ragged(faults, "ppo.old_logprobs", responses),
        advantages=float_ragged(faults, "ppo.advantages", responses),
        clip_range=faults.number("ppo.clip_range", 0.1, 0.2, 0.5),
        entropy_coef=faults.number("ppo.entropy_coef", 0.0, 0.01),
        temperature=faults.number("ppo.temperature", 0.0, 0.7, 1.0))


def dpo_objective(faults: Faults, b: Bounds) -> policy_pb2.DPOObjective:
    """A DPO minibatch: chosen/rejected rows, their reference log-probs (broken count: not one per row), beta."""
    seqs, responses = sequences(faults, "dpo.sequences", b, even=True)
    n = len(responses)
    if "dpo.reference_logps.count" in faults:
        n = faults.draw(st.sampled_from([0, n - 1, n + 1, 2 * n]))
    values = -np.abs(float_values(faults, "dpo.reference_logps", max(0, n)))
    logps = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[len(values)],
                              raw=encode(values, tensor_pb2.DTYPE_FLOAT32))
    if "dpo.reference_logps.values" in faults:
        logps = mangled(faults.draw, logps)
    return policy_pb2.DPOObjective(sequences=seqs, reference_logps=logps,
                                   beta=faults.number("dpo.beta", 0.1, 0.5),
                                   label_smoothing=faults.number("dpo.label_smoothing", 0.0, 0.1))


def ptx_batch(faults: Faults, b: Bounds) -> policy_pb2.PtxBatch:
    """Pretraining rows as tokens or texts (broken source: neither), with a weight gamma."""
    batch = policy_pb2.PtxBatch(coef=faults.number("ptx.coef", 0.0, 0.5, 1.0))
    if "ptx.source" in faults:
        return batch
    if faults.draw(st.booleans()):
        batch.tokens.CopyFrom(token_ragged(faults, "ptx.tokens", b))
    else:
        batch.texts.texts.extend(text_column(faults, "ptx.texts", faults.draw(st.integers(1, 3))))
    return batch


def policy_train_requests(objective: str, with_ptx: bool) -> Callable[[Bounds], st.SearchStrategy]:
    """PolicyTrainRequests of one objective ("ppo", "dpo" or "either"), with a ptx batch or without."""
    @st.composite
    def requests(draw, b: Bounds) -> policy_pb2.PolicyTrainRequest:
        which = draw(st.sampled_from(["ppo", "dpo"])) if objective == "either" else objective
        parts = ("key", "micro_batch_size", *(PPO_PARTS if which == "ppo" else DPO_PARTS),
                 *(PTX_PARTS if with_ptx else ()))
        faults = Faults(draw, parts)
        request = policy_pb2.PolicyTrainRequest(micro_batch_size=faults.integer("micro_batch_size", 32, 0, 1, 4))
        key = train_key(faults)
        if key is not None:
            request.key.CopyFrom(key)
        if which == "ppo":
            request.ppo.CopyFrom(ppo_objective(faults, b))
        else:
            request.dpo.CopyFrom(dpo_objective(faults, b))
        if with_ptx:
            request.ptx.CopyFrom(ptx_batch(faults, b))
        return request

    return requests


@st.composite
def value_train_requests(draw, b: Bounds) -> value_pb2.ValueTrainRequest:
    """A value minibatch: sequences, old values and returns per response token, clip range, key."""
    faults = Faults(draw, ("key", "micro_batch_size", *sequence_parts("sequences"), *float_parts("old_values"),
                           *float_parts("returns"), "clip_range_value"))
    seqs, responses = sequences(faults, "sequences", b)
    request = value_pb2.ValueTrainRequest(
        sequences=seqs, old_values=float_ragged(faults, "old_values", responses),
        returns=float_ragged(faults, "returns", responses),
        clip_range_value=faults.number("clip_range_value", 0.0, 0.2),
        micro_batch_size=faults.integer("micro_batch_size", 32, 0, 1, 4))
    key = train_key(faults)
    if key is not None:
        request.key.CopyFrom(key)
    return request


@st.composite
def values_requests(draw, b: Bounds) -> value_pb2.ValuesRequest:
    """Sequences to value."""
    faults = Faults(draw, sequence_parts("sequences"))
    return value_pb2.ValuesRequest(sequences=sequences(faults, "sequences", b)[0])


@st.composite
def tokenize_requests(draw, b: Bounds) -> policy_pb2.TokenizeRequest:
    """Prompt and response columns of the same length (unless broken)."""
    faults = Faults(draw, ("prompts", "responses"))
    n = draw(st.integers(1, 4))
    return policy_pb2.TokenizeRequest(prompts=text_column(faults, "prompts", n),
                                      responses=text_column(faults, "responses", n))


@st.composite
def score_requests(draw, b: Bounds) -> reward_pb2.ScoreRequest:
    """Token rows or text pairs (broken input: neither)."""
    faults = Faults(draw, ("input", *token_parts("tokens"), "texts.prompts", "texts.responses"))
    if "input" in faults:
        return reward_pb2.ScoreRequest()
    if draw(st.booleans()):
        return reward_pb2.ScoreRequest(tokens=token_ragged(faults, "tokens", b))
    n = draw(st.integers(1, 4))
    return reward_pb2.ScoreRequest(texts=reward_pb2.TextPairs(prompts=text_column(faults, "texts.prompts", n),
                                                              responses=text_column(faults, "texts.responses", n)))


@st.composite
def compare_requests(draw, b: Bounds) -> reward_pb2.CompareRequest:
    """Prompt, chosen and rejected columns of the same length (unless broken)."""
    faults = Faults(draw, ("pairs.prompts", "pairs.chosen", "pairs.rejected"))
    n = draw(st.integers(1, 3))
    return reward_pb2.CompareRequest(pairs=reward_pb2.ComparePairs(
        prompts=text_column(faults, "pairs.prompts", n), chosen=text_column(faults, "pairs.chosen", n),
        rejected=text_column(faults, "pairs.rejected", n)))


def checkpoint_name(faults: Faults, good: str | None = None) -> str:
    """A new name (or `good`); broken: NUL, "..", absolute, too long, "a/b", unicode, ..."""
    ok = st.just(good) if good is not None else st.builds(fresh_name)
    return faults.pick("path", ok, st.one_of(st.sampled_from(BAD_PATHS),
                                             st.text(alphabet=st.sampled_from(GARBAGE + "ab./"), max_size=20)))


@st.composite
def save_requests(draw, b: Bounds) -> common_pb2.SaveCheckpointRequest:
    """Weights or a training state under a new name, with the fuzz run's lease (broken: name, keep, lease)."""
    faults = Faults(draw, ("path", "keep", "lease"))
    request = common_pb2.SaveCheckpointRequest(path=checkpoint_name(faults), training_state=draw(st.booleans()),
                                               keep=faults.integer("keep", 32, 0, 1, 3),
                                               overwrite=draw(st.booleans()))
    held = lease(faults)
    if held is not None:
        request.lease.CopyFrom(held)
    return request


@st.composite
def load_requests(draw, b: Bounds) -> common_pb2.LoadCheckpointRequest:
    """The training state the fixture saved, with the fuzz run's lease (broken: name, lease)."""
    faults = Faults(draw, ("path", "lease"))
    request = common_pb2.LoadCheckpointRequest(path=checkpoint_name(faults, SAVED_STATE))
    held = lease(faults)
    if held is not None:
        request.lease.CopyFrom(held)
    return request


@st.composite
def release_requests(draw, b: Bounds) -> common_pb2.ReleaseRequest:
    """The fuzz run's lease (broken: none or another)."""
    held = lease(Faults(draw, ("lease",)))
    return common_pb2.ReleaseRequest(lease=held) if held is not None else common_pb2.ReleaseRequest()


REQUESTS: dict[str, dict[str, Callable[[Bounds], st.SearchStrategy]]] = {
    common_pb2.InfoRequest.DESCRIPTOR.full_name: {"": lambda b: st.just(common_pb2.InfoRequest())},
    common_pb2.LogProbsRequest.DESCRIPTOR.full_name: {"": logprobs_requests},
    common_pb2.SaveCheckpointRequest.DESCRIPTOR.full_name: {"": save_requests},
    common_pb2.LoadCheckpointRequest.DESCRIPTOR.full_name: {"": load_requests},
    common_pb2.ReleaseRequest.DESCRIPTOR.full_name: {"": release_requests},
    policy_pb2.GenerateRequest.DESCRIPTOR.full_name: {"": generate_requests},
    policy_pb2.PolicyTrainRequest.DESCRIPTOR.full_name: {
        "ppo": policy_train_requests("ppo", with_ptx=False), "dpo": policy_train_requests("dpo", with_ptx=False),
        "ptx": policy_train_requests("either", with_ptx=True)},
    policy_pb2.TokenizeRequest.DESCRIPTOR.full_name: {"": tokenize_requests},
    reward_pb2.ScoreRequest.DESCRIPTOR.full_name: {"": score_requests},
    reward_pb2.CompareRequest.DESCRIPTOR.full_name: {"": compare_requests},
    value_pb2.ValuesRequest.DESCRIPTOR.full_name: {"": values_requests},
    value_pb2.ValueTrainRequest.DESCRIPTOR.full_name: {"": value_train_requests},
}
SERVICES = tuple(service for module in (policy_pb2, reference_pb2, reward_pb2, value_pb2)
                 for service in module.DESCRIPTOR.services_by_name.values())


# --- raw bytes -------------------------------------------------------------------------------------------------
@st.composite
def corrupted(draw, wire: bytes) -> bytes:
    """`wire` with a few bytes flipped, cut, inserted, or invalid UTF-8 spliced in."""
    data = bytearray(wire)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["flip", "cut", "insert", "utf8"]))
        if how == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif how == "cut":
            del data[at:]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif how == "utf8":
            data[at:at] = draw(st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]))
    return bytes(data)


def shown(request: message.Message, limit: int = 60) -> str:
    """The request in text format on one line, strings and bytes cut to `limit`, long lists to their head."""
    copy = type(request)()
    copy.CopyFrom(request)
    _shorten(copy, limit)
    return f"{type(request).__name__}({text_format.MessageToString(copy, as_one_line=True)})"


def _cut(value, limit: int):
    if len(value) <= limit:
        return value
    tail = f"...<{len(value)}>"
    return value[:limit] + (tail.encode() if isinstance(value, bytes) else tail)


def _shorten(msg: message.Message, limit: int) -> None:
    for field, value in msg.ListFields():
        if field.message_type is not None:
            for sub in value if field.is_repeated else [value]:
                _shorten(sub, limit)
        elif not field.is_repeated:
            if field.type in (field.TYPE_STRING, field.TYPE_BYTES):
                setattr(msg, field.name, _cut(value, limit))
        elif len(value) > 8 or field.type in (field.TYPE_STRING, field.TYPE_BYTES):
            head = [_cut(v, limit) if isinstance(v, (str, bytes)) else v for v in value[:8]]
            del value[:]
            value.extend(head)


def typed_inputs(typed: Callable[[Bounds], st.SearchStrategy], stream: bool) -> Callable[[Bounds], st.SearchStrategy]:
    """Sent of a typed strategy; a client stream sends a list of 0-3 such messages."""
    def inputs(b: Bounds) -> st.SearchStrategy:
        @st.composite
        def sent(draw) -> Sent:
            if stream:
                messages = draw(st.lists(typed(b), max_size=3))
                return Sent([m.SerializeToString() for m in messages], "[" + ", ".join(map(shown, messages)) + "]")
            request = draw(typed(b))
            return Sent(request.SerializeToString(), shown(request))

        return sent()

    return inputs


def raw_inputs(typed: Callable[[Bounds], st.SearchStrategy], stream: bool) -> Callable[[Bounds], st.SearchStrategy]:
    """Random bytes, or a typed request's serialization corrupted, sent as the request itself (1-3 of them
    to a client stream)."""
    def inputs(b: Bounds) -> st.SearchStrategy:
        one = st.one_of(st.binary(max_size=512), typed(b).map(lambda m: m.SerializeToString()).flatmap(corrupted))

        @st.composite
        def sent(draw) -> Sent:
            wires = draw(st.lists(one, min_size=1, max_size=3)) if stream else [draw(one)]
            text = ", ".join(f"raw {len(w)} bytes {_cut(w, 80)!r}" for w in wires)
            return Sent(wires if stream else wires[0], f"[{text}]" if stream else text)

        return sent()

    return inputs


def cases() -> list[Case]:
    """Every RPC of every service with each of its request strategies, and once with raw bytes."""
    out = []
    for service in SERVICES:
        for method in service.methods:
            variants = REQUESTS.get(method.input_type.full_name)
            if variants is None:
                raise KeyError(f"no fuzz strategy for {method.full_name}'s {method.input_type.full_name}")
            rpc = f"{service.name}.{method.name}"
            for variant, typed in variants.items():
                out.append(Case(rpc + (f"[{variant}]" if variant else ""), method,
                                typed_inputs(typed, method.client_streaming)))
            first = next(iter(variants.values()))
            out.append(Case(f"{rpc}[raw]", method, raw_inputs(first, method.client_streaming)))
    return out


# --- calling and reading replies -----------------------------------------------------------------------------------
def call(channel: grpc.Channel, method: descriptor.MethodDescriptor, wire, timeout: float):
    """Send already serialized bytes to `method` (a list of them to a stream); returns the decoded reply
    (a list of replies from a stream)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    reply = message_factory.GetMessageClass(method.output_type).FromString
    if method.client_streaming:
        return list(channel.stream_stream(path, request_serializer=None, response_deserializer=reply)(
            iter(wire), timeout=timeout))
    return channel.unary_unary(path, request_serializer=None, response_deserializer=reply)(wire, timeout=timeout)


def nonfinite(reply: message.Message, prefix: str = "") -> list[str]:
    """Fields of a reply that hold NaN or infinity: float scalars, repeated floats, float tensors."""
    found = []
    for field, value in reply.ListFields():
        name = prefix + field.name
        if field.message_type is not None and field.message_type.full_name == TENSOR:
            tensor = codec.tensor_from_pb(value, name)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                found.append(name)
        elif field.message_type is not None:
            for sub in value if field.is_repeated else [value]:
                found += nonfinite(sub, name + ".")
        elif field.type in (field.TYPE_FLOAT, field.TYPE_DOUBLE):
            values = value if field.is_repeated else [value]
            if not all(math.isfinite(v) for v in values):
                found.append(name)
    return found
