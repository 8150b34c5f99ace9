"""Tests for the PPO math (controller/ppo.py and services/objectives.py): hand-computed values, naive loops,
micro-batch additivity."""

import math

import pytest
import torch

from controller.ppo import (
    AdaptiveKLController,
    FixedKLController,
    compute_approx_kl,
    compute_gae,
    compute_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
)
from services.objectives import (
    dpo_loss,
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    pairwise_ranking_loss,
    policy_loss,
    value_loss,
)

GARBAGE = 99.0  # written into padded positions: it must never reach a result


def close(actual, expected, atol=1e-6):
    """assert_close against a literal (list or float), in float64."""
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


def ragged_batch(seed, B=6, T=7):
    """Random right-padded (mask (B, T), generator); row 0 full length, others 1..T tokens."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    return mask, gen


def randn(mask, gen):
    """Random (B, T) tensor with different garbage (GARBAGE * U[1, 2)) on each padded entry."""
    x = torch.randn(mask.shape, generator=gen, dtype=torch.float64)
    garbage = GARBAGE * (1 + torch.rand(mask.shape, generator=gen, dtype=torch.float64))
    return torch.where(mask > 0, x, garbage)


# ------------------------------------------------------------------ masked stats


def test_masked_mean_and_var_by_hand():
    x = torch.tensor([[1.0, 2.0, GARBAGE], [4.0, GARBAGE, GARBAGE]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # entries 1, 2, 4: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9
    close(masked_mean(x, mask), 7 / 3)
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    close(masked_var(x, mask, unbiased=False), 42 / 9 / 3)
    close(masked_var(x, mask), 42 / 9 / 2)


def test_masked_var_unbiased_needs_two_entries():
    with pytest.raises(ValueError):
        masked_var(torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 0]]))


def test_whiten_gives_mean_zero_var_one_over_masked_entries():
    mask, gen = ragged_batch(0)
    x = 3.0 + 5.0 * randn(mask, gen)
    whitened = masked_whiten(x, mask)
    close(masked_mean(whitened, mask), 0.0)
    close(masked_var(whitened, mask), 1.0, atol=1e-6)
    assert torch.all(whitened[mask == 0] == 0)


def test_whiten_without_shift_keeps_mean():
    mask, gen = ragged_batch(1)
    x = 2.0 + randn(mask, gen)
    whitened = masked_whiten(x, mask, shift_mean=False)
    close(masked_mean(whitened, mask), masked_mean(x, mask))
    close(masked_var(whitened, mask), 1.0, atol=1e-6)


# ------------------------------------------------------------------ KL estimators


def test_approx_kl_estimators_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, GARBAGE]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -GARBAGE]])
    mask = torch.tensor([[True, True, False]])
    # log(pi/pi_ref) = [0.5, -1.0]; r = pi_ref/pi = [e^-0.5, e^1]
    close(compute_approx_kl(logprobs, ref_logprobs, mask), [[0.5, -1.0, 0.0]])
    close(compute_approx_kl(logprobs, ref_logprobs, mask, "k2"), [[0.125, 0.5, 0.0]])
    # k3 = (r - 1) - log r: e^-0.5 - 1 + 0.5 = 0.1065307, e - 1 - 1 = 0.7182818
    close(compute_approx_kl(logprobs, ref_logprobs, mask, "k3"), [[0.10653066, 0.71828183, 0.0]])


def test_approx_kl_k2_k3_nonnegative_and_unknown_rejected():
    mask, gen = ragged_batch(2)
    logprobs, ref_logprobs = randn(mask, gen), randn(mask, gen)
    assert torch.all(compute_approx_kl(logprobs, ref_logprobs, mask, "k2") >= 0)
    assert torch.all(compute_approx_kl(logprobs, ref_logprobs, mask, "k3") >= 0)
    with pytest.raises(ValueError):
        compute_approx_kl(logprobs, ref_logprobs, mask, "k4")


# ------------------------------------------------------------------ rewards


def test_compute_rewards_by_hand():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, GARBAGE]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([1.0, -2.0])
    # -0.5 * kl on every real token; score added on index 2 (row 0) and 1 (row 1)
    rewards, non_score = compute_rewards(kl, scores, mask, kl_coef=0.5)
    close(non_score, [[-0.05, -0.1, -0.15], [-0.2, -0.25, 0.0]])
    close(rewards, [[-0.05, -0.1, 0.85], [-0.2, -2.25, 0.0]])
    # reward_clip=1.5 clips -2.0 to -1.5 before adding
    rewards, _ = compute_rewards(kl, scores, mask, kl_coef=0.5, reward_clip=1.5)
    close(rewards, [[-0.05, -0.1, 0.85], [-0.2, -1.75, 0.0]])


def naive_rewards(kl, scores, mask, kl_coef):
    """Per-row, per-token reference implementation of compute_rewards."""
    rewards = torch.zeros_like(kl)
    for i in range(kl.shape[0]):
        n = int(mask[i].sum())
        for t in range(n):
            rewards[i, t] = -kl_coef * kl[i, t]
        rewards[i, n - 1] += scores[i]
    return rewards


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_compute_rewards_matches_naive_loop(seed):
    mask, gen = ragged_batch(seed)
    kl = randn(mask, gen)
    scores = torch.randn(mask.shape[0], generator=gen, dtype=torch.float64)
    rewards, _ = compute_rewards(kl, scores, mask, kl_coef=0.2)
    close(rewards, naive_rewards(kl, scores, mask, 0.2), atol=1e-12)


def test_compute_rewards_row_without_tokens_gets_nothing():
    rewards, _ = compute_rewards(torch.zeros(1, 3), torch.tensor([5.0]), torch.zeros(1, 3), 0.1)
    assert torch.all(rewards == 0)


# ------------------------------------------------------------------ GAE


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.2, 1.0, GARBAGE]])
    values = torch.tensor([[0.5, 0.4, 0.6], [0.3, 0.5, -GARBAGE]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # gamma * lam = 0.72; value after the last real token is 0.
    # Row 0: d2 = 1 - 0.6 = 0.4                 A2 = 0.4
    #        d1 = 0.9 * 0.6 - 0.4 = 0.14         A1 = 0.14 + 0.72 * 0.4 = 0.428
    #        d0 = 0.9 * 0.4 - 0.5 = -0.14        A0 = -0.14 + 0.72 * 0.428 = 0.16816
    # Row 1: d1 = 1.0 - 0.5 = 0.5                A1 = 0.5
    #        d0 = 0.2 + 0.9 * 0.5 - 0.3 = 0.35   A0 = 0.35 + 0.72 * 0.5 = 0.71
    close(advantages, [[0.16816, 0.428, 0.4], [0.71, 0.5, 0.0]])
    close(returns, [[0.66816, 0.828, 1.0], [1.01, 1.0, 0.0]])


def test_gae_gamma_lam_one_is_return_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, -1.0, 2.0]])
    advantages, returns = compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(returns, [[6.0, 5.0, 3.0]])
    close(advantages, [[5.5, 6.0, 1.0]])


def naive_gae(rewards, values, mask, gamma, lam):
    """Per-row GAE on the real tokens only, in Python floats."""
    advantages = torch.zeros_like(values)
    for i in range(values.shape[0]):
        n = int(mask[i].sum())
        lastgaelam = 0.0
        for t in reversed(range(n)):
            nextvalue = float(values[i, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[i, t]) + gamma * nextvalue - float(values[i, t])
            lastgaelam = delta + gamma * lam * lastgaelam
            advantages[i, t] = lastgaelam
    return advantages, (advantages + values) * mask


@pytest.mark.parametrize("seed", [6, 7, 8])
def test_gae_matches_naive_loop_on_ragged_batch(seed):
    mask, gen = ragged_batch(seed)
    rewards, values = randn(mask, gen), randn(mask, gen)
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.99, lam=0.95)
    expected_adv, expected_ret = naive_gae(rewards, values, mask, 0.99, 0.95)
    close(advantages, expected_adv, atol=1e-10)
    close(returns, expected_ret, atol=1e-10)


# ------------------------------------------------------------------ policy loss


def test_policy_loss_by_hand():
    # ratio = [1.5, 0.7, 1.1], adv = [1, -2, 0.5], clip 0.2; 4th token is padding.
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(1.4, 1.6) = 1.6 (clipped);
    # token 2: max(-0.55, -0.55) = -0.55.  loss = (-1.2 + 1.6 - 0.55) / 3 = -0.05
    old_logprobs = torch.tensor([[-1.0, -1.0, -1.0, GARBAGE]], dtype=torch.float64)
    ratios = torch.tensor([[1.5, 0.7, 1.1, 1.0]], dtype=torch.float64)
    logprobs = (old_logprobs + ratios.log()).requires_grad_()
    advantages = torch.tensor([[1.0, -2.0, 0.5, GARBAGE]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2)
    close(out.loss, -0.05)
    close(out.clipfrac, 2 / 3)
    # 0.5 * (ln 1.5^2 + ln 0.7^2 + ln 1.1^2) / 3
    close(out.approx_kl, 0.0501171667)
    assert not out.clipfrac.requires_grad and not out.approx_kl.requires_grad
    # clipped tokens and padding get no gradient; token 2: d/dlogp = -adv * ratio / 3
    out.loss.backward()
    close(logprobs.grad, [[0.0, 0.0, -0.5 * 1.1 / 3, 0.0]], atol=1e-12)


def naive_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    """Token-by-token PPO clipped surrogate, mean over real tokens."""
    total, count = 0.0, 0
    for i in range(logprobs.shape[0]):
        for t in range(int(mask[i].sum())):
            ratio = math.exp(float(logprobs[i, t] - old_logprobs[i, t]))
            adv = float(advantages[i, t])
            clipped = min(max(ratio, 1 - clip_range), 1 + clip_range)
            total += max(-adv * ratio, -adv * clipped)
            count += 1
    return total / count


@pytest.mark.parametrize("seed", [9, 10, 11])
def test_policy_loss_matches_naive_loop(seed):
    mask, gen = ragged_batch(seed)
    old_logprobs = randn(mask, gen)
    logprobs = old_logprobs + 0.3 * randn(mask, gen)
    advantages = randn(mask, gen)
    out = policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2)
    close(out.loss, naive_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2), atol=1e-10)


def test_ratio_one_gives_zero_clipfrac_and_kl():
    mask, gen = ragged_batch(12)
    logprobs, advantages = randn(mask, gen), randn(mask, gen)
    out = policy_loss(logprobs, logprobs.clone(), advantages, mask, clip_range=0.2)
    close(out.clipfrac, 0.0)
    close(out.approx_kl, 0.0)
    close(out.loss, -masked_mean(advantages, mask))


def test_policy_loss_micro_batches_add_up_to_minibatch():
    mask, gen = ragged_batch(13, B=8)
    old_logprobs, advantages = randn(mask, gen), randn(mask, gen)
    logprobs = (old_logprobs + 0.3 * randn(mask, gen)).requires_grad_()
    full = policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)
    (full_grad,) = torch.autograd.grad(full.loss, logprobs)

    normalizer = mask.sum()  # token count of the whole minibatch
    halves = [
        policy_loss(logprobs[s], old_logprobs[s], advantages[s], mask[s], 0.2, normalizer)
        for s in (slice(0, 4), slice(4, 8))
    ]
    (split_grad,) = torch.autograd.grad(halves[0].loss + halves[1].loss, logprobs)
    close(halves[0].loss + halves[1].loss, full.loss, atol=1e-12)
    close(halves[0].clipfrac + halves[1].clipfrac, full.clipfrac, atol=1e-12)
    close(halves[0].approx_kl + halves[1].approx_kl, full.approx_kl, atol=1e-12)
    close(split_grad, full_grad, atol=1e-12)


# ------------------------------------------------------------------ value loss


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, GARBAGE]])
    old_values = torch.tensor([[0.5, 2.1, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # token 0: (1-2)^2 = 1; clipped V = 0.5 + 0.2 = 0.7 -> (0.7-2)^2 = 1.69 -> 1.69 (clipped)
    # token 1: (2-1)^2 = 1; clipped V = 2.1 - 0.1 = 2.0 -> 1 -> 1 (not clipped)
    # loss = 0.5 * (1.69 + 1) / 2 = 0.6725
    loss, vf_clipfrac = value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    close(loss, 0.6725)
    close(vf_clipfrac, 0.5)
    loss, vf_clipfrac = value_loss(values, old_values, returns, mask, clip_range_value=None)
    close(loss, 0.5)  # 0.5 * (1 + 1) / 2
    close(vf_clipfrac, 0.0)


def test_value_loss_micro_batches_add_up_to_minibatch():
    mask, gen = ragged_batch(14, B=8)
    values, old_values, returns = randn(mask, gen), randn(mask, gen), randn(mask, gen)
    full, full_clip = value_loss(values, old_values, returns, mask, 0.2)
    halves = [
        value_loss(values[s], old_values[s], returns[s], mask[s], 0.2, mask.sum())
        for s in (slice(0, 4), slice(4, 8))
    ]
    close(halves[0][0] + halves[1][0], full, atol=1e-12)
    close(halves[0][1] + halves[1][1], full_clip, atol=1e-12)


# ------------------------------------------------------------------ logits


def test_entropy_by_hand_and_stable():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf]]])
    # uniform over 4 -> ln 4; p = [0.25, 0.75] -> 0.25 ln 4 + 0.75 ln(4/3) = 0.5623351
    close(entropy_from_logits(logits), [[1.3862944, 0.5623351]])
    close(entropy_from_logits(torch.tensor([[[1000.0, 1000.0]]])), [[math.log(2.0)]])


def test_logprobs_from_logits_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    labels = torch.tensor([[1]])
    close(logprobs_from_logits(logits, labels), [[math.log(0.75)]])  # -0.2876821
    # temperature 2: p1 = sqrt(3) / (1 + sqrt(3)) -> log = -0.4557464
    close(logprobs_from_logits(logits, labels, temperature=2.0), [[-0.4557464]])


def test_logprobs_from_logits_matches_log_softmax_gather():
    gen = torch.Generator().manual_seed(15)
    logits = torch.randn(3, 5, 11, generator=gen)
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, labels[..., None])[..., 0]
    close(logprobs_from_logits(logits, labels, temperature=0.7), expected, atol=1e-5)


def test_explained_variance_by_hand():
    returns = torch.tensor([[1.0, 2.0, 3.0, GARBAGE]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # R - V = [0, 0, 1]: var 2/9; var R = 2/3 -> 1 - 1/3
    close(explained_variance(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), returns, mask), 2 / 3)
    close(explained_variance(returns, returns, mask), 1.0)
    close(explained_variance(torch.zeros_like(returns), returns, mask), 0.0)


# ------------------------------------------------------------------ KL control


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=512)
    assert ctl.value == 0.05


def test_adaptive_kl_controller_follows_ziegler_formula():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 9 > target: error 0.5 clipped to 0.2; mult = 1 + 0.2 * 256 / 10000 = 1.00512
    ctl.update(current_kl=9.0, n_steps=256)
    close(ctl.value, 0.100512, atol=1e-12)
    # KL 5.4 < target: error -0.1; mult = 1 - 0.1 * 256 / 10000 = 0.99744
    ctl.update(current_kl=5.4, n_steps=256)
    close(ctl.value, 0.100512 * 0.99744, atol=1e-12)
    # KL 0: error -1 clipped to -0.2, so the coefficient goes down, by 0.512%
    before = ctl.value
    ctl.update(current_kl=0.0, n_steps=256)
    assert ctl.value < before
    close(ctl.value, before * 0.99488, atol=1e-12)


# ------------------------------------------------------------------ preference losses


def test_dpo_loss_by_hand():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-3.0])
    rc, rr = torch.tensor([-2.0]), torch.tensor([-2.0])
    # chosen log-ratio 1, rejected -1; beta * (1 - (-1)) = 1 -> -logsigmoid(1) = 0.3132617
    loss, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.5)
    close(loss, 0.3132617)
    close(chosen_rewards, [0.5])
    close(rejected_rewards, [-0.5])
    # label smoothing 0.1: 0.9 * 0.3132617 + 0.1 * -logsigmoid(-1) (= 1.3132617)
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    close(loss, 0.4132617)
    # policy == reference: ln 2 whatever beta
    loss, _, _ = dpo_loss(rc, rr, rc, rr, beta=3.0)
    close(loss, math.log(2.0))


def test_dpo_loss_gradient_raises_chosen_lowers_rejected():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-1.0], requires_grad=True)
    loss, chosen_rewards, _ = dpo_loss(pc, pr, torch.tensor([-1.0]), torch.tensor([-1.0]), 0.1)
    loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises chosen, lowers rejected
    assert not chosen_rewards.requires_grad


def test_pairwise_ranking_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    # diffs [1, 0]: (0.3132617 + ln 2) / 2
    close(pairwise_ranking_loss(chosen, rejected), 0.5032044)
    # margin 1: diffs [0, -1]: (ln 2 + 1.3132617) / 2
    close(pairwise_ranking_loss(chosen, rejected, margin=1.0), 1.0032044)
    close(pairwise_ranking_loss(chosen, rejected, margin=torch.tensor([1.0, 1.0])), 1.0032044)
