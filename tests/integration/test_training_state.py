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


SECRET = "s3cret"


def train(stub, steps, run_id: str = "run", secret: str = SECRET) -> list:
    return [stub.Train(value_train(*minibatch(s), step=s, run_id=run_id, secret=secret), timeout=60) for s in steps]


def save(stub, path: str, run_id: str = "run", secret: str = SECRET, **kw):
    lease = common_pb2.Lease(run_id=run_id, secret=secret)
    return stub.SaveCheckpoint(common_pb2.SaveCheckpointRequest(path=path, lease=lease, **kw), timeout=60)


def load(stub, path: str, run_id: str = "run", secret: str = SECRET):
    lease = common_pb2.Lease(run_id=run_id, secret=secret)
    return stub.LoadCheckpoint(common_pb2.LoadCheckpointRequest(path=path, lease=lease), timeout=60)


def refused(call, code: grpc.StatusCode, fragment: str) -> None:
    """`call()` fails with `code` and a message containing `fragment`."""
    with pytest.raises(grpc.RpcError) as raised:
        call()
    assert raised.value.code() == code and fragment in raised.value.details(), raised.value.details()


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_service_that_loads_its_state_ends_bit_identical_to_one_that_never_stopped(tiny_dirs, tmp_path, zero_stage):
    cfg = service_config("value", tiny_dirs["rm"], server={"checkpoint_dir": str(tmp_path)},
                         training={"zero_stage": zero_stage})
    with ServerThread(cfg).start() as first, ServerThread(cfg).start() as second:
        a = value_pb2_grpc.ValueServiceStub(first.channel())
        b = value_pb2_grpc.ValueServiceStub(second.channel())
        train(a, range(3))
        saved = save(a, "step-3", training_state=True)
        assert saved.model_version == 3 and saved.path.endswith("runs/run/step-3/rank-0")
        assert {"weights.safetensors", "optimizer.safetensors", "state.json", "manifest.json"} <= set(
            saved.files)
        train(a, range(3, 6))
        save(a, "final-a")
        loaded = load(b, "step-3")
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
            save(stub, f"step-{step}", training_state=True, keep=2)
        assert sorted(p.name for p in (tmp_path / "runs" / "run").iterdir()) == ["step-3", "step-4"]
        (tmp_path / "runs" / "run" / "step-3" / "rank-0" / "manifest.json").unlink()  # interrupted while saving
        cases = [("step-3", grpc.StatusCode.FAILED_PRECONDITION, "not a complete training state"),
                 ("step-9", grpc.StatusCode.NOT_FOUND, "no training state"),
                 ("../elsewhere", grpc.StatusCode.INVALID_ARGUMENT, "not a checkpoint name"),
                 ("", grpc.StatusCode.INVALID_ARGUMENT, "required")]
        for path, code, message in cases:
            refused(lambda: load(stub, path), code, message)
        assert load(stub, "step-4").model_version == 4
        refused(lambda: save(stub, "step-5", training_state=True, keep=-1), grpc.StatusCode.INVALID_ARGUMENT, "keep")


def test_a_service_started_with_restore_from_continues_from_the_newest_state(tiny_dirs, tmp_path):
    cfg = service_config("value", tiny_dirs["rm"], server={"checkpoint_dir": str(tmp_path)})
    with ServerThread(cfg).start() as server:
        stub = value_pb2_grpc.ValueServiceStub(server.channel())
        train(stub, range(3))
        save(stub, "step-3", training_state=True)
    (tmp_path / "runs" / "run" / "step-4" / "rank-0").mkdir(parents=True)  # a save that never completed
    restarted = service_config("value", tiny_dirs["rm"], server={"checkpoint_dir": str(tmp_path)},
                               training={"restore_from": "runs/run"})
    with ServerThread(restarted).start() as server:
        stub = value_pb2_grpc.ValueServiceStub(server.channel())
        assert stub.Info(common_pb2.InfoRequest(), timeout=30).model_version == 3
        assert train(stub, [1])[0].replayed  # and its applied keys
        # and its lease: another run cannot take the restarted trainer
        refused(lambda: train(stub, [7], run_id="intruder"), grpc.StatusCode.FAILED_PRECONDITION, "leased")


