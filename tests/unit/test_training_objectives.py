"""The training objectives on a tiny model, without training: the InstructGPT K-choose-2 ranking loss, where
the reward is read, and the SFT loss on response tokens only."""

import math

import pytest
import torch
from transformers import AutoTokenizer

from services.formatting import encode_for_reward, encode_sft_example, pad_right
from services.inference import sequence_scores
from tests.support.data import write_jsonl
from tests.support.training import BLAND, GOOD, OCEAN, reward_backbone
from training.checkpoints import load_tokenizer
from training.datasets import load_pairs
from training.rm_objective import RankingObjective, collate_groups, encode_groups, group_rewards, ranking_loss
from training.sft_objective import SFTObjective, response_nll

# --- the InstructGPT K-choose-2 loss ----------------------------------------------------------


def test_k3_ranking_loss_matches_the_three_pairs_computed_by_hand():
    # responses ranked best -> worst score [2, 0, 1]; pairs (0,1) (0,2) (1,2) have diffs 2, 1, -1
    rewards = torch.tensor([2.0, 0.0, 1.0])
    better, worse = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])
    # -log sigmoid(d) = log(1 + e^-d): 0.126928, 0.313262, 1.313262
    assert float(ranking_loss(rewards, better, worse)) == pytest.approx((0.126928 + 0.313262 + 1.313262) / 3, abs=1e-5)
    # margin 0.5 asks for a larger gap: diffs 1.5, 0.5, -1.5 -> 0.201413, 0.474077, 1.701413
    assert float(ranking_loss(rewards, better, worse, margin=0.5)) == pytest.approx(
        (0.201413 + 0.474077 + 1.701413) / 3, abs=1e-5)


def test_margin_raises_the_loss_and_its_pull_on_separated_pairs():
    rewards = torch.tensor([1.0, 0.0], requires_grad=True)
    better, worse = torch.tensor([0]), torch.tensor([1])
    plain = ranking_loss(rewards, better, worse)
    (grad_plain,) = torch.autograd.grad(plain, rewards)
    margined = ranking_loss(rewards, better, worse, margin=2.0)
    (grad_margin,) = torch.autograd.grad(margined, rewards)
    assert float(margined.detach()) > float(plain.detach()) + 0.5
    assert grad_margin[0] < grad_plain[0] < 0  # pushes the better score up harder
    assert float(ranking_loss(rewards, better, worse, margin=0.0).detach()) == pytest.approx(float(plain.detach()))


def ranked_file(tmp_path):
    """Two ranked prompts (K = 3 and K = 4) as a jsonl file."""
    rows = [{"prompt": OCEAN, "ranked_responses": [GOOD, "it is okay .", "well , it is nice ."]},
            {"prompt": "Explain the farm to a friend :\n", "responses": ["a", "b c", "d", "e f g"],
             "ranking": [2, 0, 3, 1]}]
    return write_jsonl(tmp_path / "ranked.jsonl", rows)


