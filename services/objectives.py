"""The losses and per-token model math that the policy and value services execute.

Pure torch functions named after the papers' symbols: the PPO clipped
surrogate and clipped value loss, entropy and log-probs from logits, DPO's
loss, the reward model's pairwise ranking loss and explained variance. Every
(B, T) tensor is right-padded over RESPONSE tokens with a `mask` (B, T) that is
1 on real tokens. The rollout math the controller runs (KL estimators,
per-token rewards, GAE, whitening, KL controllers) is in controller/ppo.py.
Each implementation detail is listed in docs/implementation-details.md.
"""

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

Number = Union[float, torch.Tensor]


# --------------------------------------------------------------------- losses


class PolicyLossOutput(NamedTuple):
    """PPO policy loss (scalar, with grad) and detached diagnostics (scalars)."""

    loss: torch.Tensor
    clipfrac: torch.Tensor  # fraction of tokens with |ratio - 1| > clip_range
    approx_kl: torch.Tensor  # mean 0.5 * (log pi - log pi_old)^2


def _token_mean(x: torch.Tensor, mask: torch.Tensor, normalizer: Optional[Number]) -> torch.Tensor:
    """sum(x * mask) / normalizer, with normalizer defaulting to this batch's token count."""
    # Dividing by the token count of the WHOLE minibatch (passed in by the caller)
    # rather than each micro-batch's own makes micro-batch losses add up to the
    # minibatch loss, so gradient accumulation is exact. clamp: an empty batch
    # contributes 0 rather than NaN.
    if normalizer is None:
        normalizer = mask.sum().clamp(min=1)
    return (x * mask).sum() / normalizer


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    normalizer: Optional[Number] = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7) averaged over response tokens.

    logprobs (B, T) log pi_theta; old_logprobs (B, T) log pi_old from the rollout;
    advantages (B, T); normalizer: token count to divide by (default mask.sum()).
    """
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    # Clipping removes the incentive to move the ratio outside [1-eps, 1+eps];
    # max of the two negated terms = the pessimistic (lower) bound of the surrogate.
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = _token_mean(torch.maximum(pg_loss1, pg_loss2), mask, normalizer)
    with torch.no_grad():
        clipfrac = _token_mean(((ratio - 1.0).abs() > clip_range).to(mask.dtype), mask, normalizer)
        # 0.5 * log_ratio^2 (k2) is >= 0 and low-variance; CleanRL/TRL report it.
        approx_kl = _token_mean(0.5 * log_ratio**2, mask, normalizer)
    return PolicyLossOutput(loss, clipfrac, approx_kl)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
          normalizer: Optional[Number] = None) -> torch.Tensor:
    """KL(pi || pi_ref) with the k3 estimator, (r - 1) - log r with r = pi_ref / pi, averaged over tokens.

    The term GRPO adds to its loss (Shao et al. 2024, eq. 4): unbiased and >= 0 per token, and its gradient
    pulls pi toward pi_ref. logprobs, ref_logprobs, mask: (B, T).
    """
    log_r = ref_logprobs - logprobs  # (B, T)
    return _token_mean(torch.expm1(log_r) - log_r, mask.to(logprobs.dtype), normalizer)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: Optional[float],
    normalizer: Optional[Number] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old +- c) - R)^2) over tokens.

    values (B, T) current V; old_values (B, T) V from the rollout; returns (B, T).
    clip_range_value None disables clipping. Returns (loss, vf_clipfrac), scalars.
    """
    mask = mask.to(values.dtype)
    vf_losses1 = (values - returns) ** 2
    if clip_range_value is None:
        vf_losses2 = vf_losses1
    else:
        # As for the policy, keep the value head from moving far from the rollout's
        # estimate in one update (OpenAI baselines' PPO2, kept by TRL/OpenRLHF).
        c = clip_range_value
        vpredclipped = old_values + torch.clamp(values - old_values, -c, c)
        vf_losses2 = (vpredclipped - returns) ** 2
    loss = 0.5 * _token_mean(torch.maximum(vf_losses1, vf_losses2), mask, normalizer)
    with torch.no_grad():
        vf_clipfrac = _token_mean((vf_losses2 > vf_losses1).to(mask.dtype), mask, normalizer)
    return loss, vf_clipfrac


# ------------------------------------------------------------- logit helpers


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 to float32; float32 and float64 pass through unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last axis: (B, T, V) -> (B, T)."""
    # H = logsumexp(z) - sum(p * z): no log of a softmax that may underflow to 0.
    # H is shift-invariant; subtracting the max keeps both terms small, so large
    # logits do not cancel to float32 rounding error. -inf logits (vocabulary
    # masked by top-k/top-p) have p = 0; clamping them to the lowest finite float
    # keeps 0 * -inf from turning H (or its gradient) into NaN.
    logits = _at_least_float32(logits)
    logits = logits - logits.amax(dim=-1, keepdim=True).detach()
    logits = logits.clamp(min=torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / temperature) at `labels`: (B, T, V), (B, T) -> (B, T)."""
    # Dividing by the sampling temperature makes these the log-probs of the
    # distribution the tokens were actually drawn from, so ratios and KL are right.
    # float32: bf16 log-probs are too coarse once exp() turns them into ratios.
    # Gather the logit and subtract logsumexp: no (B, T, V) log-softmax is kept.
    logits = _at_least_float32(logits)
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def explained_variance_sums(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """[n, sum R, sum R^2, sum (R - V), sum (R - V)^2] over unmasked tokens: additive over shards."""
    keep = mask.bool()
    r = returns[keep].double()
    d = r - values[keep].double()
    return [float(len(r)), float(r.sum()), float((r * r).sum()), float(d.sum()), float((d * d).sum())]


def explained_variance_from_sums(sums: Sequence[float]) -> float:
    """1 - Var(R - V) / Var(R) from `explained_variance_sums` (summed over shards); NaN when Var(R) = 0."""
    # Both variances are the biased ones: the Bessel factors would cancel in the ratio.
    n, r, r2, d, d2 = sums
    var_returns = r2 / n - (r / n) ** 2
    return 1.0 - (d2 / n - (d / n) ** 2) / var_returns if var_returns > 0 else float("nan")


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over unmasked tokens: 1 is perfect, <= 0 is useless. Inputs (B, T)."""
    return explained_variance_from_sums(explained_variance_sums(values, returns, mask))


# --------------------------------------------------- preference-model losses


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss (Rafailov et al. 2023, eq. 7) on per-sequence summed log-probs, each (B,).

    Returns (loss scalar, chosen_rewards (B,), rejected_rewards (B,)); the rewards are
    the implicit beta * log(pi/pi_ref), detached, for accuracy and margin metrics.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    logits = chosen_logratios - rejected_logratios
    # label_smoothing = assumed probability that a preference label is flipped
    # (conservative DPO, TRL's "sigmoid" loss); 0 gives plain DPO.
    losses = (
        -(1.0 - label_smoothing) * F.logsigmoid(beta * logits)
        - label_smoothing * F.logsigmoid(-beta * logits)
    )
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def pairwise_ranking_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: Optional[Number] = None
) -> torch.Tensor:
    """Reward-model loss, InstructGPT eq. 1 for plain pairs: mean -log sigmoid(r_c - r_r - m).

    chosen_scores, rejected_scores: (B,); margin: float or (B,), optional.
    """
    # Bradley-Terry: P(chosen > rejected) = sigmoid(r_c - r_r). The optional margin
    # (Llama 2) asks for a larger gap on pairs labelled as clearly better.
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()