def test_a_run_owns_its_trainer_until_it_releases_it(tiny_dirs, tmp_path):
    cfg = service_config("value", tiny_dirs["rm"], server={"checkpoint_dir": str(tmp_path)})
    with ServerThread(cfg).start() as server:
        stub = value_pb2_grpc.ValueServiceStub(server.channel())
        first = train(stub, [0, 1])
        version = stub.Info(common_pb2.InfoRequest(), timeout=30).model_version
        for run_id, secret in (("intruder", SECRET), ("run", "guessed"), ("run", "")):
            # another run, or the same run id without its secret: neither new steps nor replays
            refused(lambda: train(stub, [2], run_id, secret), grpc.StatusCode.FAILED_PRECONDITION, "leased")
            refused(lambda: train(stub, [1], run_id, secret), grpc.StatusCode.FAILED_PRECONDITION, "leased")
            refused(lambda: load(stub, "step-1", run_id, secret), grpc.StatusCode.FAILED_PRECONDITION, "leased")
            refused(lambda: save(stub, "step-1", run_id, secret, training_state=True),
                    grpc.StatusCode.FAILED_PRECONDITION, "leased")
            release = stub.Release(common_pb2.ReleaseRequest(lease=common_pb2.Lease(run_id=run_id, secret=secret)))
            assert not release.released
        assert stub.Info(common_pb2.InfoRequest(), timeout=30).model_version == version
        replay = train(stub, [1])[0]
        assert replay.replayed and replay.loss == first[1].loss
        lease = common_pb2.Lease(run_id="run", secret=SECRET)
        assert stub.Release(common_pb2.ReleaseRequest(lease=lease), timeout=30).released
        assert not train(stub, [0], run_id="next")[0].replayed  # a new run may train it now


def test_checkpoint_names_overwrite_and_quota(tiny_dirs, tmp_path):
    cfg = service_config("value", tiny_dirs["rm"],
                         server={"checkpoint_dir": str(tmp_path), "checkpoint_max_count": 3})
    with ServerThread(cfg).start() as server:
        stub = value_pb2_grpc.ValueServiceStub(server.channel())
        for name in ("a\x00b", "x" * 300, "a/b", "..", ".hidden", "../up", "/etc/x", "naïve"):
            for state in (False, True):
                refused(lambda: save(stub, name, training_state=state), grpc.StatusCode.INVALID_ARGUMENT,
                        "not a checkpoint name")
        first = save(stub, "keep-me")
        before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "keep-me").iterdir()}
        refused(lambda: save(stub, "keep-me"), grpc.StatusCode.ALREADY_EXISTS, "overwrite")
        assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "keep-me").iterdir()} == before
        assert save(stub, "keep-me", overwrite=True).path == first.path
        save(stub, "step-1", training_state=True)
        refused(lambda: save(stub, "step-1", training_state=True), grpc.StatusCode.ALREADY_EXISTS, "overwrite")
        save(stub, "second")
        refused(lambda: save(stub, "third"), grpc.StatusCode.RESOURCE_EXHAUSTED, "checkpoint_max_count")
        assert not (tmp_path / "third").exists()
        save(stub, "step-2", training_state=True, keep=1)  # replaces step-1: the count stays within the quota
    tight = service_config("value", tiny_dirs["rm"], server={"checkpoint_dir": str(tmp_path / "small"),
                                                             "checkpoint_max_gb": 1e-4})
    with ServerThread(tight).start() as server:
        stub = value_pb2_grpc.ValueServiceStub(server.channel())
        refused(lambda: save(stub, "big"), grpc.StatusCode.RESOURCE_EXHAUSTED, "checkpoint_max_gb")
        assert not (tmp_path / "small" / "big").exists()
