"""RewardService with backend: tei, against a loopback stand-in for a TEI server (bench/tei_standin.py) that
scores with the same tiny reward model the local backend loads."""

import concurrent.futures
import socket

import grpc
import pytest
import torch

from bench.tei_standin import TEIStandIn
from rlhf.v1 import reward_pb2_grpc
from services import codec
from services.config import ConfigError, ServiceConfig, parse
from tests.support.rpc import compare_request, expect_invalid, score_texts
from tests.support.servers import ServerThread, service_config

PROMPTS = ["Write a haiku about rain.", "Name a colour.", "Tell me about the sea and the wind over it."]
RESPONSES = [" Soft rain on the roof", " Blue", " The sea is wide and grey, and the wind is cold."]


def tei_config(model_dir, url: str, **tei) -> ServiceConfig:
    data = service_config("reward", model_dir).model_dump()
    return ServiceConfig.model_validate(data | {"backend": "tei", "tei": {"url": url, **tei}})


@pytest.fixture(scope="module")
def stand_in(tiny_dirs):
    with TEIStandIn(tiny_dirs["rm"], max_batch=4) as server:
        yield server


@pytest.fixture(scope="module")
def tei_reward(tiny_dirs, stand_in):
    with ServerThread(tei_config(tiny_dirs["rm"], stand_in.url, retries=2, max_batch_rows=4)).start() as server:
        yield reward_pb2_grpc.RewardServiceStub(server.channel())


def scores(stub, prompts=PROMPTS, responses=RESPONSES) -> list[float]:
    return list(stub.Score(score_texts(prompts, responses), timeout=60).values)


def expect_code(stub, code: grpc.StatusCode, prompts=PROMPTS[:1], responses=RESPONSES[:1]) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        scores(stub, prompts, responses)
    assert caught.value.code() == code, (caught.value.code(), caught.value.details())
    return caught.value.details()


def test_tei_scores_equal_the_local_backend(tiny_dirs, tei_reward, stubs):
    expected = scores(stubs["reward"])  # the session's local reward service, same model
    got = scores(tei_reward)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-4, rtol=0)
    reply = tei_reward.Compare(compare_request(PROMPTS[:2], RESPONSES[:2], RESPONSES[1:3]), timeout=60)
    chosen, rejected = list(reply.chosen_values), list(reply.rejected_values)
    torch.testing.assert_close(torch.tensor(chosen), torch.tensor(got[:2]), atol=1e-5, rtol=0)
    assert list(reply.p_chosen_values) == pytest.approx(torch.sigmoid(torch.tensor(chosen) - torch.tensor(rejected)).tolist())
    assert codec.tensor_from_pb(reply.chosen_scores, "c").tolist() == pytest.approx(chosen)


def test_rows_go_as_joined_text_with_eos_or_as_pairs(tiny_dirs, stand_in, tei_reward):
    scores(tei_reward, PROMPTS[:1], RESPONSES[:1])
    assert stand_in.last_inputs == [[PROMPTS[0] + RESPONSES[0] + stand_in.tokenizer.eos_token]]
    with ServerThread(tei_config(tiny_dirs["rm"], stand_in.url, input="pair")).start() as server:
        scores(reward_pb2_grpc.RewardServiceStub(server.channel()), PROMPTS[:2], RESPONSES[:2])
    assert stand_in.last_inputs == [[PROMPTS[0], RESPONSES[0]], [PROMPTS[1], RESPONSES[1]]]


def test_concurrent_calls_share_requests_of_at_most_max_batch_rows(stand_in, tei_reward):
    stand_in.batches.clear()
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: scores(tei_reward, prompts[i:i + 1], [f" {2 * i}"]), range(12)))
    assert all(len(r) == 1 for r in results)
    assert sum(stand_in.batches) == 12 and max(stand_in.batches) <= 4 and len(stand_in.batches) < 12


def test_503s_are_retried_until_the_retries_run_out(stand_in, tei_reward):
    stand_in.fail_next = 2
    assert len(scores(tei_reward, PROMPTS[:1], RESPONSES[:1])) == 1 and stand_in.fail_next == 0
    stand_in.fail_next = 3  # retries=2: three attempts
    try:
        details = expect_code(tei_reward, grpc.StatusCode.UNAVAILABLE)
    finally:
        stand_in.fail_next = 0
    assert stand_in.url in details and "3 attempts" in details


def test_a_refusal_or_a_reply_that_is_not_one_score_is_failed_precondition(tiny_dirs, stand_in):
    with ServerThread(tei_config(tiny_dirs["rm"], stand_in.url, max_batch_rows=8)).start() as server:
        stub = reward_pb2_grpc.RewardServiceStub(server.channel())  # asks for more rows than the server takes
        details = expect_code(stub, grpc.StatusCode.FAILED_PRECONDITION, [p + "?" for p in PROMPTS * 2],
                              RESPONSES * 2)
    assert "HTTP 413" in details and "maximum allowed batch size 4" in details
    stand_in.extra_label = "other"  # a model with two labels: which one is the reward?
    try:
        with ServerThread(tei_config(tiny_dirs["rm"], stand_in.url)).start() as server:
            details = expect_code(reward_pb2_grpc.RewardServiceStub(server.channel()), grpc.StatusCode.FAILED_PRECONDITION)
        assert "answers 2 labels (LABEL_0, other)" in details and "tei.label" in details
        with ServerThread(tei_config(tiny_dirs["rm"], stand_in.url, label="nope")).start() as server:
            details = expect_code(reward_pb2_grpc.RewardServiceStub(server.channel()), grpc.StatusCode.FAILED_PRECONDITION)
        assert "no label 'nope'" in details
        with ServerThread(tei_config(tiny_dirs["rm"], stand_in.url, label="LABEL_0")).start() as server:
            picked = scores(reward_pb2_grpc.RewardServiceStub(server.channel()))
    finally:
        stand_in.extra_label = None
    with ServerThread(tei_config(tiny_dirs["rm"], stand_in.url)).start() as server:
        assert picked == scores(reward_pb2_grpc.RewardServiceStub(server.channel()))


def test_tokens_are_refused_with_texts_named(tei_reward):
    from rlhf.v1 import reward_pb2
    request = reward_pb2.ScoreRequest(tokens=codec.token_rows_to_pb([torch.tensor([1, 2, 3])]))
    assert "send texts" in expect_invalid(tei_reward.Score, request, "tokens")


@pytest.mark.parametrize("data, message", [
    ({"role": "reward", "backend": "tei"}, "backend: tei and a .tei. section"),
    ({"role": "value", "backend": "tei", "tei": {"url": "http://tei:8080"}}, "reward role only, not value"),
    ({"role": "reward", "tei": {"url": "http://tei:8080"}}, "backend: tei and a .tei. section"),
    ({"role": "reward", "backend": "tei", "tei": {"url": "http://tei:8080", "input": "text"}}, "tei.input"),
])
def test_bad_backend_configs_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        parse(ServiceConfig, {"model": {"path": "m"}, **data}, "service.yaml")


def test_a_server_that_cannot_be_reached_is_unavailable_naming_its_url(tiny_dirs):
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with ServerThread(tei_config(tiny_dirs["rm"], url, retries=1)).start() as server:
        details = expect_code(reward_pb2_grpc.RewardServiceStub(server.channel()), grpc.StatusCode.UNAVAILABLE)
    assert url in details and "2 attempts" in details
