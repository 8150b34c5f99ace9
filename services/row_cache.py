"""The rows of one Train step that a trainer keeps between the step's requests (RowRefs).

PPO trains on the same rollout for several epochs; each epoch's minibatches
are new draws of the same rows. The first request that carries a row may ask
the service to keep it (`keep`: the caller's row ids), and the step's later
requests name it (`cached`) instead of sending it again. Rows are kept for
one (run id, step) at a time, within a token budget: a request of another
step drops them. A named row the service does not hold is NOT_FOUND before
anything is decoded further or applied, and the caller sends the rows.

Only the run that holds the trainer's lease gets this far (the lease is
checked before a request is decoded), so no other caller can read, replace
or fill the rows.
"""

import threading
from collections.abc import Sequence

from rlhf.v1 import common_pb2
from services.errors import InvalidArgument, NotFound

MAX_ID = 1 << 62


def row_ids(ids: Sequence[int], field: str) -> list[int]:
    """Validate row ids: in [0, 2^62), no repeats."""
    ids = list(ids)
    for i in ids:
        if not 0 <= i < MAX_ID:
            raise InvalidArgument(field, f"row id {i} is outside [0, 2^62)")
    if len(set(ids)) != len(ids):
        raise InvalidArgument(field, "repeated row id")
    return ids


class RowCache:
    """Row records (whatever a servicer decodes one row into) of the current step, by row id."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._step: tuple[str, int] | None = None
        self._rows: dict[int, tuple[int, object]] = {}  # id -> (tokens, record)
        self._tokens = 0
        self._lock = threading.Lock()  # requests are decoded on the text threads

    def _at(self, step: tuple[str, int]) -> None:
        if step != self._step:
            self._step, self._rows, self._tokens = step, {}, 0

    def clear(self) -> None:
        """Drop every row (a LoadCheckpoint rolled the trainer back)."""
        with self._lock:
            self._step, self._rows, self._tokens = None, {}, 0

    def keep(self, step: tuple[str, int], ids: list[int], records: list, tokens: list[int]) -> int:
        """Keep records[i] as row ids[i] of `step` while the budget lasts; returns how many were kept."""
        kept = 0
        with self._lock:
            self._at(step)
            for i, record, n in zip(ids, records, tokens):
                old = self._rows.pop(i, None)
                if old is not None:
                    self._tokens -= old[0]
                if self._tokens + n <= self.max_tokens:
                    self._rows[i] = (n, record)
                    self._tokens += n
                    kept += 1
        return kept

    def take(self, step: tuple[str, int], ids: list[int], field: str) -> list:
        """The records of row ids `ids` of `step`; NotFound names the first one not held."""
        with self._lock:
            self._at(step)
            missing = [i for i in ids if i not in self._rows]
            if missing:
                raise NotFound(f"{field}: row {missing[0]} of step {step[1]} is not kept here "
                               f"({len(missing)} of {len(ids)} missing; the service restarted, the step moved on or "
                               "training.row_cache_tokens was reached): send the rows")
            return [self._rows[i][1] for i in ids]

    @property
    def tokens(self) -> int:
        """Tokens held now."""
        return self._tokens


def refs_from_pb(pb: common_pb2.RowRefs, carried: int, field: str = "rows") -> tuple[list[int], list[int]]:
    """(keep ids, cached ids) of a request that carries `carried` rows; keep is empty or one id per row."""
    keep = row_ids(pb.keep, f"{field}.keep")
    cached = row_ids(pb.cached, f"{field}.cached")
    if keep and len(keep) != carried:
        raise InvalidArgument(f"{field}.keep", f"{len(keep)} ids for the {carried} rows the request carries")
    if set(keep) & set(cached):
        raise InvalidArgument(field, "a row id is both carried and named as cached")
    return keep, cached
