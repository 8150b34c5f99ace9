"""PPORunner._train_roles: policy and value go through a step's minibatches each at its own pace, and when one
fails the other stops after the call it has in flight, before the failure reaches the driver."""

import asyncio
from types import SimpleNamespace

import pytest

from controller.config import ControllerConfig
from controller.durability import ServiceRestarted
from controller.loop import PPORunner
from rlhf.v1 import policy_pb2, value_pb2

REPLY = {"policy": policy_pb2.PolicyTrainResponse, "value": value_pb2.ValueTrainResponse}


class OneRankEach:
    """ServiceClients as far as a step's minibatch plan needs them: one rank per role."""

    def ranks(self, role: str) -> int:
        return 1


def runner(**ppo) -> PPORunner:
    cfg = ControllerConfig.model_validate({
        "run_id": "train-roles", "data": {"prompts": "unused.jsonl"},
        "ppo": {"batch_size": 8, "minibatch_size": 4, "ppo_epochs": 3, **ppo}})
    return PPORunner(cfg, OneRankEach(), ["p"] * 8)


class Trainers:
    """Stands in for the Train RPCs: each role's call takes its own time; `fail` = (role, minibatch) raises."""

    def __init__(self, seconds: dict[str, float], fail: tuple[str, int] | None = None):
        self.seconds, self.fail = seconds, fail
        self.events: list[tuple] = []  # (what, role, minibatch index)
        self.calls = {"policy": 0, "value": 0}

    async def train_ranks(self, role: str, index: list[int], request_for) -> list:
        i = self.calls[role]
        self.calls[role] += 1
        self.events.append(("start", role, i))
        await asyncio.sleep(self.seconds[role])
        if self.fail == (role, i):
            self.events.append(("failed", role, i))
            raise ServiceRestarted(role, "restarted")
        self.events.append(("end", role, i))
        return [REPLY[role](model_version=i + 1, loss=float(i))]


def run_roles(r: PPORunner, trainers: Trainers):
    r.train_ranks = trainers.train_ranks
    exp = SimpleNamespace(prompts=["p"] * 8)
    return asyncio.run(r._train_roles(exp, step=0))


def test_a_slow_policy_does_not_hold_the_value_back():
    trainers = Trainers({"policy": 0.03, "value": 0.001})
    replies = run_roles(runner(), trainers)
    assert [reply.model_version for reply in replies["policy"]] == [1, 2, 3, 4, 5, 6]
    assert [reply.model_version for reply in replies["value"]] == [1, 2, 3, 4, 5, 6]
    # the value finished all six of its steps before the policy finished its second
    value_done = trainers.events.index(("end", "value", 5))
    assert value_done < trainers.events.index(("end", "policy", 1)), trainers.events


def test_each_role_gets_the_minibatches_a_lockstep_loop_draws():
    """The same rows in the same order for both roles, and the same as the generator gives a sequential loop."""
    seen: dict[str, list] = {"policy": [], "value": []}

    async def record(role, index, request_for):
        seen[role].append(index)
        return [REPLY[role]()]

    r = runner()
    r.train_ranks = record
    asyncio.run(r._train_roles(SimpleNamespace(prompts=["p"] * 8), step=0))
    expected = runner()._minibatches(SimpleNamespace(prompts=["p"] * 8), step=0)
    assert seen["policy"] == seen["value"] == [index for _, index, _ in expected]
    assert sorted(seen["policy"][0] + seen["policy"][1]) == list(range(8))  # an epoch covers the batch once


@pytest.mark.parametrize("failing, other", [("policy", "value"), ("value", "policy")])
def test_a_failure_stops_the_other_role_after_its_call_in_flight(failing, other):
    trainers = Trainers({failing: 0.02, other: 0.05}, fail=(failing, 1))
    with pytest.raises(ServiceRestarted, match=f"{failing} restarted"):
        run_roles(runner(), trainers)
    failed_at = trainers.events.index(("failed", failing, 1))
    # the other role's call that was in flight when the failure came ended before _train_roles raised ...
    in_flight = [e for e in trainers.events[:failed_at] if e[0] == "start" and e[1] == other][-1]
    assert ("end", other, in_flight[2]) in trainers.events[failed_at:]
    # ... and it started nothing after the failure
    assert not [e for e in trainers.events[failed_at:] if e[0] == "start"], trainers.events
    assert trainers.calls[failing] == 2 and trainers.calls[other] == in_flight[2] + 1
