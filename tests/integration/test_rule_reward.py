"""A Python rule behind the RewardService contract (backend: python): clients cannot tell it from a model."""

import json

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from demo.rules import exact_match, tidy_answer
from rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from services import codec
from services.config import ConfigError, ServiceConfig, parse
from tests.support.rpc import compare_request, expect_invalid, score_texts
from tests.support.servers import ServerThread

PROMPTS = ["Tell me about the moon: ", "Say hi: "]
RESPONSES = ["the moon is far and bright .", "hi hi ,"]


def rule_config(function: str, **python) -> ServiceConfig:
    return ServiceConfig.model_validate({
        "role": "reward", "backend": "python", "python": {"function": function, **python},
        "server": {"host": "127.0.0.1", "port": 0, "grace_seconds": 1}})


def status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


def test_a_rule_serves_score_and_compare_like_a_model():
    with ServerThread(rule_config("demo.rules:tidy_answer")).start() as server:
        stub = reward_pb2_grpc.RewardServiceStub(server.channel())
        reply = stub.Score(score_texts(PROMPTS, RESPONSES), timeout=30)
        expected = [tidy_answer(p, r) for p, r in zip(PROMPTS, RESPONSES)]
        assert list(reply.values) == pytest.approx(expected)
        assert codec.tensor_from_pb(reply.scores, "s").tolist() == pytest.approx(expected)
        compared = stub.Compare(compare_request(PROMPTS[:1], RESPONSES[:1], ["the moon"]), timeout=30)
        assert compared.chosen_values[0] > compared.rejected_values[0]
        info = stub.Info(common_pb2.InfoRequest(), timeout=30)
        assert info.role == "reward" and info.model_name == "demo.rules:tidy_answer"
        expect_invalid(stub.Score, reward_pb2.ScoreRequest(tokens=codec.ragged_to_pb([torch.tensor([1, 2])])),
                       "tokens")
        expect_invalid(stub.Score, score_texts(["q", "r"], ["a"]), "texts.responses")


def test_kwargs_and_batched_functions(tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"prompt": "2+2=", "answer": "4"}) + "\n")
    cfg = rule_config("demo.rules:exact_match", kwargs={"answers": str(answers)})
    with ServerThread(cfg).start() as server:
        stub = reward_pb2_grpc.RewardServiceStub(server.channel())
        assert list(stub.Score(score_texts(["2+2=", "2+2=", "3+3="], [" 4 ", "5", "6"]), timeout=30).values) == [
            1.0, 0.0, 0.0]
    assert exact_match("2+2=", "4", str(answers)) == 1.0
    with ServerThread(rule_config("tests.support.rules:lengths", batched=True)).start() as server:
        stub = reward_pb2_grpc.RewardServiceStub(server.channel())
        assert list(stub.Score(score_texts(["a", "b"], ["xy", "xyz"]), timeout=30).values) == [2.0, 3.0]


def test_a_failing_or_slow_rule_fails_its_request_and_the_service_keeps_serving():
    with ServerThread(rule_config("tests.support.rules:broken")).start() as server:
        stub = reward_pb2_grpc.RewardServiceStub(server.channel())
        code, details = status(lambda: stub.Score(score_texts(["q"], ["boom"]), timeout=30))
        assert code == grpc.StatusCode.INTERNAL and "KeyError" in details
        assert list(stub.Score(score_texts(["q"], ["fine"]), timeout=30).values) == [1.0]
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # merged into shared calls: only boom's fail
            outcomes = list(pool.map(lambda r: status(lambda: stub.Score(score_texts(["q"], [r]), timeout=30))[0]
                                     if r == "boom" else stub.Score(score_texts(["q"], [r]), timeout=30).values[0],
                                     ["boom", "ok"] * 4))
        assert outcomes == [grpc.StatusCode.INTERNAL, 1.0] * 4
    with ServerThread(rule_config("tests.support.rules:not_a_number")).start() as server:
        stub = reward_pb2_grpc.RewardServiceStub(server.channel())
        for response, why in (("text", "not a number"), ("other", "not finite")):
            code, details = status(lambda: stub.Score(score_texts(["q"], [response]), timeout=30))
            assert code == grpc.StatusCode.INTERNAL and why in details, details
    with ServerThread(rule_config("tests.support.rules:slow", timeout_seconds=0.3)).start() as server:
        stub = reward_pb2_grpc.RewardServiceStub(server.channel())
        code, details = status(lambda: stub.Score(score_texts(["q"], ["a"]), timeout=30))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "timeout_seconds" in details
        health = health_pb2_grpc.HealthStub(server.channel()).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("data, message", [
    ({"role": "reward", "backend": "python"}, "go together"),
    ({"role": "policy", "backend": "python", "python": {"function": "demo.rules:tidy_answer"}}, "reward role only"),
    ({"role": "reward", "python": {"function": "demo.rules:tidy_answer"}}, "go together"),
    ({"role": "reward", "backend": "python", "python": {"function": "no colon"}}, "python.function"),
    ({"role": "reward"}, "model: required"),
])
def test_bad_rule_configs_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        parse(ServiceConfig, data, "reward.yaml")


def test_a_function_that_does_not_exist_stops_the_service_at_start():
    with pytest.raises(RuntimeError, match="has no function 'nope'"):
        ServerThread(rule_config("demo.rules:nope")).start(timeout=30)


def test_concurrent_requests_share_calls_and_a_slow_call_holds_up_no_other():
    import concurrent.futures
    import time

    from tests.support import rules

    rules.CALLS.clear()
    with ServerThread(rule_config("tests.support.rules:recorded", batched=True)).start() as server:
        stub = reward_pb2_grpc.RewardServiceStub(server.channel())
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda i: stub.Score(score_texts([f"q{i}"], ["a"]), timeout=30), range(16)))
        assert all(list(r.values) == [1.0] for r in replies)
        assert sum(rules.CALLS) == 16 and max(rules.CALLS) > 1  # rows of several requests in one call
    with ServerThread(rule_config("tests.support.rules:slow_when_asked", timeout_seconds=5)).start() as server:
        stub = reward_pb2_grpc.RewardServiceStub(server.channel())
        slow = stub.Score.future(score_texts(["q"], ["slow"]), timeout=30)
        time.sleep(0.2)
        start = time.perf_counter()
        assert list(stub.Score(score_texts(["q"], ["fast"]), timeout=30).values) == [0.5]
        assert time.perf_counter() - start < 1.5  # answered while the slow call still runs
        assert list(slow.result().values) == [0.5]
