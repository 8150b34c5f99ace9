"""DPO through the same services: Policy.Tokenize, Reference.LogProbs, Policy.Train(dpo).

No reward or value service takes part. Each step takes a batch of
preference pairs, gets the reference log-probs of both responses, and sends
one DPO minibatch (one optimizer step) to the policy.
"""

import uuid

import torch

from controller.clients import ServiceClients
from controller.config import ControllerConfig
from controller.evaluation import Pair
from rlhf.v1 import policy_pb2, tensor_pb2
from services import codec


def interleave(pairs: list[Pair]) -> policy_pb2.TokenizeRequest:
    """Rows 2i and 2i+1 are the chosen and rejected responses of pair i."""
    prompts = [p.prompt for p in pairs for _ in (0, 1)]
    responses = [text for p in pairs for text in (p.chosen, p.rejected)]
    return policy_pb2.TokenizeRequest(prompts=prompts, responses=responses)


class DPORunner:
    """Runs DPO steps; `step()` is one Policy.Train."""

    def __init__(self, cfg: ControllerConfig, clients: ServiceClients, pairs: list[Pair]):
        self.cfg = cfg
        self.clients = clients
        self.pairs = pairs
        self.run_id = cfg.run_id or uuid.uuid4().hex[:12]
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step_count = 0
        self.policy_version = 0
        self.last_stats: dict = {}
        self._order: list[int] = []

    def _next_pairs(self) -> list[Pair]:
        picked = []
        while len(picked) < self.cfg.dpo.batch_size:
            if not self._order:  # a new epoch over the pairs
                self._order = torch.randperm(len(self.pairs), generator=self.generator).tolist()
            picked.append(self.pairs[self._order.pop()])
        return picked

    async def step(self):
        """One DPO step; returns a StepResult-like object with .step and .stats."""
        from controller.loop import StepResult

        c = self.clients
        pairs = self._next_pairs()
        sequences = await c.call(c.policy.Tokenize, interleave(pairs))
        ref = await c.call(c.reference.LogProbs, policy_pb2.LogProbsRequest(sequences=sequences))
        ref_logps = torch.stack([row.sum() for row in codec.ragged_from_pb(ref.logprobs, "reference.logprobs")])
        objective = policy_pb2.DPOObjective(
            sequences=sequences, reference_logps=codec.tensor_to_pb(ref_logps.float()),
            beta=self.cfg.dpo.beta, label_smoothing=self.cfg.dpo.label_smoothing)
        key = tensor_pb2.TrainKey(run_id=self.run_id, step=self.step_count, minibatch_index=0)
        reply = await c.call(c.policy.Train, policy_pb2.PolicyTrainRequest(
            key=key, dpo=objective, micro_batch_size=self.cfg.dpo.micro_batch_size))
        self.policy_version = reply.model_version
        stats = {"dpo/loss": reply.policy_loss, "dpo/reward_accuracy": reply.reward_accuracy,
                 "dpo/reward_margin": reply.reward_margin, "policy/grad_norm": reply.grad_norm,
                 "policy/version": reply.model_version, "step": self.step_count,
                 "samples": (self.step_count + 1) * len(pairs)}
        result = StepResult(self.step_count, stats, None)
        self.step_count += 1
        self.last_stats = stats
        return result
