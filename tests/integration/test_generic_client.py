"""A generic client that knows the services only through server reflection (grpcurl) describes and calls them.

The servers' reflection comes from services.reflection.enable_reflection. The describing server runs in a process
that imports only the services' *_pb2_grpc modules: reference_pb2_grpc does not import reference_pb2, so
without enable_reflection `describe rlhf.v1.ReferenceService` answered "Symbol not found".
"""

import base64
import concurrent.futures
import hashlib
import subprocess
import sys

import grpc
import numpy as np
import pytest

from rlhf.v1 import controller_pb2, policy_pb2, reference_pb2, reward_pb2, tensor_pb2, value_pb2
from services.reflection import enable_reflection, load_proto_files
from tests.support import ROOT
from tests.support.grpcurl import call, describe, grpcurl
from tests.support.servers import ServerThread, service_config

SERVICES = [s for f in load_proto_files() for s in f.services_by_name.values()]  # every rlhf.v1 service
REWARD = reward_pb2.DESCRIPTOR.services_by_name["RewardService"]
FLOAT32 = tensor_pb2.DType.Name(tensor_pb2.DTYPE_FLOAT32)


def grpc_module(service) -> str:
    """The generated *_pb2_grpc module of a service: rlhf/v1/reward.proto -> rlhf.v1.reward_pb2_grpc."""
    return service.file.name.removesuffix(".proto").replace("/", ".") + "_pb2_grpc"


def messages_of(service) -> list:
    """Every message type the service's methods use: their requests, replies and what those contain."""
    found, todo = {}, [t for m in service.methods for t in (m.input_type, m.output_type)]
    while todo:
        message = todo.pop()
        if message.full_name not in found:
            found[message.full_name] = message
            todo += [f.message_type for f in message.fields if f.message_type is not None]
    return sorted(found.values(), key=lambda m: m.full_name)


@pytest.fixture(scope="module")
def stub_server():
    """Every rlhf.v1 service, served by a process that imports only their *_pb2_grpc modules."""
    specs = [f"{grpc_module(s)}={s.full_name}" for s in SERVICES]
    process = subprocess.Popen([sys.executable, "-m", "tests.support.stub_server", *specs], cwd=ROOT,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = process.stdout.readline().strip()
        assert port.isdigit(), f"the stub server did not start (exit code {process.poll()})"
        yield f"127.0.0.1:{port}"
    finally:
        process.stdin.close()
        process.wait(30)


APP_TOKEN = "application-team-token"
BEARER = (f"authorization: Bearer {APP_TOKEN}",)


@pytest.fixture(scope="module")
def reward(tiny_dirs):
    """A reward service with a tiny model on a loopback port, asking for a `score` token as deployed
    (services/serving.py: reflection by enable_reflection, open without a token)."""
    auth = {"tokens": [{"name": "app", "scopes": ["score"], "sha256": hashlib.sha256(APP_TOKEN.encode()).hexdigest()}]}
    with ServerThread(service_config("reward", tiny_dirs["rm"], server={"auth": auth})).start() as server:
        yield server.address


def tensor_from_json(tensor: dict) -> np.ndarray:
    """A float32 rlhf.v1.Tensor as grpcurl prints it (proto field names, raw in base64, shape as strings)."""
    assert tensor["dtype"] == FLOAT32, tensor
    raw = np.frombuffer(base64.b64decode(tensor["raw"]), dtype="<f4")
    return raw.reshape([int(d) for d in tensor["shape"]])


def plain(values: list) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def test_grpcurl_lists_and_describes_every_service_method_and_message(stub_server):
    served = {s.full_name for m in (policy_pb2, reference_pb2, reward_pb2, value_pb2, controller_pb2)
              for s in m.DESCRIPTOR.services_by_name.values()}
    assert {s.full_name for s in SERVICES} == served  # load_proto_files found the model services and the controller
    listed = set(grpcurl(stub_server, "list").split())
    assert served <= listed, listed
    for service in SERVICES:
        text = describe(stub_server, service.full_name)
        assert text.startswith(f"{service.full_name} is a service:"), text
        for method in service.methods:
            assert f"rpc {method.name} (" in text, (method.full_name, text)
            assert describe(stub_server, method.full_name).startswith(f"{method.full_name} is a method:")
        for message in messages_of(service):
            kind = "the entry type for a map field" if message.GetOptions().map_entry else "a message"
            assert describe(stub_server, message.full_name).startswith(f"{message.full_name} is {kind}:")


def test_a_service_missing_from_the_descriptor_pool_fails_at_start():
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=1))
    with pytest.raises(ValueError, match="rlhf.v1.NoSuchService"):
        enable_reflection(server, ["rlhf.v1.NoSuchService"])


def test_the_reward_service_describes_its_methods_as_served(reward):
    for method in REWARD.methods:
        assert describe(reward, method.full_name).startswith(f"{method.full_name} is a method:")


def test_grpcurl_scores_text_pairs_and_reads_plain_values_equal_to_the_raw_tensor(reward):
    prompts, responses = ["Say hi: ", "Count to three: ", "Name a colour: "], ["hi there", "1 2 3", "blue"]
    request = {"texts": {"prompts": prompts, "responses": responses}}
    with pytest.raises(AssertionError, match="Unauthenticated"):
        call(reward, f"{REWARD.full_name}/Score", request)
    reply = call(reward, f"{REWARD.full_name}/Score", request, headers=BEARER)
    scores = tensor_from_json(reply["scores"])
    assert scores.shape == (3,)
    np.testing.assert_array_equal(plain(reply["values"]), scores)  # the same float32 numbers, bit for bit


def test_grpcurl_compares_pairs_and_reads_plain_values_equal_to_the_raw_tensors(reward):
    pairs = {"prompts": ["Q: ", "Say hi: "], "chosen": ["a", "hi there"], "rejected": ["b", "no"]}
    reply = call(reward, f"{REWARD.full_name}/Compare", {"pairs": pairs}, headers=BEARER)
    chosen, rejected = tensor_from_json(reply["chosen_scores"]), tensor_from_json(reply["rejected_scores"])
    p_chosen = tensor_from_json(reply["p_chosen"])
    assert chosen.shape == rejected.shape == p_chosen.shape == (2,)
    np.testing.assert_array_equal(plain(reply["chosen_values"]), chosen)
    np.testing.assert_array_equal(plain(reply["rejected_values"]), rejected)
    np.testing.assert_array_equal(plain(reply["p_chosen_values"]), p_chosen)
    np.testing.assert_allclose(p_chosen, 1 / (1 + np.exp(rejected - chosen)), rtol=1e-5)
