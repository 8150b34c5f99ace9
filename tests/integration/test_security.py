"""Who may call what: bearer tokens with scopes, TLS and mutual TLS, reflection switched off."""

import asyncio
import hashlib
import shutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from controller.clients import ServiceClients
from rlhf.v1 import common_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.config import ClientSecurity
from tests.support.rpc import text_generate
from tests.support.servers import ServerThread, service_config
from tests.support.tls import make_certificates
from training import synthetic

TRAINER, APP = "trainer-token-0123456789", "app-token-9876543210"


def tokens(tmp_path) -> dict:
    """server.auth: the trainer's token from a file, the application's as a hash."""
    (tmp_path / "trainer").write_text(TRAINER + "\n")
    return {"tokens": [
        {"name": "trainer", "scopes": ["score", "infer", "train"], "file": str(tmp_path / "trainer")},
        {"name": "app", "scopes": ["score"], "sha256": hashlib.sha256(APP.encode()).hexdigest()},
    ]}


def as_client(tmp_path, token: str | None, **tls) -> ClientSecurity:
    if token is None:
        return ClientSecurity(tls=tls or None)
    path = tmp_path / f"client-{hashlib.sha256(token.encode()).hexdigest()[:8]}"
    path.write_text(token)
    return ClientSecurity(token_file=str(path), tls=tls or None)


def status_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def score_request() -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(texts=reward_pb2.TextPairs(prompts=["Q: hi"], responses=["A: hello"]))


