"""Sequence batches: the domain object behind rlhf.v1.SequenceBatch.

A batch holds ragged rows of prompt + response token ids. It validates the
rows against the model (vocabulary, context length) in `from_pb`, and lays
them out for a forward pass in `padded`.
"""

from dataclasses import dataclass

import torch

from rlhf.v1 import tensor_pb2
from services import codec
from services.errors import InvalidArgument


@dataclass(frozen=True)
class ModelLimits:
    """What a model accepts: token ids in [0, vocab_size), at most max_length tokens."""

    vocab_size: int
    max_length: int
    max_batch: int = 4096  # rows per request; servers set it from batching.max_request_rows
    max_tokens: int = 1 << 20  # rows x longest row per request; servers set it from batching.max_request_tokens


def check_token_rows(rows: list[torch.Tensor], field: str, limits: ModelLimits) -> list[torch.Tensor]:
    """Validate token-id rows (range, length, batch size, token budget); return them as int64."""
    if len(rows) > limits.max_batch:
        raise InvalidArgument(f"{field}.lengths", f"{len(rows)} rows exceed the limit of {limits.max_batch}")
    if not rows:
        return []
    lengths = [int(r.numel()) for r in rows]
    check_budget(len(rows), max(lengths), f"{field}.lengths", limits.max_tokens)
    for i, n in enumerate(lengths):
        if n == 0:
            raise InvalidArgument(f"{field}.lengths[{i}]", "empty sequence")
        if n > limits.max_length:
            raise InvalidArgument(f"{field}.lengths[{i}]", f"{n} tokens exceed the model's limit of {limits.max_length}")
    values = torch.cat(rows)  # one range check for the batch; the row is looked up only to name it
    if int(values.min()) < 0 or int(values.max()) >= limits.vocab_size:
        for i, row in enumerate(rows):
            low, high = int(row.min()), int(row.max())
            if low < 0 or high >= limits.vocab_size:
                bad = low if low < 0 else high
                raise InvalidArgument(f"{field}.values",
                                      f"token id {bad} in row {i} is outside the vocabulary [0, {limits.vocab_size})")
    return [r.long() for r in rows]


def tokens_from_pb(pb: tensor_pb2.RaggedTensor, field: str, limits: ModelLimits) -> list[torch.Tensor]:
    """Decode and validate ragged token ids."""
    rows = codec.ragged_from_pb(pb, field, allowed=codec.INT_DTYPES, max_rows=limits.max_batch)
    return check_token_rows(rows, field, limits)


@dataclass
class Sequences:
    """Prompt + response token rows; response j of row i is rows[i][prompt_lengths[i] + j]."""

    rows: list[torch.Tensor]  # B x (P_i + R_i,) int64
    prompt_lengths: list[int]

    @classmethod
    def from_pb(cls, pb: tensor_pb2.SequenceBatch, field: str, limits: ModelLimits) -> "Sequences":
        """Decode and validate; every row needs >= 1 prompt and >= 1 response token."""
        rows = tokens_from_pb(pb.tokens, f"{field}.tokens", limits)
        prompts = list(pb.prompt_lengths)
        if len(prompts) != len(rows):
            raise InvalidArgument(f"{field}.prompt_lengths", f"{len(prompts)} entries for {len(rows)} sequences")
        for i, (p, row) in enumerate(zip(prompts, rows)):
            if not 1 <= p < row.numel():
                raise InvalidArgument(
                    f"{field}.prompt_lengths[{i}]", f"{p} must be >= 1 and leave >= 1 response token of {row.numel()}"
                )
        return cls(rows, prompts)

    def to_pb(self) -> tensor_pb2.SequenceBatch:
        """Encode as ragged tokens (uint16 or int32, codec.token_rows_to_pb) plus prompt lengths."""
        return tensor_pb2.SequenceBatch(tokens=codec.token_rows_to_pb(self.rows), prompt_lengths=self.prompt_lengths)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def response_lengths(self) -> list[int]:
        """Number of response tokens of each row."""
        return [int(r.numel()) - p for r, p in zip(self.rows, self.prompt_lengths)]

    def select(self, index: list[int]) -> "Sequences":
        """The rows at `index`, in that order."""
        return Sequences([self.rows[i] for i in index], [self.prompt_lengths[i] for i in index])

    def padded(self, pad_id: int):
        """Right-padded inputs and response-aligned gather indices.

        Returns input_ids (B, T), attention_mask (B, T), index (B, R) and
        response_mask (B, R): the logits at input position index[i, j] predict
        response token j of row i (so index = prompt_length - 1 + j).
        """
        input_ids, attention_mask = codec.pad_rows(self.rows, pad_id)
        lengths = self.response_lengths
        width = max(lengths)
        steps = torch.arange(width).unsqueeze(0)  # (1, R)
        start = torch.tensor(self.prompt_lengths).unsqueeze(1) - 1  # (B, 1)
        response_mask = (steps < torch.tensor(lengths).unsqueeze(1)).float()  # (B, R)
        index = (start + steps).clamp(max=input_ids.shape[1] - 2) * response_mask.long()
        return input_ids, attention_mask.long(), index, response_mask

    def responses(self) -> list[torch.Tensor]:
        """The response tokens of each row."""
        return [r[p:] for r, p in zip(self.rows, self.prompt_lengths)]


def chunks(n: int, size: int) -> list[list[int]]:
    """Index lists [0..size), [size..2*size), ... covering range(n)."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def budget_chunks(lengths: list[int], size: int, tokens: int, by_length: bool = False) -> list[list[int]]:
    """Index lists of at most `size` rows whose padded size (rows x longest row) stays within `tokens`; a row
    longer than the budget goes alone. Consecutive rows, or with `by_length` rows of similar length together
    (shortest first), which cuts the padding of a batch of mixed lengths."""
    out: list[list[int]] = []
    current: list[int] = []
    width = 0
    order = sorted(range(len(lengths)), key=lengths.__getitem__) if by_length else range(len(lengths))
    for i in order:
        n = lengths[i]
        wider = max(width, n)
        if current and (len(current) >= size or wider * (len(current) + 1) > tokens):
            out.append(current)
            current, wider = [], n
        current.append(i)
        width = wider
    if current:
        out.append(current)
    return out


def check_budget(rows: int, width: int, field: str, budget: int) -> None:
    """Refuse a request whose padded size (rows x longest row, in tokens) exceeds batching.max_request_tokens."""
    if rows * width > budget:
        raise InvalidArgument(field, f"{rows} rows x {width} tokens = {rows * width} exceeds the request budget of "
                              f"{budget} tokens (batching.max_request_tokens)")
