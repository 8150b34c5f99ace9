"""PPO / InstructGPT math as pure torch functions.

Every (B, T) tensor here is right-padded over RESPONSE tokens only, with a
`mask` (B, T) that is 1 (or True) on real response tokens. Prompt tokens never
appear: the caller slices them off before calling in. Each implementation
detail is commented where it lives and listed in docs/implementation-details.md.
"""

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

Number = Union[float, torch.Tensor]


# ---------------------------------------------------------------- masked stats


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of `x` over entries where `mask` is 1; over all entries, or along `dim`."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance (scalar) of `x` over entries where `mask` is 1; Bessel-corrected if `unbiased`."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        mask_sum = mask.sum()  # sync point: .item() below reads it on the host
        if mask_sum.item() < 2:
            raise ValueError("unbiased masked_var needs at least two unmasked entries")
        var = var * mask_sum / (mask_sum - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise `x` (B, T) to mean 0 / variance 1 over unmasked entries; masked entries -> 0."""
    # Whitening advantages over the whole batch keeps the policy-gradient step size
    # independent of the reward scale, which drifts as the reward model and the KL
    # penalty change (Ziegler et al. 2019; TRL and OpenRLHF do the same).
    # With shift_mean=False the mean is added back: only the scale is normalised.
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)  # padding must stay 0 so sums over it stay 0


# ------------------------------------------------------------ KL and rewards


def compute_approx_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token estimate (B, T) of KL(pi || pi_ref) at the sampled tokens; 0 on padding.

    logprobs: (B, T) log pi(a_t|s_t); ref_logprobs: (B, T) log pi_ref(a_t|s_t).
    estimator: "k1" log(pi/pi_ref), "k2" 0.5*log(r)^2, "k3" (r-1) - log r, with r = pi_ref/pi.
    """
    # Tokens are sampled from pi, so each of these is a single-sample estimate of
    # KL(pi || pi_ref) (Schulman, "Approximating KL divergence", 2020). k1 is
    # unbiased but can be negative per token; it is what InstructGPT's per-token
    # penalty uses. k2 and k3 are always >= 0; k3 is unbiased, k2 low-variance.
    log_ratio = logprobs - ref_logprobs  # (B, T) log pi/pi_ref = -log r
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio**2
    elif estimator == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected k1, k2 or k3")
    return kl * mask.to(kl.dtype)


def compute_rewards(
    kl: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: Number,
    reward_clip: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, T): -kl_coef * KL_t, plus the RM score (B,) on each row's last token.

    Returns (rewards, non_score_reward), both (B, T) and 0 on padding.
    """
    mask = mask.to(kl.dtype)
    # The KL penalty is paid on every token (InstructGPT eq. 2, Ziegler et al.):
    # spread per token it gives the value function a dense signal and keeps each
    # token close to the SFT/reference policy, against reward hacking.
    non_score_reward = -kl_coef * kl * mask  # (B, T)
    if reward_clip is not None:
        # A bounded score keeps rare reward-model outliers from dominating a batch.
        scores = scores.clamp(-reward_clip, reward_clip)
    # The reward model scores the whole (prompt, response), so its score is the
    # return of the final action: it goes on the LAST real response token, the
    # step at which the episode ends. Rows end at different positions, so look
    # up each row's last index where mask == 1 (mask * t peaks there).
    positions = torch.arange(mask.shape[1], device=mask.device, dtype=mask.dtype)
    last = (mask * positions).argmax(dim=1, keepdim=True)  # (B, 1)
    score_reward = torch.zeros_like(non_score_reward).scatter(1, last, scores.to(kl.dtype)[:, None])
    rewards = non_score_reward + score_reward * mask  # "* mask": a row with no tokens gets nothing
    return rewards, non_score_reward


# ------------------------------------------------------------------------ GAE


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    rewards, values, mask: (B, T). Returns (advantages, returns), both (B, T),
    returns = advantages + values, both 0 on padding.
    """
    mask = mask.to(values.dtype)
    lastgaelam = torch.zeros_like(values[:, 0])  # (B,) A_{t+1}
    # The episode ends at the last response token (the RM score is the terminal
    # reward), so the value after it is 0: nothing is bootstrapped past EOS.
    # Starting nextvalues at 0 and walking backwards gives that for every row.
    nextvalues = torch.zeros_like(values[:, 0])  # (B,) V(s_{t+1})
    advantages_reversed = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        gae = delta + gamma * lam * lastgaelam
        # Padded positions are skipped: they keep the state of the next real
        # token, so rows of any length (ragged right end) share one loop.
        real = mask[:, t] > 0
        lastgaelam = torch.where(real, gae, lastgaelam)
        nextvalues = torch.where(real, values[:, t], nextvalues)
        advantages_reversed.append(lastgaelam * mask[:, t])
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = (advantages + values) * mask
    return advantages, returns


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
    logits = _at_least_float32(logits) / temperature
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over unmasked tokens (scalar): 1 is perfect, <= 0 is useless."""
    # Both variances carry the same Bessel factor, so the biased ones give the same ratio.
    var_returns = masked_var(returns, mask, unbiased=False)
    return 1.0 - masked_var(returns - values, mask, unbiased=False) / var_returns


# ---------------------------------------------------------------- KL control


class FixedKLController:
    """Constant KL penalty coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep the coefficient unchanged (same interface as AdaptiveKLController)."""


class AdaptiveKLController:
    """KL coefficient steered towards a target KL (Ziegler et al. 2019, section 2.2)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Scale the coefficient by 1 + clip(KL/target - 1, -0.2, 0.2) * n_steps / horizon.

        current_kl: mean per-sequence KL of the last batch (nats); n_steps: episodes in it.
        """
        # Too much KL -> raise beta; too little -> lower it. Clipping the error at
        # +-20% and scaling by n_steps / horizon makes the change gradual.
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult


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
