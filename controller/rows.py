"""Which rows of the current step each trainer rank keeps, so that later minibatches name them (RowRefs).

The first minibatch that sends a row to a rank asks the rank to keep it;
later minibatches of the same step (the next PPO epochs) send only the row
ids of what the rank keeps. Rows go to the rank that keeps them while the
shards stay balanced, so that a data-parallel group needs no row twice.
When a rank does not hold a row it was asked to keep (it restarted, or its
training.row_cache_tokens was reached), the call fails with NOT_FOUND before
anything is applied; the minibatch is sent again in full, and the role's
rows are sent in full for the rest of the step.
"""

import logging
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)

# A rank that misses a named row answers NOT_FOUND; in a data-parallel group the other ranks then abort the step.
MISSED = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED)


@dataclass
class Plan:
    """One rank's part of a minibatch: rows to send (kept by the rank when `keep`) and kept rows to name."""

    send: list[int]
    cached: list[int]
    keep: bool


class KeptRows:
    """Row ids of the current step each (role, rank) keeps."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.step: int | None = None
        self._keeper: dict[str, dict[int, int]] = {}  # role -> row id -> the rank keeping it
        self._off: set[str] = set()  # roles whose rows go in full for the rest of the step

    def begin(self, step: int) -> None:
        """A step's training starts (again): forget what was sent before. The ranks may still hold rows of an
        earlier attempt at this step, with other contents; only rows sent from now on are named."""
        self.step, self._keeper, self._off = step, {}, set()

    def shards(self, role: str, index: list[int], ranks: int) -> list[list[int]]:
        """Minibatch rows `index` cut into one shard per rank, sizes differing by at most one; a row goes to the
        rank keeping it while that rank's shard has room."""
        sizes = [len(index) // ranks + (r < len(index) % ranks) for r in range(ranks)]
        keeper = self._keeper.get(role, {})
        parts: list[list[int]] = [[] for _ in range(ranks)]
        rest = []
        for i in index:
            r = keeper.get(i)
            if r is not None and r < ranks and len(parts[r]) < sizes[r]:
                parts[r].append(i)
            else:
                rest.append(i)
        for i in rest:
            r = next(r for r in range(ranks) if len(parts[r]) < sizes[r])
            parts[r].append(i)
        return parts

    def plan(self, role: str, rank: int, part: list[int]) -> Plan:
        """What to send rank `rank` of `role` for rows `part`."""
        if not self.enabled or role in self._off:
            return Plan(part, [], False)
        keeper = self._keeper.get(role, {})
        cached = [i for i in part if keeper.get(i) == rank]
        named = set(cached)
        return Plan([i for i in part if i not in named], cached, True)

    def sent(self, role: str, rank: int, plan: Plan) -> None:
        """Rank `rank` answered `plan`: it keeps the rows sent with `keep`."""
        if plan.keep:
            keeper = self._keeper.setdefault(role, {})
            for i in plan.send:
                keeper[i] = rank

    def missed(self, role: str, error: grpc.aio.AioRpcError) -> None:
        """A rank of `role` did not hold a named row: send its rows in full for the rest of the step."""
        log.warning("%s: kept rows missing (%s: %s); sending this step's rows in full", role, error.code().name,
                    error.details())
        self._keeper.pop(role, None)
        self._off.add(role)

