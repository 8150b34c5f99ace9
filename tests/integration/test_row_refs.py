"""A trainer keeps a step's rows between its minibatches (RowRefs), for the run that holds its lease only."""

import grpc
import pytest
import torch

from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc, value_pb2_grpc
from tests.support.rpc import (
    expect_invalid,
    ppo_train,
    rows,
    sequences_from_generation,
    text_generate,
    value_train,
)
from tests.support.servers import ServerThread, service_config
from training import synthetic


@pytest.fixture(scope="module")
def trainers(tiny_dirs, tmp_path_factory):
    server = {"checkpoint_dir": str(tmp_path_factory.mktemp("row-refs"))}
    running = {role: ServerThread(service_config(role, tiny_dirs[path], server=server)).start()
               for role, path in (("policy", "lm"), ("value", "rm"))}
    yield running
    for server in running.values():
        server.stop()


@pytest.fixture(scope="module")
def rollout(trainers):
    policy = policy_pb2_grpc.PolicyServiceStub(trainers["policy"].channel())
    reply = policy.Generate(text_generate(synthetic.train_prompts(6, seed=8), max_new_tokens=6, seed=5), timeout=60)
    seqs = sequences_from_generation(reply)
    old = rows(reply.response_logprobs)
    torch.manual_seed(0)
    return seqs, old, [torch.randn(r.numel()) for r in old]


def keeping(request, ids):
    request.rows.keep[:] = ids
    return request


def naming(request, ids):
    """`request` without its rows, naming kept ones instead."""
    request.rows.cached[:] = ids
    objective = request.ppo if "ppo" in request.DESCRIPTOR.fields_by_name else request
    for name in ("sequences", "old_logprobs", "advantages", "old_values", "returns"):
        if name in objective.DESCRIPTOR.fields_by_name:
            objective.ClearField(name)
    return request


