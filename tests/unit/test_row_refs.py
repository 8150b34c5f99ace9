"""RowRefs: which rows a trainer keeps between a step's minibatches, on both ends."""

import grpc
import pytest

from controller.rows import KeptRows, Plan
from rlhf.v1 import common_pb2
from services.errors import InvalidArgument, NotFound
from services.row_cache import RowCache, refs_from_pb


def test_the_cache_gives_back_what_it_kept_for_its_step_only():
    cache = RowCache(max_tokens=100)
    step = ("run", 3)
    assert cache.keep(step, [7, 2], ["row7", "row2"], [10, 20]) == 2
    assert cache.take(step, [2, 7], "rows.cached") == ["row2", "row7"]
    with pytest.raises(NotFound, match="row 9 of step 3"):
        cache.take(step, [7, 9], "rows.cached")
    with pytest.raises(NotFound):  # another run's step: nothing of run's is visible, and run's rows are dropped
        cache.take(("other", 3), [7], "rows.cached")
    with pytest.raises(NotFound):
        cache.take(step, [7], "rows.cached")


def test_the_cache_stops_keeping_at_its_token_budget_and_replaces_an_id():
    cache = RowCache(max_tokens=25)
    step = ("run", 0)
    assert cache.keep(step, [1, 2, 3], ["a", "b", "c"], [10, 10, 10]) == 2 and cache.tokens == 20
    with pytest.raises(NotFound, match="row_cache_tokens"):
        cache.take(step, [3], "rows.cached")
    assert cache.keep(step, [1], ["a2"], [5]) == 1 and cache.tokens == 15
    assert cache.take(step, [1, 2], "rows.cached") == ["a2", "b"]
    assert RowCache(max_tokens=0).keep(step, [1], ["a"], [1]) == 0


def test_row_refs_are_validated():
    assert refs_from_pb(common_pb2.RowRefs(keep=[4, 5], cached=[1]), carried=2) == ([4, 5], [1])
    assert refs_from_pb(common_pb2.RowRefs(cached=[1]), carried=3) == ([], [1])
    for refs, carried, words in [(common_pb2.RowRefs(keep=[1]), 2, "1 ids for the 2 rows"),
                                 (common_pb2.RowRefs(cached=[3, 3]), 0, "repeated"),
                                 (common_pb2.RowRefs(keep=[-1]), 1, "outside"),
                                 (common_pb2.RowRefs(keep=[2], cached=[2]), 1, "both carried and named")]:
        with pytest.raises(InvalidArgument, match=words):
            refs_from_pb(refs, carried)


def test_later_minibatches_name_the_rows_a_rank_keeps_and_send_the_rest():
    rows = KeptRows()
    rows.begin(step=0)
    first = [rows.plan("policy", r, part) for r, part in enumerate(rows.shards("policy", [0, 1, 2, 3], 2))]
    assert [(p.send, p.cached, p.keep) for p in first] == [([0, 1], [], True), ([2, 3], [], True)]
    for r, p in enumerate(first):
        rows.sent("policy", r, p)
    shards = rows.shards("policy", [3, 0, 5, 2], 2)  # each row goes to its keeper while shards stay even
    assert shards == [[0, 5], [3, 2]]
    plans = [rows.plan("policy", r, part) for r, part in enumerate(shards)]
    assert [(p.send, p.cached) for p in plans] == [([5], [0]), ([], [3, 2])]
    assert rows.plan("value", 0, [0]).cached == []  # another role keeps its own rows
    rows.begin(step=1)
    assert rows.plan("policy", 0, [0]).cached == []  # a new step starts empty
    rows.sent("policy", 0, Plan([0], [], True))
    rows.begin(step=1)  # the step's training starts again (after a rollback): its rows may have changed
    assert rows.plan("policy", 0, [0]).cached == []


def test_a_missed_row_sends_the_role_in_full_for_the_rest_of_the_step():
    rows = KeptRows()
    rows.begin(step=0)
    rows.sent("value", 0, Plan([0, 1], [], True))
    rows.missed("value", _Error())
    plan = rows.plan("value", 0, [0, 1])
    assert (plan.send, plan.cached, plan.keep) == ([0, 1], [], False)
    rows.begin(step=1)
    assert rows.plan("value", 0, [0]).keep
    assert not KeptRows(enabled=False).plan("value", 0, [0]).keep


def test_shards_stay_even_whatever_the_ranks_keep():
    rows = KeptRows()
    rows.begin(step=0)
    rows.sent("policy", 0, Plan(list(range(8)), [], True))  # rank 0 keeps everything
    shards = rows.shards("policy", list(range(8)), 3)
    assert sorted(len(s) for s in shards) == [2, 3, 3] and sorted(i for s in shards for i in s) == list(range(8))


class _Error(grpc.aio.AioRpcError):
    def __init__(self):
        super().__init__(grpc.StatusCode.NOT_FOUND, None, None, details="row 0 of step 0 is not kept here")
