"""Every RPC of the four model services, fuzzed with malformed and extreme requests over real gRPC.

Security hardening: whatever a client sends (tests/support/fuzz.py draws it),
each call ends in OK or a status that blames the request or the service's
state, never INTERNAL, UNKNOWN, UNAVAILABLE or a dropped connection. A
successful reply carries finite numbers (unless a Train step says it was
skipped); the trained weights stay finite and change only on an applied Train
step or a LoadCheckpoint; checkpoints stay inside checkpoint_dir; and after
each RPC's run every service still answers its health check SERVING.

RLHF_FUZZ_EXAMPLES sets the inputs per RPC and strategy (the default keeps the
file under about 45 s on two cores); the inputs sent are counted, printed at
the end ("fuzz: N inputs over M RPCs") and, when RLHF_FUZZ_REPORT names a
file, written to it as JSON.
"""

import collections
import json
import os
import pathlib
from dataclasses import dataclass, field

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings

from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc, value_pb2, value_pb2_grpc
from tests.support import fuzz
from tests.support.rpc import float_rows, rows, sequences_from_generation, text_generate
from tests.support.servers import ServerThread, service_config
from training import synthetic

EXAMPLES = int(os.environ.get("RLHF_FUZZ_EXAMPLES", "30"))  # about 27 s for the whole file on 2 cores
TIMEOUT = 60.0  # seconds; no input the strategies draw is legitimately slower, so DEADLINE_EXCEEDED is a failure
CLEAN = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
         grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
TRAIN_REPLIES = {policy_pb2.PolicyTrainResponse.DESCRIPTOR.full_name, value_pb2.ValueTrainResponse.DESCRIPTOR.full_name}
LOAD_REPLY = common_pb2.LoadCheckpointResponse.DESCRIPTOR.full_name
OUTSIDE = (pathlib.Path("/abs"), pathlib.Path("/tmp/fuzz-abs"))  # where the absolute checkpoint names point
# explained variance is NaN when the returns do not vary (one token, or all equal): documented, not a fault
MAY_BE_NAN = {value_pb2.ValueTrainResponse.DESCRIPTOR.fields_by_name["explained_variance"].name}
CASES = fuzz.cases()


@dataclass
class Tally:
    """Inputs sent per case and the status each ended in."""

    statuses: dict[str, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    rpcs: dict[str, str] = field(default_factory=dict)  # case name -> RPC full name

    def record(self, case: fuzz.Case, code: grpc.StatusCode) -> None:
        self.statuses[case.name][code.name] += 1
        self.rpcs[case.name] = case.method.full_name

    def report(self) -> dict:
        """The JSON report: inputs in all, RPCs, inputs per RPC, statuses per case."""
        per_rpc = collections.Counter()
        for name, counter in self.statuses.items():
            per_rpc[self.rpcs[name]] += sum(counter.values())
        return {"total": sum(per_rpc.values()), "rpcs": len(per_rpc), "examples_per_case": EXAMPLES,
                "per_rpc": dict(per_rpc), "statuses": {name: dict(c) for name, c in self.statuses.items()}}


TALLY = Tally()


def weights(trainer) -> torch.Tensor:
    """Every parameter of a trained model, flattened into one float32 vector (a copy)."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in trainer.module.parameters()])


class Mesh:
    """The four services of this file, each reachable by its full service name."""

    def __init__(self, servers: dict[str, ServerThread], box: pathlib.Path):
        self.by_role = servers
        self.by_service = {s.servicer.service_name: s for s in servers.values()}
        self.channels = {name: s.channel() for name, s in self.by_service.items()}
        self.box = box  # holds the checkpoint_dirs and a sibling that no call may touch
        self.box_before = sorted(p.name for p in box.iterdir())
        self.outside_before = [p.exists() for p in OUTSIDE]

    def channel_of(self, role: str) -> grpc.Channel:
        """The channel to the service of `role` (policy, reference, reward, value)."""
        return self.channels[self.by_role[role].servicer.service_name]

    def bounds(self, case: fuzz.Case) -> fuzz.Bounds:
        """Vocabulary size and context length of the model behind the case's service."""
        limits = self.by_service[case.method.containing_service.full_name].servicer.loaded.limits
        return fuzz.Bounds(limits.vocab_size, limits.max_length)

    def send(self, case: fuzz.Case, sent: fuzz.Sent) -> None:
        """Send one input and check its status, its reply and what it did to the weights."""
        service = case.method.containing_service.full_name
        trainer = getattr(self.by_service[service].servicer, "trainer", None)
        before = (weights(trainer), trainer.version) if trainer is not None else None
        reply, code, details = None, grpc.StatusCode.OK, ""
        try:
            reply = fuzz.call(self.channels[service], case.method, sent.wire, TIMEOUT)
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
        TALLY.record(case, code)
        assert code in CLEAN, f"{case.name} ended in {code.name}: {details}"
        for message in reply if isinstance(reply, list) else [reply] if reply is not None else []:
            if not getattr(message, "skipped", False):  # a skipped step reports the loss that was not finite
                bad = set(fuzz.nonfinite(message)) - MAY_BE_NAN
                assert not bad, f"{case.name} replied non-finite {sorted(bad)}"
        if trainer is not None:
            check_weights(case, trainer, before, reply)

    def check_healthy(self) -> None:
        """Every service SERVING, trained weights finite, nothing written beside or outside checkpoint_dir."""
        for name, channel in self.channels.items():
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30).status
            assert status == health_pb2.HealthCheckResponse.SERVING, f"{name} is {status}"
        for role, server in self.by_role.items():
            trainer = getattr(server.servicer, "trainer", None)
            if trainer is not None:
                assert torch.isfinite(weights(trainer)).all(), f"{role} weights are not finite"
        assert sorted(p.name for p in self.box.iterdir()) == self.box_before, "a call wrote beside checkpoint_dir"
        assert [p.exists() for p in OUTSIDE] == self.outside_before, "a call wrote outside checkpoint_dir"