def expect_not_found(train, request) -> str:
    """`train(request)` fails with NOT_FOUND (a named row is not kept); its details."""
    with pytest.raises(grpc.RpcError) as caught:
        train(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, (caught.value.code(), caught.value.details())
    return caught.value.details()


def test_named_rows_decode_exactly_as_the_rows_sent(trainers, rollout):
    servicer = trainers["policy"].servicer
    seqs, old, adv = rollout
    full = ppo_train(seqs, old, adv, step=1, minibatch=0, run_id="rows")
    sent = servicer._decode_train(keeping(ppo_train(seqs, old, adv, step=1, run_id="rows"), list(range(10, 16))),
                                  servicer.loaded)[0]
    named = servicer._decode_train(naming(ppo_train(seqs, old, adv, step=1, minibatch=1, run_id="rows"),
                                          [12, 10, 11, 13, 14, 15]), servicer.loaded)[0]
    plain = servicer._decode_train(full, servicer.loaded)[0]
    assert [int(r.numel()) for r in named.seqs.rows] == [int(seqs.rows[i].numel()) for i in (2, 0, 1, 3, 4, 5)]
    for batch in (sent, named):
        order = list(range(6)) if batch is sent else [2, 0, 1, 3, 4, 5]
        for j, i in enumerate(order):
            assert torch.equal(batch.seqs.rows[j], plain.seqs.rows[i])
            assert batch.seqs.prompt_lengths[j] == plain.seqs.prompt_lengths[i]
            assert torch.equal(batch.old_logprobs[j], plain.old_logprobs[i])
            assert torch.equal(batch.advantages[j], plain.advantages[i])


def test_later_minibatches_train_on_kept_rows_and_unknown_rows_change_nothing(trainers, rollout):
    policy = policy_pb2_grpc.PolicyServiceStub(trainers["policy"].channel())
    seqs, old, adv = rollout
    first = policy.Train(keeping(ppo_train(seqs, old, adv, step=2, run_id="rows"), [0, 1, 2, 3, 4, 5]), timeout=120)
    second = policy.Train(naming(ppo_train(seqs, old, adv, step=2, minibatch=1, run_id="rows"), [5, 0, 3]),
                          timeout=120)
    assert second.model_version == first.model_version + 1 and not second.replayed
    assert second.tokens == sum(old[i].numel() for i in (5, 0, 3))
    missing = expect_not_found(policy.Train, naming(ppo_train(seqs, old, adv, step=2, minibatch=2, run_id="rows"),
                                                    [0, 99]))  # never kept: refused before anything is applied
    assert "row 99 of step 2" in missing
    resent = policy.Train(ppo_train(seqs, old, adv, step=2, minibatch=2, run_id="rows"), timeout=120)
    assert resent.model_version == second.model_version + 1  # the same key, sent in full, is applied once
    # the next step's requests drop the last step's rows
    expect_not_found(policy.Train, naming(ppo_train(seqs, old, adv, step=3, run_id="rows"), [0]))


def test_another_run_cannot_reach_the_kept_rows(trainers, rollout):
    policy = policy_pb2_grpc.PolicyServiceStub(trainers["policy"].channel())
    seqs, old, adv = rollout
    policy.Train(keeping(ppo_train(seqs, old, adv, step=4, run_id="rows"), list(range(6))), timeout=120)
    with pytest.raises(grpc.RpcError) as intruder:
        policy.Train(naming(ppo_train(seqs, old, adv, step=4, minibatch=1, run_id="intruder"), [0]), timeout=60)
    assert intruder.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # the lease, before any row is looked up
    named = policy.Train(naming(ppo_train(seqs, old, adv, step=4, minibatch=1, run_id="rows"), [0]), timeout=120)
    assert named.tokens == old[0].numel()


def test_loading_a_training_state_drops_the_kept_rows(trainers, rollout):
    policy = policy_pb2_grpc.PolicyServiceStub(trainers["policy"].channel())
    seqs, old, adv = rollout
    lease = common_pb2.Lease(run_id="rows")
    policy.SaveCheckpoint(common_pb2.SaveCheckpointRequest(path="before-6", training_state=True, lease=lease),
                          timeout=120)
    policy.Train(keeping(ppo_train(seqs, old, adv, step=6, run_id="rows"), list(range(6))), timeout=120)
    policy.LoadCheckpoint(common_pb2.LoadCheckpointRequest(path="before-6", lease=lease), timeout=120)
    expect_not_found(policy.Train, naming(ppo_train(seqs, old, adv, step=6, minibatch=1, run_id="rows"), [0]))


def test_releasing_the_lease_drops_the_kept_rows(trainers, rollout):
    policy = policy_pb2_grpc.PolicyServiceStub(trainers["policy"].channel())
    seqs, old, adv = rollout
    policy.Train(keeping(ppo_train(seqs, old, adv, step=7, run_id="rows"), list(range(6))), timeout=120)
    assert policy.Release(common_pb2.ReleaseRequest(lease=common_pb2.Lease(run_id="rows")), timeout=30).released
    expect_not_found(policy.Train, naming(ppo_train(seqs, old, adv, step=7, minibatch=1, run_id="rows"), [0]))


def test_row_refs_are_validated_and_dpo_takes_none(trainers, rollout):
    policy = policy_pb2_grpc.PolicyServiceStub(trainers["policy"].channel())
    seqs, old, adv = rollout
    for request, words in [(keeping(ppo_train(seqs, old, adv, step=5, run_id="rows"), [1, 2]), "2 ids for the 6 rows"),
                           (naming(ppo_train(seqs, old, adv, step=5, run_id="rows"), [1, 1]), "repeated row id"),
                           (ppo_train(type(seqs)([], []), [], [], step=5, run_id="rows"), "empty batch")]:
        with pytest.raises(grpc.RpcError) as caught:
            policy.Train(request, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in caught.value.details()
    dpo = policy_pb2.PolicyTrainRequest(key=common_pb2.TrainKey(run_id="rows", step=5), dpo=policy_pb2.DPOObjective(
        beta=0.1), rows=common_pb2.RowRefs(cached=[0]))
    assert "row references are for PPO" in expect_invalid(policy.Train, dpo, "rows")


def test_the_value_service_keeps_rows_too(trainers, rollout):
    value = value_pb2_grpc.ValueServiceStub(trainers["value"].channel())
    seqs, old, _ = rollout
    values = [torch.zeros(r.numel()) for r in old]
    returns = [torch.ones(r.numel()) for r in old]
    first = value.Train(keeping(value_train(seqs, values, returns, run_id="rows"), list(range(6))), timeout=120)
    second = value.Train(naming(value_train(seqs, values, returns, minibatch=1, run_id="rows"), [1, 4]), timeout=120)
    assert second.model_version == first.model_version + 1 and second.tokens == old[1].numel() + old[4].numel()
    expect_not_found(value.Train, naming(value_train(seqs, values, returns, minibatch=2, run_id="rows"), [7]))
    info = value.Info(common_pb2.InfoRequest(), timeout=30)
    assert info.model_version == second.model_version  # the refused call applied nothing
