"""RewardService: scalar scores of whole sequences from the frozen reward model."""

import torch

from rlhf.v1 import reward_pb2, reward_pb2_grpc
from services import codec
from services.batch import check_token_rows, tokens_from_pb
from services.batcher import call_alive
from services.errors import InvalidArgument
from services.formatting import encode_for_reward
from services.inference import sequence_scores
from services.servicer import FrozenServicer
from services.validation import check_texts


class RewardServicer(FrozenServicer, reward_pb2_grpc.RewardServiceServicer):
    """Frozen; accepts token ids or (prompt, response) text and batches requests."""

    role = "reward"
    service_name = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name

    def run_batch(self, _key, rows: list[torch.Tensor]) -> list[float]:
        m = self.loaded
        with torch.no_grad():
            return self.model_calls([int(row.numel()) for row in rows], lambda idx: sequence_scores(
                m.model, [rows[i] for i in idx], m.pad_id, m.device).tolist())

    def _text_rows(self, pairs: reward_pb2.TextPairs, m) -> list[torch.Tensor]:
        prompts, responses = list(pairs.prompts), list(pairs.responses)
        if not prompts:
            raise InvalidArgument("texts.prompts", "empty batch")
        if len(prompts) != len(responses):
            raise InvalidArgument("texts.responses", f"{len(responses)} responses for {len(prompts)} prompts")
        check_texts([("texts.prompts", prompts), ("texts.responses", responses)], self.cfg.batching)
        rows = [
            torch.tensor(encode_for_reward(m.tokenizer, p, r, m.limits.max_length), dtype=torch.long)
            for p, r in zip(prompts, responses)
        ]
        return check_token_rows(rows, "texts", m.limits)

    def rows_from_request(self, request, m) -> list[torch.Tensor]:
        """Token rows to score, from either input form (on the text threads)."""
        which = request.WhichOneof("input")
        if which == "tokens":
            return tokens_from_pb(request.tokens, "tokens", m.limits)
        if which == "texts":
            return self._text_rows(request.texts, m)
        raise InvalidArgument("input", "empty batch: set tokens or texts")

    async def score_rows(self, rows: list[torch.Tensor], context) -> list[float]:
        """Scores of token rows (validated against the model's limits) through the batcher."""
        return await self.batcher.submit(None, rows, sum(int(r.numel()) for r in rows), call_alive(context))

    async def Score(self, request, context):
        with self.batcher.admit():
            rows = await self.off_loop(self.rows_from_request, request, self.require())
            scores = await self.score_rows(rows, context)
            return reward_pb2.ScoreResponse(scores=codec.tensor_to_pb(torch.tensor(scores, dtype=torch.float32)),
                                            values=scores)

    def _pair_rows(self, pairs: reward_pb2.ComparePairs, m) -> list[torch.Tensor]:
        """Chosen rows then rejected rows, encoded like Score's text input (on the text threads)."""
        prompts, chosen, rejected = list(pairs.prompts), list(pairs.chosen), list(pairs.rejected)
        if not prompts:
            raise InvalidArgument("pairs.prompts", "empty batch")
        for name, column in (("pairs.chosen", chosen), ("pairs.rejected", rejected)):
            if len(column) != len(prompts):
                raise InvalidArgument(name, f"{len(column)} responses for {len(prompts)} prompts")
        check_texts([("pairs.prompts", prompts), ("pairs.chosen", chosen), ("pairs.rejected", rejected)],
                    self.cfg.batching)
        both = reward_pb2.TextPairs(prompts=prompts + prompts, responses=chosen + rejected)
        return self._text_rows(both, m)

    async def compare(self, request: reward_pb2.CompareRequest, context) -> reward_pb2.CompareResponse:
        """Scores of both sides and P(chosen preferred) = sigmoid(chosen - rejected)."""
        with self.batcher.admit():
            rows = await self.off_loop(self._pair_rows, request.pairs, self.require())
            scores = torch.tensor(await self.score_rows(rows, context), dtype=torch.float32)
            chosen, rejected = scores.chunk(2)
            p_chosen = torch.sigmoid(chosen - rejected)
            return reward_pb2.CompareResponse(
                chosen_scores=codec.tensor_to_pb(chosen), rejected_scores=codec.tensor_to_pb(rejected),
                p_chosen=codec.tensor_to_pb(p_chosen), chosen_values=chosen.tolist(), rejected_values=rejected.tolist(),
                p_chosen_values=p_chosen.tolist(),
            )

    async def Compare(self, request, context):
        return await self.compare(request, context)

    async def CompareStream(self, request_iterator, context):
        async for request in request_iterator:
            yield await self.compare(request, context)


add_to_server = reward_pb2_grpc.add_RewardServiceServicer_to_server
