"""server.freeze_gc: once the model is loaded, what is alive leaves the cyclic garbage collector's scans."""

import gc
import time

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.servers import ServerThread, service_config


@pytest.fixture
def thawed():
    """gc.freeze() acts on the whole process (here the test runner): start and end with nothing frozen."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def wait_serving(server, timeout: float = 30.0) -> None:
    """Until the health service says SERVING (set after the freeze; the thread's ready signal comes before)."""
    health = health_pb2_grpc.HealthStub(server.channel())
    deadline = time.monotonic() + timeout
    while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "the service never reported SERVING"
        time.sleep(0.05)


def scanned(obj) -> bool:
    """Whether a full collection walks `obj` (the permanent generation is not among gc.get_objects())."""
    return any(o is obj for o in gc.get_objects())


def test_a_loaded_service_takes_its_model_out_of_full_collections(tiny_dirs, thawed):
    with ServerThread(service_config("reward", tiny_dirs["rm"], server={"freeze_gc": True})).start() as server:
        wait_serving(server)
        model = server.servicer.loaded.model
        assert gc.get_freeze_count() > 0
        assert not scanned(model) and not scanned(next(model.parameters()))
        assert server.servicer.batcher is not None and not scanned(server.servicer)


def test_freeze_gc_false_leaves_the_collector_alone(tiny_dirs, thawed):
    with ServerThread(service_config("reward", tiny_dirs["rm"])).start() as server:
        wait_serving(server)
        assert gc.get_freeze_count() == 0
        assert scanned(server.servicer.loaded.model)
