"""ReferenceService with backend: tgi, against a loopback stand-in for a TGI server (bench/tgi_standin.py)
that computes the prefill log-probs with the same tiny model the local backend loads."""

import socket

import grpc
import pytest
import torch

from bench.tgi_standin import TGIStandIn
from rlhf.v1 import common_pb2, reference_pb2_grpc
from services.batch import Sequences
from services.config import ConfigError, ServiceConfig, parse
from tests.support.rpc import expect_invalid, rows
from tests.support.servers import ServerThread, service_config

TEXTS = [("Write a haiku about rain.", " Soft rain on the roof"),
         ("Name a colour.", " Blue"),
         ("Tell me about the sea and the wind over it.", " The sea is wide and grey, and the wind is cold.")]


def tgi_config(model_dir, url: str, **tgi) -> ServiceConfig:
    data = service_config("reference", model_dir).model_dump()
    return ServiceConfig.model_validate(data | {"backend": "tgi", "tgi": {"url": url, **tgi}})


@pytest.fixture(scope="module")
def stand_in(tiny_dirs):
    with TGIStandIn(tiny_dirs["lm"]) as server:
        yield server


@pytest.fixture(scope="module")
def tgi_reference(tiny_dirs, stand_in):
    with ServerThread(tgi_config(tiny_dirs["lm"], stand_in.url, retries=2)).start() as server:
        yield reference_pb2_grpc.ReferenceServiceStub(server.channel())


@pytest.fixture(scope="module")
def seqs(stand_in) -> Sequences:
    """Rows of mixed lengths that the tokenizer gives back unchanged from their text; the last ends with eos."""
    tok = stand_in.tokenizer
    out = [(tok(p + r, add_special_tokens=False)["input_ids"], len(tok(p, add_special_tokens=False)["input_ids"]))
           for p, r in TEXTS]
    out[-1][0].append(tok.eos_token_id)
    return Sequences([torch.tensor(ids) for ids, _ in out], [p for _, p in out])


def logprobs(stub, seqs: Sequences, temperature: float = 0.0) -> list[torch.Tensor]:
    request = common_pb2.LogProbsRequest(sequences=seqs.to_pb(), temperature=temperature)
    return rows(stub.LogProbs(request, timeout=60).logprobs)


def expect_code(stub, seqs: Sequences, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        logprobs(stub, seqs)
    assert caught.value.code() == code, (caught.value.code(), caught.value.details())
    return caught.value.details()


def test_tgi_logprobs_equal_the_local_backend(tiny_dirs, stand_in, tgi_reference, seqs):
    with ServerThread(service_config("reference", tiny_dirs["lm"])).start() as local:
        expected = logprobs(reference_pb2_grpc.ReferenceServiceStub(local.channel()), seqs)
    got = logprobs(tgi_reference, seqs)
    assert [g.shape for g in got] == [e.shape for e in expected] == [(n,) for n in seqs.response_lengths]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e.float(), atol=1e-4, rtol=0)
    assert set(stand_in.paths) == {"/"}, stand_in.paths  # huggingface_hub posts to the base URL itself
    info = tgi_reference.Info(common_pb2.InfoRequest(), timeout=60)
    assert info.num_parameters == 0 and info.tokenizer_fingerprint


def test_a_prepended_bos_is_the_one_difference_allowed(stand_in, tgi_reference, seqs):
    plain = logprobs(tgi_reference, seqs)
    stand_in.prepend_bos = True
    try:
        with_bos = logprobs(tgi_reference, seqs)
    finally:
        stand_in.prepend_bos = False
    assert [r.shape for r in with_bos] == [r.shape for r in plain]


def test_a_server_tokenising_differently_is_refused_naming_row_and_position(stand_in, tgi_reference, seqs):
    stand_in.shift = (stand_in.tokenizer.decode(seqs.rows[1].tolist()), 3)
    try:
        details = expect_code(tgi_reference, seqs, grpc.StatusCode.FAILED_PRECONDITION)
    finally:
        stand_in.shift = None
    wrong = int(seqs.rows[1][3]) + 1
    assert f"row 1, position 3: the TGI server tokenised to id {wrong} where the policy has {wrong - 1}" in details


def test_503s_are_retried_until_the_retries_run_out(stand_in, tgi_reference, seqs):
    one = seqs.select([0])
    stand_in.fail_next = 2
    assert len(logprobs(tgi_reference, one)) == 1 and stand_in.fail_next == 0
    stand_in.fail_next = 3  # retries=2: three attempts
    try:
        details = expect_code(tgi_reference, one, grpc.StatusCode.UNAVAILABLE)
    finally:
        stand_in.fail_next = 0
    assert stand_in.url in details and "3 attempts" in details


def test_temperatures_other_than_1_are_invalid(tgi_reference, seqs):
    request = common_pb2.LogProbsRequest(sequences=seqs.to_pb(), temperature=0.7)
    details = expect_invalid(tgi_reference.LogProbs, request, "temperature")
    assert "temperature 1 only" in details
    assert len(logprobs(tgi_reference, seqs, temperature=1.0)) == len(seqs)


@pytest.mark.parametrize("data, message", [
    ({"role": "reference", "backend": "tgi"}, "backend: tgi needs a `tgi` section"),
    ({"role": "policy", "backend": "tgi", "tgi": {"url": "http://tgi:8080"}}, "reference role only, not policy"),
    ({"role": "reference", "tgi": {"url": "http://tgi:8080"}}, "tgi: set only with backend: tgi"),
    ({"role": "reference", "backend": "tgi", "tgi": {}}, "tgi.url"),
])
def test_bad_backend_configs_are_refused(data, message):
    with pytest.raises(ConfigError, match=message.replace("`", ".")):
        parse(ServiceConfig, {"model": {"path": "m"}, **data}, "service.yaml")


def test_a_server_that_cannot_be_reached_is_unavailable_naming_its_url(tiny_dirs, seqs):
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with ServerThread(tgi_config(tiny_dirs["lm"], url, retries=1)).start() as server:
        stub = reference_pb2_grpc.ReferenceServiceStub(server.channel())
        details = expect_code(stub, seqs.select([0]), grpc.StatusCode.UNAVAILABLE)
    assert url in details and "2 attempts" in details
