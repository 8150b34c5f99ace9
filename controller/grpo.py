"""The critic-free runners: GRPO, RLOO and REINFORCE++ iterations against policy, reference and reward.

Each iteration samples `critic_free.samples_per_prompt` responses to each of
ppo.batch_size / G prompts (one Generate of the prompts repeated, every row
seeded by its index, so a split batch samples the same tokens), scores them
and takes the reference log-probs, turns the scores into advantages with
the configured estimator (controller/critic_free.py), and trains the policy
with the same clipped surrogate as PPO. No value service is needed or asked.

The KL to the reference goes into the reward with the configured estimator
(ppo.kl_estimator, ppo.kl_coef): for GRPO and RLOO each response's score
loses kl_coef x its summed KL before the group comparison; REINFORCE++ pays
it per token, as PPO does. With critic_free.kl_in_loss it goes into the
policy loss instead (k3, as GRPO's paper), and the scores stay as they are.
critic_free.loss_aggregation averages the loss over tokens or over
responses.
"""



from controller import critic_free, ppo
from controller.loop import (
    POLICY_ADDITIVE,
    Experience,
    PPORunner,
    policy_request,
)
from rlhf.v1 import policy_pb2


def critic_free_advantages(exp: Experience, algorithm: str, group: int, scale_rewards: bool, kl_coef: float,
                           estimator: str) -> None:
    """Per-token advantages (B, T) of the estimator, and the iteration's statistics (fills exp)."""
    kl = ppo.compute_approx_kl(exp.logprobs, exp.ref_logprobs, exp.mask, estimator)  # (B, T)
    if algorithm == "reinforce_pp":
        rewards, _ = ppo.compute_rewards(kl, exp.scores, exp.mask, kl_coef)
        advantages = critic_free.reinforce_pp_advantages(rewards, exp.mask)
    else:
        shaped = exp.scores.float() - kl_coef * kl.sum(1)  # (B,) the score less the response's KL
        if algorithm == "grpo":
            sequence = critic_free.grpo_advantages(shaped, group, scale_rewards)
        else:
            sequence = critic_free.rloo_advantages(shaped, group)
        advantages = critic_free.per_token(sequence, exp.mask)
    exp.advantages = advantages
    exp.stats.update({
        "objective/kl": float(kl.sum(1).mean()), "objective/kl_coef": kl_coef,
        "reward/mean": float(exp.scores.mean()), "reward/std": float(exp.scores.std()) if len(exp.scores) > 1 else 0.0,
        "advantages/mean": float(ppo.masked_mean(advantages, exp.mask)),
        "advantages/std": float(ppo.masked_var(advantages, exp.mask, unbiased=False).sqrt()),
        "response/length": float(exp.mask.sum(1).mean()),
        **critic_free.group_stats(exp.scores, group),
    })


class CriticFreeRunner(PPORunner):
    """GRPO / RLOO / REINFORCE++ iterations; `step()` is one iteration. Trains the policy only."""

    with_values = False  # no value service is asked

    def _next_prompts(self) -> list[str]:
        """ppo.batch_size / G prompts, each repeated G times next to itself (its group)."""
        group = self.cfg.critic_free.samples_per_prompt
        return [prompt for prompt in self._pick_prompts(self.cfg.ppo.batch_size // group) for _ in range(group)]

    def advantages(self, exp: Experience) -> None:
        """The estimator's advantages; the KL is paid in the loss (kl_in_loss) or taken out of the scores."""
        cf = self.cfg.critic_free
        reward_kl = 0.0 if cf.kl_in_loss else self.kl_ctl.value
        critic_free_advantages(exp, self.cfg.algorithm, cf.samples_per_prompt, cf.scale_rewards, reward_kl,
                               self.cfg.ppo.kl_estimator)
        exp.stats["objective/kl_coef"] = self.kl_ctl.value

    def _train_requests(self, exp: Experience) -> dict:
        """The policy alone, with the KL in its loss when critic_free.kl_in_loss, and the configured aggregation."""
        cfg, cf = self.cfg.ppo, self.cfg.critic_free
        kl_coef = self.kl_ctl.value if cf.kl_in_loss else 0.0
        aggregation = (policy_pb2.LOSS_AGGREGATION_SEQUENCE if cf.loss_aggregation == "sequence"
                       else policy_pb2.LOSS_AGGREGATION_TOKEN)
        return {"policy": (lambda rank, plan, key, ptx: policy_request(exp, cfg, key, plan, ptx[rank], kl_coef,
                                                                       aggregation), POLICY_ADDITIVE)}
