"""Deadlines free the server: work whose caller has gone is dropped before it runs, or stopped mid-generation."""

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tests.support.rpc import score_texts, text_generate
from training import synthetic

PROMPTS = synthetic.train_prompts(256, seed=11)


def generate_seconds(stub, timeout: float) -> float:
    """Seconds a Generate of 256 prompts x 96 tokens takes (or until its deadline)."""
    start = time.perf_counter()
    try:
        stub.Generate(text_generate(PROMPTS, max_new_tokens=96), timeout=timeout)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return time.perf_counter() - start


def test_an_abandoned_generate_stops_between_decoding_steps(stubs):
    policy = stubs["policy"]
    full = generate_seconds(policy, 300)
    assert full > 1.0, f"the generation must be long enough to abandon ({full:.2f}s)"
    abandoned = generate_seconds(policy, 0.2)
    start = time.perf_counter()
    policy.Generate(text_generate(PROMPTS[:1], max_new_tokens=2), timeout=60)  # waits for the model thread
    freed = time.perf_counter() - start
    assert abandoned < 1.0
    assert freed < full / 3, f"the model stayed busy {freed:.2f}s after the caller gave up (full call {full:.2f}s)"


def test_queued_requests_whose_deadline_passed_are_dropped_unrun(services, stubs):
    policy, batcher = stubs["policy"], services["policy"].servicer.generate_batcher
    dropped = batcher.dropped
    with ThreadPoolExecutor(8) as pool:
        busy = pool.submit(generate_seconds, policy, 300)  # holds the model thread
        time.sleep(0.2)
        late = [pool.submit(generate_seconds, policy, 0.3) for _ in range(6)]  # queued behind it, then given up
        assert all(f.result() < 1.5 for f in late)
        full = busy.result()
    start = time.perf_counter()
    policy.Generate(text_generate(PROMPTS[:1], max_new_tokens=2), timeout=60)
    after = time.perf_counter() - start
    assert batcher.dropped > dropped  # those that reached the queue went unrun
    assert after < full / 3, f"a request after them waited {after:.2f}s: the abandoned ones ran (one takes {full:.2f}s)"


def test_a_score_past_its_deadline_leaves_the_reward_service_answering(stubs):
    reward = stubs["reward"]
    with pytest.raises(grpc.RpcError) as raised:
        reward.Score(score_texts(PROMPTS * 8, ["a long answer " * 20] * len(PROMPTS) * 8), timeout=0.05)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(reward.Score(score_texts(["p"], ["r"]), timeout=30).scores.raw) == 4