def check_weights(case: fuzz.Case, trainer, before: tuple[torch.Tensor, int], reply) -> None:
    """Weights stay finite; only an applied Train step (version + 1) or a LoadCheckpoint may change them."""
    old, version = before
    new = weights(trainer)
    assert torch.isfinite(new).all(), f"{case.name} made the weights non-finite"
    output = case.method.output_type.full_name
    if reply is not None and output in TRAIN_REPLIES and not (reply.skipped or reply.replayed):
        assert trainer.version == version + 1 == reply.model_version, (version, trainer.version, reply.model_version)
    elif reply is not None and output == LOAD_REPLY:
        assert trainer.version == reply.model_version
    else:
        assert trainer.version == version, f"{case.name} moved the model version {version} -> {trainer.version}"
        assert torch.equal(old, new), f"{case.name} changed the weights without an applied step"


def prime(mesh: Mesh) -> None:
    """A valid Train on policy and value (the fuzz run takes the trainers' lease) and a training state of it
    on each (what LoadCheckpoint finds): the services work, and the fuzz starts from a live lease."""
    policy = policy_pb2_grpc.PolicyServiceStub(mesh.channel_of("policy"))
    value = value_pb2_grpc.ValueServiceStub(mesh.channel_of("value"))
    reply = policy.Generate(text_generate(synthetic.train_prompts(4, seed=1), seed=2), timeout=60)
    seqs = sequences_from_generation(reply)
    zeros = float_rows([torch.zeros(n) for n in seqs.response_lengths])
    ppo = policy_pb2.PolicyTrainRequest(key=fuzz.fresh_key(), ppo=policy_pb2.PPOObjective(
        sequences=seqs.to_pb(), old_logprobs=float_rows(rows(reply.response_logprobs)), advantages=zeros,
        clip_range=0.2, temperature=1.0))
    assert not policy.Train(ppo, timeout=60).skipped
    old_values = value.Values(value_pb2.ValuesRequest(sequences=seqs.to_pb()), timeout=60).values
    train = value_pb2.ValueTrainRequest(key=fuzz.fresh_key(), sequences=seqs.to_pb(), old_values=old_values,
                                        returns=zeros, clip_range_value=0.2)
    assert not value.Train(train, timeout=60).skipped
    save = common_pb2.SaveCheckpointRequest(path=fuzz.SAVED_STATE, training_state=True, lease=fuzz.FUZZ_LEASE)
    for stub in (policy, value):
        stub.SaveCheckpoint(save, timeout=60)


@pytest.fixture(scope="module")
def mesh(tiny_dirs, tmp_path_factory):
    """The four tiny services, each trained one step by the fuzz run, with checkpoint_dirs in a box."""
    box = tmp_path_factory.mktemp("fuzz")
    models = {"policy": tiny_dirs["lm"], "reference": tiny_dirs["lm"], "reward": tiny_dirs["rm"],
              "value": tiny_dirs["rm"]}
    servers, mesh = {}, None
    try:
        for role, path in models.items():
            # checkpoints1 beside an untouchable checkpoints0: a name that resolves to checkpoint_dir itself
            # must not prune or write its siblings
            (box / f"{role}-checkpoints0").mkdir()
            (box / f"{role}-checkpoints0" / "keep").write_text("not the service's\n")
            ckpt = box / f"{role}-checkpoints1"
            ckpt.mkdir()
            servers[role] = ServerThread(service_config(role, path, server={"checkpoint_dir": str(ckpt)})).start()
        mesh = Mesh(servers, box)
        prime(mesh)
        yield mesh
    finally:
        for channel in mesh.channels.values() if mesh is not None else []:
            channel.close()
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module", autouse=True)
def report(request):
    """At the end of the file: print how many inputs were sent, and write the tally to RLHF_FUZZ_REPORT."""
    yield
    tally = TALLY.report()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nfuzz: {tally['total']} inputs over {tally['rpcs']} RPCs ({len(tally['statuses'])} cases, "
              f"{EXAMPLES} examples per case)")
    if os.environ.get("RLHF_FUZZ_REPORT"):
        pathlib.Path(os.environ["RLHF_FUZZ_REPORT"]).write_text(json.dumps(tally, indent=2, sort_keys=True) + "\n")


def test_every_rpc_has_a_fuzz_case():
    """No RPC of any service goes unfuzzed, and each is also sent bytes that are not its message."""
    methods = {m.full_name for service in fuzz.SERVICES for m in service.methods}
    assert {c.method.full_name for c in CASES} == methods
    assert {c.method.full_name for c in CASES if c.name.endswith("[raw]")} == methods


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rpc_survives_malformed_and_extreme_requests(mesh, case):
    """Each input ends in a clean status with sound weights; the services stay healthy after the run."""

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=False, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example, HealthCheck.filter_too_much])
    @given(sent=case.inputs(mesh.bounds(case)))
    def run(sent):
        mesh.send(case, sent)

    try:
        run()
    finally:
        mesh.check_healthy()
