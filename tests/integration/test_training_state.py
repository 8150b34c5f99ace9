"""SaveCheckpoint(training_state) and LoadCheckpoint over gRPC: a service that loads a saved state continues
exactly as one that never stopped, and nothing but a complete state of its own kind is loaded."""

import grpc
import pytest
import torch

from rlhf.v1 import common_pb2, value_pb2_grpc
from services.batch import Sequences
from tests.support.mesh import saved_weights
from tests.support.rpc import value_train
from tests.support.servers import ServerThread, service_config


def minibatch(step: int) -> tuple:
    """A value minibatch that depends on the step only: (sequences, old values, returns)."""
    gen = torch.Generator().manual_seed(step)
    rows = [torch.randint(3, 800, (int(n),), generator=gen) for n in torch.randint(6, 12, (4,), generator=gen)]
    seqs = Sequences(rows, [3] * len(rows))
    old = [torch.randn(len(r) - 3, generator=gen) for r in rows]
    returns = [torch.randn(len(r) - 3, generator=gen) for r in rows]
    return seqs, old, returns


def train(stub, steps) -> list:
    return [stub.Train(value_train(*minibatch(s), step=s, run_id="run"), timeout=60) for s in steps]


def save(stub, path: str, **kw):
    return stub.SaveCheckpoint(common_pb2.SaveCheckpointRequest(path=path, **kw), timeout=60)


def load(stub, path: str):
    return stub.LoadCheckpoint(common_pb2.LoadCheckpointRequest(path=path), timeout=60)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_service_that_loads_its_state_ends_bit_identical_to_one_that_never_stopped(tiny_dirs, tmp_path, zero_stage):
    cfg = service_config("value", tiny_dirs["rm"], server={"checkpoint_dir": str(tmp_path)},
                         training={"zero_stage": zero_stage})
    with ServerThread(cfg).start() as first, ServerThread(cfg).start() as second:
        a = value_pb2_grpc.ValueServiceStub(first.channel())
        b = value_pb2_grpc.ValueServiceStub(second.channel())
        train(a, range(3))
        saved = save(a, "runs/run/step-3", training_state=True)
        assert saved.model_version == 3 and saved.path.endswith("runs/run/step-3/rank-0")
        assert {"weights.safetensors", "optimizer.safetensors", "state.json", "manifest.json"} <= set(
            saved.files)
        train(a, range(3, 6))
        save(a, "final-a")
        loaded = load(b, "runs/run/step-3")
        assert loaded.model_version == 3 and loaded.instance_id != saved.instance_id
        replayed = train(b, [2])[0]  # the applied record came with the state
        assert replayed.replayed and replayed.model_version == 3
        assert [r.replayed for r in train(b, range(3, 6))] == [False] * 3
        save(b, "final-b")
    a_weights, b_weights = saved_weights(tmp_path / "final-a"), saved_weights(tmp_path / "final-b")
    assert all(torch.equal(a_weights[k], b_weights[k]) for k in a_weights)


def test_only_a_complete_state_inside_the_checkpoint_dir_is_loaded_and_old_ones_are_pruned(tiny_dirs, tmp_path):
    cfg = service_config("value", tiny_dirs["rm"], server={"checkpoint_dir": str(tmp_path)})
    with ServerThread(cfg).start() as server:
        stub = value_pb2_grpc.ValueServiceStub(server.channel())
        for step in range(1, 5):
            train(stub, [step])
            save(stub, f"runs/r/step-{step}", training_state=True, keep=2)
        assert sorted(p.name for p in (tmp_path / "runs" / "r").iterdir()) == ["step-3", "step-4"]
        (tmp_path / "runs" / "r" / "step-3" / "rank-0" / "manifest.json").unlink()  # interrupted while saving
        cases = [("runs/r/step-3", grpc.StatusCode.FAILED_PRECONDITION, "not a complete training state"),
                 ("runs/r/step-9", grpc.StatusCode.FAILED_PRECONDITION, "not a complete training state"),
                 ("../elsewhere", grpc.StatusCode.INVALID_ARGUMENT, "leaves the checkpoint_dir"),
                 ("", grpc.StatusCode.INVALID_ARGUMENT, "required")]
        for path, code, message in cases:
            with pytest.raises(grpc.RpcError) as raised:
                load(stub, path)
            assert raised.value.code() == code and message in raised.value.details(), (path, raised.value.details())
        assert load(stub, "runs/r/step-4").model_version == 4
        with pytest.raises(grpc.RpcError) as raised:
            save(stub, "runs/r/step-5", training_state=True, keep=-1)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_service_started_with_restore_from_continues_from_the_newest_state(tiny_dirs, tmp_path):
    cfg = service_config("value", tiny_dirs["rm"], server={"checkpoint_dir": str(tmp_path)})
    with ServerThread(cfg).start() as server:
        stub = value_pb2_grpc.ValueServiceStub(server.channel())
        train(stub, range(3))
        save(stub, "runs/r/step-2", training_state=False)  # a plain from_pretrained save is not a state
        save(stub, "runs/r/step-3", training_state=True)
    restarted = service_config("value", tiny_dirs["rm"], server={"checkpoint_dir": str(tmp_path)},
                               training={"restore_from": "runs/r"})
    with ServerThread(restarted).start() as server:
        stub = value_pb2_grpc.ValueServiceStub(server.channel())
        assert stub.Info(common_pb2.InfoRequest(), timeout=30).model_version == 3
        assert train(stub, [1])[0].replayed  # and its applied keys
