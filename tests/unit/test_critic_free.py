"""The critic-free advantages against hand-computed values and naive loops over each group."""

import math

import pytest
import torch

from controller.critic_free import (
    group_stats,
    grpo_advantages,
    per_token,
    reinforce_pp_advantages,
    rloo_advantages,
)
from controller.ppo import compute_rewards


def test_grpo_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # two prompts, three samples each
    adv = grpo_advantages(scores, 3, eps=0.0)
    assert torch.allclose(adv[:3], torch.tensor([-1.0, 0.0, 1.0]))  # mean 2, sample std 1
    assert torch.equal(adv[3:], torch.zeros(3))  # one score for all: no signal, no NaN
    assert torch.allclose(grpo_advantages(scores, 3, scale_rewards=False), torch.tensor([-1.0, 0, 1, 0, 0, 0]))


def test_grpo_matches_a_loop_over_groups():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(20, generator=gen) * 3 + 1
    adv = grpo_advantages(scores, 4)
    for g in range(5):
        group = scores[4 * g: 4 * g + 4].tolist()
        mean = sum(group) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 3)
        for i, r in enumerate(group):
            assert adv[4 * g + i].item() == pytest.approx((r - mean) / (std + 1e-4), rel=1e-5)


def test_rloo_by_hand_and_against_a_loop():
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, 4.0])
    adv = rloo_advantages(scores, 3)
    assert torch.allclose(adv, torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 4.0, 4 - 2.0, 4 - 2.0]))
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(12, generator=gen)
    adv = rloo_advantages(scores, 4)
    for n in range(12):
        g = n // 4
        others = [scores[j].item() for j in range(4 * g, 4 * g + 4) if j != n]
        assert adv[n].item() == pytest.approx(scores[n].item() - sum(others) / 3, rel=1e-5, abs=1e-6)
    assert torch.allclose(adv, 4 / 3 * grpo_advantages(scores, 4, scale_rewards=False), atol=1e-6)
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        rloo_advantages(scores, 1)


def test_reinforce_pp_normalises_kl_shaped_returns_over_the_batch():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float32)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0]])
    rewards, _ = compute_rewards(kl, torch.tensor([1.0, -1.0]), mask, kl_coef=0.5)
    # row 0 rewards: -0.05, -0.1, -0.15 + 1 -> returns 0.7, 0.75, 0.85; row 1: -0.2, -0.25 - 1 -> -1.45, -1.25
    returns = [0.7, 0.75, 0.85, -1.45, -1.25]
    mean = sum(returns) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in returns) / 4)
    adv = reinforce_pp_advantages(rewards, mask)
    expected = torch.tensor([[(x - mean) / std for x in returns[:3]], [(x - mean) / std for x in returns[3:]] + [0.0]])
    assert torch.allclose(adv, expected, atol=1e-5)


def test_group_checks_and_statistics():
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(torch.zeros(6), 4)
    stats = group_stats(torch.tensor([1.0, 1.0, 0.0, 2.0]), 2)
    assert stats["group/zero_variance_fraction"] == 0.5
    assert stats["group/reward_std"] == pytest.approx(math.sqrt(2) / 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    assert torch.equal(per_token(torch.tensor([2.0, -1.0]), mask), torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


def experience(scores, logprobs, ref_logprobs, mask):
    from types import SimpleNamespace

    return SimpleNamespace(scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask, stats={})


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce_pp"])
def test_each_runner_estimator_pays_the_kl_as_documented(algorithm):
    from controller.grpo import critic_free_advantages
    from controller.ppo import compute_approx_kl

    gen = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float32)
    logprobs, ref = -torch.rand(4, 3, generator=gen) * mask, -torch.rand(4, 3, generator=gen) * mask
    scores = torch.tensor([1.0, 0.0, 2.0, -1.0])
    exp = experience(scores, logprobs, ref, mask)
    critic_free_advantages(exp, algorithm, 2, True, 0.3, "k1")
    kl = compute_approx_kl(logprobs, ref, mask, "k1")
    if algorithm == "reinforce_pp":
        expected = reinforce_pp_advantages(compute_rewards(kl, scores, mask, 0.3)[0], mask)
    else:
        shaped = scores - 0.3 * kl.sum(1)
        sequence = grpo_advantages(shaped, 2) if algorithm == "grpo" else rloo_advantages(shaped, 2)
        expected = per_token(sequence, mask)
    assert torch.allclose(exp.advantages, expected, atol=1e-6)
    assert exp.stats["objective/kl"] == pytest.approx(float(kl.sum(1).mean()))
    assert "group/zero_variance_fraction" in exp.stats
