"""The rollout math the PPO controller runs, as pure torch functions.

Every (B, T) tensor here is right-padded over RESPONSE tokens only, with a
`mask` (B, T) that is 1 (or True) on real response tokens. Prompt tokens never
appear: the caller slices them off before calling in. The losses the services
run (policy, value, entropy, DPO, pairwise ranking) are in services/objectives.py.
Each implementation detail is commented where it lives and listed in
docs/implementation-details.md.
"""

from typing import Optional, Union

import torch

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


class RunningMoments:
    """Running mean and std of RM scores, for reward normalisation."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        """Add the scores x (B,) to the running statistics (Welford's algorithm)."""
        for value in x.tolist():
            self.count += 1
            delta = value - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (value - self.mean)

    @property
    def std(self) -> float:
        """Sample standard deviation of every score seen; 1 before there are two."""
        return (self.m2 / max(self.count - 1, 1)) ** 0.5 or 1.0
