"""Advantages of the critic-free estimators, as pure torch functions: GRPO, RLOO, REINFORCE++.

None of them needs a value model. GRPO and RLOO sample G responses to each
prompt and compare each response's score with the others of its group;
REINFORCE++ keeps one response per prompt and normalises the KL-shaped
returns over the whole batch. Scores (N,) and rewards (B, T) are laid out
with the G samples of a prompt next to each other: rows [p*G, (p+1)*G) are
prompt p's group. Token tensors follow controller/ppo.py: (B, T), right-
padded over response tokens, with a 0/1 `mask`.
"""

import torch

from controller.ppo import compute_gae, masked_whiten


def groups(scores: torch.Tensor, samples_per_prompt: int) -> torch.Tensor:
    """(N,) scores as (P, G): one row per prompt, its G samples in order."""
    if samples_per_prompt < 1 or scores.shape[0] % samples_per_prompt:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {samples_per_prompt}")
    return scores.reshape(-1, samples_per_prompt)


def grpo_advantages(scores: torch.Tensor, samples_per_prompt: int, scale_rewards: bool = True,
                    eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantage (Shao et al. 2024, eq. 3 of DeepSeekMath): per response i of group g,

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)

    with the group's sample standard deviation (Bessel-corrected, as torch.std,
    TRL and OpenRLHF compute it). scale_rewards=False drops the division
    (Dr. GRPO, Liu et al. 2025): A_i = r_i - mean_g(r), which does not favour
    groups whose rewards happen to be close together. Returns (N,).
    """
    grouped = groups(scores.float(), samples_per_prompt)  # (P, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        std = grouped.std(dim=1, keepdim=True) if samples_per_prompt > 1 else torch.zeros_like(centred[:, :1])
        # a group whose scores are all equal carries no signal: 0, whatever eps (never 0 / 0)
        centred = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return centred.reshape(-1)


def rloo_advantages(scores: torch.Tensor, samples_per_prompt: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, eq. 5): each response's baseline is the mean score of the
    other G - 1 responses to the same prompt,

        A_i = r_i - (1 / (G - 1)) * sum_{j != i} r_j  =  G / (G - 1) * (r_i - mean_g(r)).

    Needs G >= 2. Returns (N,).
    """
    if samples_per_prompt < 2:
        raise ValueError("RLOO needs samples_per_prompt >= 2: the baseline is the other samples' mean")
    grouped = groups(scores.float(), samples_per_prompt)  # (P, G)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (samples_per_prompt - 1)
    return (grouped - others).reshape(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): the return of each token from the per-token rewards (the KL penalty on every
    token, the score on the last: controller/ppo.py:compute_rewards),

        G_t = sum_{s >= t} gamma^(s - t) r_s,

    normalised over every response token of the batch (global batch normalisation, no per-prompt baseline):
    A_t = (G_t - mean(G)) / std(G). Returns (B, T), 0 on padding.
    """
    # GAE with every value 0 and lambda 1 is exactly the discounted return (padding skipped the same way)
    returns, _ = compute_gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return masked_whiten(returns, mask)


def per_token(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence-level advantage (B,) on every response token of its row: (B, T), 0 on padding."""
    return advantages[:, None].to(mask.dtype if mask.is_floating_point() else torch.float32) * mask


def group_stats(scores: torch.Tensor, samples_per_prompt: int) -> dict[str, float]:
    """Mean within-group score std, and the share of groups whose scores are all equal (no learning signal)."""
    grouped = groups(scores.float(), samples_per_prompt)
    spread = grouped.max(dim=1).values - grouped.min(dim=1).values
    std = grouped.std(dim=1) if samples_per_prompt > 1 else torch.zeros(grouped.shape[0])
    return {"group/reward_std": float(std.mean()), "group/zero_variance_fraction": float((spread == 0).float().mean())}