def test_every_method_needs_a_token_with_its_scope(tiny_dirs, tmp_path):
    auth = tokens(tmp_path)
    policy_cfg = service_config("policy", tiny_dirs["lm"], server={"auth": auth, "reflection": False,
                                                                 "checkpoint_dir": str(tmp_path / "ckpt")})
    reward_cfg = service_config("reward", tiny_dirs["rm"], server={"auth": auth})
    with ServerThread(policy_cfg).start() as policy_server, ServerThread(reward_cfg).start() as reward_server:
        def policy(token):
            return policy_pb2_grpc.PolicyServiceStub(policy_server.channel(as_client(tmp_path, token)))

        def reward(token):
            return reward_pb2_grpc.RewardServiceStub(reward_server.channel(as_client(tmp_path, token)))

        generate = text_generate(synthetic.train_prompts(2, seed=0), max_new_tokens=4)
        save = common_pb2.SaveCheckpointRequest(path="stolen")
        compare = reward_pb2.CompareRequest(pairs=reward_pb2.ComparePairs(prompts=["q"], chosen=["a"], rejected=["b"]))
        expected = [
            (None, lambda s: s.Info(common_pb2.InfoRequest()), grpc.StatusCode.UNAUTHENTICATED),
            ("not-a-token", lambda s: s.Info(common_pb2.InfoRequest()), grpc.StatusCode.UNAUTHENTICATED),
            (APP, lambda s: s.Info(common_pb2.InfoRequest()), grpc.StatusCode.OK),
            (APP, lambda s: s.Generate(generate), grpc.StatusCode.PERMISSION_DENIED),
            (APP, lambda s: s.SaveCheckpoint(save), grpc.StatusCode.PERMISSION_DENIED),
            (None, lambda s: s.SaveCheckpoint(save), grpc.StatusCode.UNAUTHENTICATED),
            (TRAINER, lambda s: s.Generate(generate), grpc.StatusCode.OK),
        ]
        for token, call, code in expected:
            assert status_of(lambda: call(policy(token))) == code, (token, code)
        assert not (tmp_path / "ckpt" / "stolen").exists()
        assert status_of(lambda: reward(APP).Score(score_request())) == grpc.StatusCode.OK
        assert status_of(lambda: reward(None).Score(score_request())) == grpc.StatusCode.UNAUTHENTICATED
        streamed = reward(None).CompareStream(iter([compare]))
        assert status_of(lambda: list(streamed)) == grpc.StatusCode.UNAUTHENTICATED
        assert len(list(reward(APP).CompareStream(iter([compare, compare])))) == 2

        # probes need no token; reflection answers where it is on and is absent where it is off
        for server in (policy_server, reward_server):
            health = health_pb2_grpc.HealthStub(server.channel())
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        request = reflection_pb2.ServerReflectionRequest(list_services="")

        def list_services(server):
            return list(reflection_pb2_grpc.ServerReflectionStub(server.channel()).ServerReflectionInfo(iter([request])))

        assert status_of(lambda: list_services(policy_server)) == grpc.StatusCode.UNIMPLEMENTED
        names = {s.name for s in list_services(reward_server)[0].list_services_response.service}
        assert "rlhf.v1.RewardService" in names


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make test certificates")
def test_mutual_tls_admits_only_clients_with_a_certificate_of_the_ca(tiny_dirs, tmp_path):
    certs = make_certificates(tmp_path / "certs")
    tls = {"cert_file": certs["server.crt"], "key_file": certs["server.key"], "client_ca_file": certs["ca.crt"]}
    cfg = service_config("reward", tiny_dirs["rm"], server={"tls": tls, "auth": tokens(tmp_path)})
    with ServerThread(cfg).start() as server:
        def score(security: ClientSecurity):
            stub = reward_pb2_grpc.RewardServiceStub(server.channel(security))
            return stub.Score(score_request(), timeout=20)

        trusted = as_client(tmp_path, APP, ca_file=certs["ca.crt"], cert_file=certs["client.crt"],
                            key_file=certs["client.key"])
        reply = score(trusted)
        assert len(reply.values) == 1
        rejected = [
            ClientSecurity(),  # plain text against a TLS port
            as_client(tmp_path, APP, ca_file=certs["ca.crt"]),  # no client certificate
            as_client(tmp_path, APP, ca_file=certs["ca.crt"], cert_file=certs["rogue.crt"],
                      key_file=certs["rogue.key"]),  # a certificate from another CA
            as_client(tmp_path, APP, ca_file=certs["rogue-ca.crt"], cert_file=certs["client.crt"],
                      key_file=certs["client.key"]),  # does not trust the server's CA
        ]
        for security in rejected:
            assert status_of(lambda: score(security)) == grpc.StatusCode.UNAVAILABLE, security
        # TLS does not replace the token: a trusted certificate without a token is still refused
        no_token = as_client(tmp_path, None, ca_file=certs["ca.crt"], cert_file=certs["client.crt"],
                             key_file=certs["client.key"])
        assert status_of(lambda: score(no_token)) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make test certificates")
@pytest.mark.parametrize("with_tls", [True, False])
def test_the_controllers_clients_send_their_token_with_or_without_tls(tiny_dirs, tmp_path, with_tls):
    certs = make_certificates(tmp_path / "certs")
    server = {"auth": tokens(tmp_path)}
    client_tls = {}
    if with_tls:
        server["tls"] = {"cert_file": certs["server.crt"], "key_file": certs["server.key"],
                         "client_ca_file": certs["ca.crt"]}
        client_tls = {"ca_file": certs["ca.crt"], "cert_file": certs["client.crt"], "key_file": certs["client.key"]}
    with ServerThread(service_config("reward", tiny_dirs["rm"], server=server)).start() as reward:
        async def score(token):
            clients = ServiceClients({"reward": reward.address}, timeout=20, retries=0, wait_seconds=5,
                                     security=as_client(tmp_path, token, **client_tls))
            try:
                await clients.wait_ready(30)  # health checks need no token
                infos = await clients.infos()
                reply = await clients.one("reward", lambda s: s.Score, score_request())
                return infos["reward"][0].role, list(reply.values)
            finally:
                await clients.close()

        role, values = asyncio.run(score(TRAINER))
        assert role == "reward" and len(values) == 1
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            asyncio.run(score(None))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
