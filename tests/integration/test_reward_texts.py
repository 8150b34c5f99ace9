"""Texts sent to Score are queued as texts and tokenised on the model thread, in one call for the whole batch."""

import dataclasses

import grpc
import pytest
import torch
from transformers import AutoTokenizer

from rlhf.v1 import reward_pb2, reward_pb2_grpc
from services import codec
from services.formatting import encode_for_reward, encode_many_for_reward
from tests.support.metrics import scrape, value
from tests.support.rpc import score_texts
from tests.support.servers import ServerThread, service_config

PROMPTS = ["Say hi: ", "Count to three: ", "Q: what is the sea? A:"]
RESPONSES = ["hi there", "one two three", "salt water"]
BATCHES = {"role": "reward", "queue": "score"}


@pytest.fixture(scope="module")
def tokenizer(tiny_dirs):
    return AutoTokenizer.from_pretrained(tiny_dirs["rm"])


@pytest.fixture
def reward(tiny_dirs):
    """A reward service whose batches wait up to 300 ms for company, so that calls sent together share one."""
    with ServerThread(service_config("reward", tiny_dirs["rm"], batching={"max_wait_ms": 300})).start() as server:
        yield server


def scores(reply) -> torch.Tensor:
    return codec.tensor_from_pb(reply.scores, "scores")


def test_one_tokenizer_call_encodes_a_batch_as_row_by_row(tokenizer):
    prompts, responses = PROMPTS + ["x" * 400], RESPONSES + ["y"]
    for limit in (128, 8, 1):
        assert encode_many_for_reward(tokenizer, prompts, responses, limit) == [
            encode_for_reward(tokenizer, p, r, limit) for p, r in zip(prompts, responses)]
    assert encode_many_for_reward(tokenizer, [], [], 8) == []


def test_texts_and_token_rows_share_a_batch_and_score_as_they_do_alone(reward, tokenizer):
    stub = reward_pb2_grpc.RewardServiceStub(reward.channel())
    limit = reward.servicer.loaded.limits.max_length
    texts = score_texts(PROMPTS, RESPONSES)
    token_rows = [torch.tensor(encode_for_reward(tokenizer, "Say hi: ", r, limit)) for r in ("hey", "hello you")]
    tokens = reward_pb2.ScoreRequest(tokens=codec.ragged_to_pb(token_rows, torch.int32))
    alone_texts, alone_tokens = scores(stub.Score(texts, timeout=60)), scores(stub.Score(tokens, timeout=60))

    before = scrape(reward.servicer.metrics.endpoint.url)
    pending = [stub.Score.future(texts, timeout=60), stub.Score.future(tokens, timeout=60)]
    together_texts, together_tokens = (scores(call.result()) for call in pending)
    after = scrape(reward.servicer.metrics.endpoint.url)

    assert value(after, "rlhf_batch_size_count", **BATCHES) - value(before, "rlhf_batch_size_count", **BATCHES) == 1
    assert torch.allclose(together_texts, alone_texts, atol=1e-5)
    assert torch.allclose(together_tokens, alone_tokens, atol=1e-5)
    expected = sum(map(len, encode_many_for_reward(tokenizer, PROMPTS, RESPONSES, limit))) + sum(
        int(row.numel()) for row in token_rows)  # the texts' real token count, not the estimate they queued with
    scored = value(after, "rlhf_tokens_scored_total", **BATCHES) - value(before, "rlhf_tokens_scored_total", **BATCHES)
    assert scored == expected


def test_a_text_outside_the_models_vocabulary_fails_alone_in_its_batch(reward, tokenizer):
    """A tokenizer that does not match the model (ids past its embedding) fails the one request, not its batch."""
    limit = reward.servicer.loaded.limits.max_length
    cut = max(encode_for_reward(tokenizer, "Q: ", "a", limit)) + 1  # "Q: a" fits the smaller vocabulary
    rare = max(RESPONSES, key=lambda text: max(encode_for_reward(tokenizer, "Q: ", text, limit)))
    assert max(encode_for_reward(tokenizer, "Q: ", rare, limit)) >= cut
    loaded = reward.servicer.loaded
    reward.servicer.loaded = dataclasses.replace(loaded, limits=dataclasses.replace(loaded.limits, vocab_size=cut))
    stub = reward_pb2_grpc.RewardServiceStub(reward.channel())
    pending = [stub.Score.future(score_texts(["Q: "], ["a"]), timeout=60),
               stub.Score.future(score_texts(["Q: ", "Q: "], ["a", rare]), timeout=60)]
    assert scores(pending[0].result()).shape == (1,)
    with pytest.raises(grpc.RpcError) as refused:
        pending[1].result()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "row 1" in refused.value.details() and "vocabulary" in refused.value.details(), refused.value.details()