class CountingModel(torch.nn.Module):
    """Wraps a classifier to count forward calls and rows; looks like an engine (has .device)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.rows = model, 0, 0
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask):
        self.calls, self.rows = self.calls + 1, self.rows + len(input_ids)
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_each_response_is_forwarded_once_and_all_pairs_share_the_batch(lm_dir, tmp_path):
    records, _ = load_pairs(ranked_file(tmp_path))
    records.append(("Describe the forest for a child :\n", "trees and moss .", "stuff ."))  # a plain pair: K = 2
    tokenizer = load_tokenizer(lm_dir)
    groups = encode_groups(tokenizer, records, max_length=64)
    assert [len(g.sequences) for g in groups] == [3, 4, 2] and [len(g.pairs) for g in groups] == [3, 6, 1]
    model = CountingModel(reward_backbone(lm_dir, tokenizer))
    objective = RankingObjective(tokenizer.pad_token_id)
    with torch.no_grad():
        loss, extra = objective.loss(model, groups, normaliser=10)
    assert (model.calls, model.rows) == (1, 9)  # sum K = 9 sequences for sum C(K,2) = 10 pairs
    # the same loss from a naive loop: score each response alone, then every pair of each prompt
    naive, correct = [], 0
    for group in groups:
        with torch.no_grad():
            scores = [float(model.model(input_ids=torch.tensor([seq])).logits[0, 0]) for seq in group.sequences]
        for b, w in group.pairs:
            naive.append(math.log1p(math.exp(-(scores[b] - scores[w]))))
            correct += scores[b] > scores[w]
    assert float(loss) == pytest.approx(sum(naive) / 10, abs=1e-5)
    assert extra["accuracy"] == correct


def test_reward_is_read_at_the_last_non_pad_token(lm_dir):
    tokenizer = load_tokenizer(lm_dir)
    model = reward_backbone(lm_dir, tokenizer)
    groups = encode_groups(tokenizer, [(OCEAN, GOOD, "it is okay ."), (OCEAN, "short .", "a longer reply here .")], 64)
    batch = collate_groups(groups, tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: some are padded
    with torch.no_grad():
        rewards = group_rewards(model, batch)  # (4,)
        hidden = model.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        last = batch["attention_mask"].sum(1) - 1  # index of the eos that encode_for_reward appends
        by_hand = model.score(hidden[torch.arange(len(last)), last])[:, 0]
        alone = torch.stack([group_rewards(model, collate_groups([g], tokenizer.pad_token_id)) for g in groups]).flatten()
    assert all(batch["input_ids"][i, last[i]] == tokenizer.eos_token_id for i in range(4))
    assert torch.allclose(rewards, by_hand, atol=1e-5)
    assert torch.allclose(rewards, alone, atol=1e-5)  # padding never moves a score


def test_reward_score_is_read_at_the_eos_whatever_the_padding(lm_dir):
    """Scoring rows alone or right-padded in a batch gives the same scores, in training and in the service."""
    tokenizer = load_tokenizer(lm_dir)
    model = reward_backbone(lm_dir, tokenizer)
    texts = [(OCEAN, GOOD), ("Explain the farm to a friend :\n", "it is okay ."), (OCEAN, BLAND)]
    rows = [encode_for_reward(tokenizer, p, r, 64) for p, r in texts]
    ids, mask = pad_right(rows, tokenizer.pad_token_id)
    assert min(map(sum, mask)) < len(ids[0])  # rows of different lengths: some are padded
    with torch.no_grad():
        batched = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0]
        alone = torch.cat([model(input_ids=torch.tensor([row])).logits[:, 0] for row in rows])
        served = sequence_scores(model, [torch.tensor(row) for row in rows], tokenizer.pad_token_id, "cpu")
    assert batched.shape == (3,) and torch.allclose(batched, alone, atol=1e-5)
    assert torch.allclose(served, alone, atol=1e-5)


# --- SFT ---------------------------------------------------------------------------------------


def test_sft_loss_ignores_prompt_tokens(lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    ids, labels = encode_sft_example(tokenizer, OCEAN, GOOD, max_length=64)
    n_prompt = len(tokenizer(OCEAN)["input_ids"])
    labels_t, vocab = torch.tensor([labels]), len(tokenizer)
    logits = torch.randn(1, len(ids), vocab)
    nll, count = response_nll(logits, labels_t)
    assert count == len(ids) - n_prompt  # response tokens + eos
    by_hand = sum(-torch.log_softmax(logits[0, t - 1], -1)[ids[t]] for t in range(n_prompt, len(ids)))
    assert float(nll) == pytest.approx(float(by_hand), rel=1e-5)
    shuffled = logits.clone()
    shuffled[0, : n_prompt - 1] = torch.randn(n_prompt - 1, vocab)  # positions that predict prompt tokens
    assert float(response_nll(shuffled, labels_t)[0]) == pytest.approx(float(nll), rel=1e-6)
    assert SFTObjective(tokenizer.pad_token_id).weight((ids, labels)) == count


def test_k3_kl_by_hand():
    from services.objectives import k3_kl

    logprobs = torch.tensor([[-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    by_hand = ((math.exp(-0.5) - 1 + 0.5) + 0.0) / 2  # (r - 1) - log r per real token, r = exp(ref - logprob)
    assert float(k3_kl(logprobs, ref, mask)) == pytest.approx(by_hand)
    assert float(k3_kl(logprobs, logprobs, mask)) == 0.0

