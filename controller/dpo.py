"""DPO through the same services: Policy.Tokenize, Reference.LogProbs, Policy.Train(dpo).

No reward or value service takes part. Each step takes a batch of
preference pairs, gets the reference log-probs of both responses, and sends
one DPO minibatch (one optimizer step) to the policy.
"""

import torch

from controller.clients import ServiceClients
from controller.config import ControllerConfig
from controller.evaluation import Pair
from controller.loop import POLICY_ADDITIVE, Runner, StepResult, merge_shards
from controller.replicas import split_rows
from rlhf.v1 import common_pb2, policy_pb2
from services import codec
from services.batch import Sequences


def interleave(pairs: list[Pair]) -> policy_pb2.TokenizeRequest:
    """Rows 2i and 2i+1 are the chosen and rejected responses of pair i."""
    prompts = [p.prompt for p in pairs for _ in (0, 1)]
    responses = [text for p in pairs for text in (p.chosen, p.rejected)]
    return policy_pb2.TokenizeRequest(prompts=prompts, responses=responses)


class DPORunner(Runner):
    """Runs DPO steps; `step()` is one Policy.Train."""

    def __init__(self, cfg: ControllerConfig, clients: ServiceClients, pairs: list[Pair]):
        super().__init__(cfg, clients)
        self.pairs = pairs
        self._order: list[int] = []

    def state_dict(self) -> dict:
        return super().state_dict() | {"order": list(self._order)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._order = list(state["order"])

    def _next_pairs(self) -> list[Pair]:
        picked = []
        while len(picked) < self.cfg.dpo.batch_size:
            if not self._order:  # a new epoch over the pairs
                self._order = torch.randperm(len(self.pairs), generator=self.generator).tolist()
            picked.append(self.pairs[self._order.pop()])
        return picked

    async def step(self):
        """One DPO step; returns a StepResult-like object with .step and .stats."""
        c = self.clients
        self.phase = "score"  # tokenize and reference log-probs: nothing trained yet
        pairs = self._next_pairs()
        tokenized = await c.one("policy", lambda s: s.Tokenize, interleave(pairs))
        seqs = Sequences(codec.ragged_from_pb(tokenized.tokens, "tokens"), list(tokenized.prompt_lengths))
        ref = await c.spread_rows("reference", len(seqs), lambda idx: common_pb2.LogProbsRequest(
            sequences=seqs.select(idx).to_pb()), lambda s: s.LogProbs,
            lambda reply: codec.ragged_from_pb(reply.logprobs, "reference.logprobs"))
        ref_logps = torch.stack([row.sum() for row in ref]).float()  # (2N,)
        key = self.train_key(self.step_count, 0)

        def request_for(pair_index: list[int]) -> policy_pb2.PolicyTrainRequest:
            rows = [2 * i + side for i in pair_index for side in (0, 1)]
            objective = policy_pb2.DPOObjective(
                sequences=seqs.select(rows).to_pb(), reference_logps=codec.tensor_to_pb(ref_logps[rows]),
                beta=self.cfg.dpo.beta, label_smoothing=self.cfg.dpo.label_smoothing)
            return policy_pb2.PolicyTrainRequest(key=key, dpo=objective, micro_batch_size=self.cfg.dpo.micro_batch_size)

        shards = split_rows(len(pairs), c.ranks("policy"))
        self.phase = "train"
        replies = await c.each_rank("policy", lambda s: s.Train, [request_for(p) for p in shards])
        c.watch.trained("policy", replies)
        reply = merge_shards(replies, POLICY_ADDITIVE)
        self.policy_version = reply.model_version
        stats = {"dpo/loss": reply.policy_loss, "dpo/reward_accuracy": reply.reward_accuracy,
                 "dpo/reward_margin": reply.reward_margin, "policy/grad_norm": reply.grad_norm,
                 "policy/version": reply.model_version, "step": self.step_count,
                 "samples": (self.step_count + 1) * len(pairs)}
        result = StepResult(self.step_count, stats, None)
        self.step_count += 1
        self.last_stats = stats
        self.phase = "idle"
        return result
