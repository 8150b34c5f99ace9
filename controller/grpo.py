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

import time

import torch

from controller import critic_free, ppo
from controller.loop import (
    POLICY_ADDITIVE,
    POLICY_FIELDS,
    Experience,
    PPORunner,
    StepResult,
    _mean_stats,
    collect,
    merge_shards,
    policy_request,
    shard,
)
from rlhf.v1 import policy_pb2
from services.seeds import row_seed


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

    def _next_prompts(self) -> list[str]:
        """ppo.batch_size / G prompts, each repeated G times next to itself (its group)."""
        group = self.cfg.critic_free.samples_per_prompt
        n = self.cfg.ppo.batch_size // group
        order = torch.randperm(len(self.prompts), generator=self.generator)[:n].tolist()
        picked = [self.prompts[i] for i in order]
        while len(picked) < n:  # fewer prompts than a batch: cycle
            picked += picked[: n - len(picked)]
        return [prompt for prompt in picked for _ in range(group)]

    async def _train_minibatch(self, exp: Experience, key, index: list[int]):
        """One optimizer step of the policy on minibatch rows `index`, sharded over its ranks."""
        cfg, c = self.cfg.ppo, self.clients
        ranks = c.ranks("policy")
        cf = self.cfg.critic_free
        kl_coef = self.kl_ctl.value if cf.kl_in_loss else 0.0
        aggregation = (policy_pb2.LOSS_AGGREGATION_SEQUENCE if cf.loss_aggregation == "sequence"
                       else policy_pb2.LOSS_AGGREGATION_TOKEN)
        requests = [policy_request(exp, cfg, key, part, ptx, kl_coef, aggregation)
                    for part, ptx in zip(shard(index, ranks), self._ptx_shards(ranks))]
        replies = await c.each_rank("policy", lambda s: s.Train, requests)
        c.watch.trained("policy", replies)
        return merge_shards(replies, POLICY_ADDITIVE)

    async def _train(self, exp: Experience, step: int, timings: dict) -> dict:
        cfg = self.cfg.ppo
        start = time.perf_counter()
        n_minibatches = cfg.batch_size // cfg.minibatch_size
        replies = []
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(len(exp.prompts), generator=self.generator).tolist()
            for mb in range(n_minibatches):
                index = order[mb * cfg.minibatch_size : (mb + 1) * cfg.minibatch_size]
                replies.append(await self._train_minibatch(exp, self.train_key(step, epoch * n_minibatches + mb),
                                                           index))
        timings["train"] = time.perf_counter() - start
        self.policy_version = replies[-1].model_version
        stats = _mean_stats(replies, POLICY_FIELDS)
        stats["policy/first_minibatch_approx_kl"] = replies[0].approx_kl
        return stats

    async def step(self) -> StepResult:
        """One critic-free iteration; returns its statistics."""
        step = self.step_count
        timings: dict[str, float] = {}
        seed = row_seed(self.cfg.seed, step) or 1
        self.phase = "generate"
        exp = await collect(self.clients, self._next_prompts(), self.cfg.ppo, timings, seed,
                            lambda phase: setattr(self, "phase", phase), with_values=False,
                            rewards=self.reward_sources())
        cf = self.cfg.critic_free
        reward_kl = 0.0 if cf.kl_in_loss else self.kl_ctl.value  # the KL is paid in the loss or in the scores
        critic_free_advantages(exp, self.cfg.algorithm, cf.samples_per_prompt, cf.scale_rewards, reward_kl,
                               self.cfg.ppo.kl_estimator)
        exp.stats["objective/kl_coef"] = self.kl_ctl.value
        self.phase = "train"
        stats = exp.stats | await self._train(exp, step, timings)
        self.phase = "idle"
        self.kl_ctl.update(stats["objective/kl"], self.cfg.ppo.batch_size)
        stats.update({f"time/{k}": v for k, v in timings.items()})
        stats.update({"policy/version": self.policy_version, "step": step,
                      "samples": (step + 1) * self.cfg.ppo.batch_size})
        self.step_count += 1
        self.last_stats = stats
        return StepResult(step, stats, exp)
