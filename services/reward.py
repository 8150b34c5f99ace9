"""RewardService: scalar scores of whole sequences from the frozen reward model, or from a Python rule.

backend: local runs the reward model here; backend: tei asks a
text-embeddings-inference server that serves it (services/tei.py);
backend: python scores texts with a user function (services/rules.py). The
last two score texts on threads of their own, behind the same contract,
validation, admission and metrics.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from rlhf.v1 import reward_pb2, reward_pb2_grpc
from services import codec
from services.batch import ModelLimits, check_token_rows, tokens_from_pb
from services.batcher import Batcher, call_alive
from services.errors import InvalidArgument
from services.formatting import encode_many_for_reward
from services.inference import sequence_scores
from services.models import LoadedModel, load_tokenizer_only
from services.rules import RuleScorer
from services.servicer import FrozenServicer
from services.tei import TEIScorer
from services.validation import check_texts


@dataclass(frozen=True)
class TextRow:
    """A (prompt, response) pair queued as text, tokenised on the model thread together with its whole batch."""

    prompt: str
    response: str
    index: int  # its row in the request, to name it in an error


class RewardServicer(FrozenServicer, reward_pb2_grpc.RewardServiceServicer):
    """Frozen; accepts token ids or (prompt, response) text and batches requests."""

    role = "reward"
    service_name = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name

    def __init__(self, cfg):
        super().__init__(cfg)
        self.scorer: RuleScorer | TEIScorer | None = None  # the text scorer of backend python or tei, once loaded
        if cfg.backend in ("python", "tei"):  # its calls run on threads of their own, several batches at once
            workers = cfg.python.workers if cfg.backend == "python" else cfg.tei.max_concurrency
            batching = cfg.batching if cfg.backend == "python" else cfg.batching.model_copy(
                update={"max_batch_size": min(cfg.batching.max_batch_size, cfg.tei.max_batch_rows)})
            self.scorer_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"reward-{cfg.backend}")
            self.batcher = Batcher(lambda key, items: self.scorer.run_rows(key, items), batching, self.scorer_pool,
                                   concurrent=True)

    def run_batch(self, _key, items: list[torch.Tensor | TextRow]) -> list[float | InvalidArgument]:
        """Scores of token rows and texts (tokenised here, in one call for the batch); a text whose tokens fall
        outside the model's vocabulary gets an InvalidArgument in its place."""
        m = self.loaded
        rows = self._tokenise(items, m)
        if self.batcher.on_tokens is not None:
            self.batcher.on_tokens(sum(int(row.numel()) for row, item in zip(rows, items)
                                       if isinstance(item, TextRow) and isinstance(row, torch.Tensor)))
        ok = [i for i, row in enumerate(rows) if isinstance(row, torch.Tensor)]
        with torch.no_grad():
            scores = self.model_calls([int(rows[i].numel()) for i in ok], lambda idx: sequence_scores(
                m.model, [rows[ok[j]] for j in idx], m.pad_id, m.device).tolist())
        for i, score in zip(ok, scores):
            rows[i] = score
        return rows

    @staticmethod
    def _tokenise(items: list[torch.Tensor | TextRow], m) -> list[torch.Tensor | InvalidArgument]:
        texts = [i for i, item in enumerate(items) if isinstance(item, TextRow)]
        if not texts:
            return list(items)
        rows: list = list(items)
        encoded = encode_many_for_reward(m.tokenizer, [items[i].prompt for i in texts],
                                         [items[i].response for i in texts], m.limits.max_length)
        for i, ids in zip(texts, encoded):
            high = max(ids)
            rows[i] = torch.tensor(ids, dtype=torch.long) if high < m.limits.vocab_size else InvalidArgument(
                "texts", f"row {items[i].index} encodes to token id {high}, outside the model's vocabulary "
                f"[0, {m.limits.vocab_size}): the tokenizer does not match the model")
        return rows

    def load_model(self) -> LoadedModel:
        if self.cfg.backend == "tei":  # the model runs on the TEI server: its tokenizer (eos) and limits only
            return load_tokenizer_only(self.cfg.model)
        if self.cfg.backend == "python":  # a rule: no weights, no tokenizer; texts only
            limits = ModelLimits(vocab_size=0, max_length=self.cfg.batching.max_request_tokens)
            return LoadedModel(None, None, limits, torch.device("cpu"), torch.float32, "", -1, -1)
        return super().load_model()

    def after_load(self, loaded: LoadedModel) -> None:
        super().after_load(loaded)
        if self.cfg.backend == "python":
            self.scorer = RuleScorer(self.cfg.python)
        elif self.cfg.backend == "tei":
            self.scorer = TEIScorer(self.cfg.tei, loaded.tokenizer.eos_token)

    def _text_columns(self, pairs: reward_pb2.TextPairs) -> tuple[list[str], list[str]]:
        prompts, responses = list(pairs.prompts), list(pairs.responses)
        if not prompts:
            raise InvalidArgument("texts.prompts", "empty batch")
        if len(prompts) != len(responses):
            raise InvalidArgument("texts.responses", f"{len(responses)} responses for {len(prompts)} prompts")
        check_texts([("texts.prompts", prompts), ("texts.responses", responses)], self.cfg.batching)
        return prompts, responses

    def _pair_columns(self, pairs: reward_pb2.ComparePairs) -> tuple[list[str], list[str]]:
        """Prompts twice, and the chosen then the rejected responses: both sides scored as Score's texts."""
        prompts, chosen, rejected = list(pairs.prompts), list(pairs.chosen), list(pairs.rejected)
        if not prompts:
            raise InvalidArgument("pairs.prompts", "empty batch")
        for name, column in (("pairs.chosen", chosen), ("pairs.rejected", rejected)):
            if len(column) != len(prompts):
                raise InvalidArgument(name, f"{len(column)} responses for {len(prompts)} prompts")
        check_texts([("pairs.prompts", prompts), ("pairs.chosen", chosen), ("pairs.rejected", rejected)],
                    self.cfg.batching)
        return prompts + prompts, chosen + rejected

    def _encode(self, prompts: list[str], responses: list[str], m) -> list[torch.Tensor]:
        """Token rows of (prompt, response) texts as the reward model was trained on them (on the text threads)."""
        rows = [torch.tensor(ids, dtype=torch.long)
                for ids in encode_many_for_reward(m.tokenizer, prompts, responses, m.limits.max_length)]
        return check_token_rows(rows, "texts", m.limits)

    async def score_texts(self, prompts: list[str], responses: list[str], context) -> list[float]:
        """Scores of (prompt, response) texts: the rule's, or the model's through the batcher.

        Texts that cannot pass the request's token budget even at the model's
        full length go to the batcher as texts, tokenised on the model thread
        with the rest of their batch; larger requests are tokenised and
        checked first, off the event loop.
        """
        m = self.require()
        if self.scorer is not None:
            return await self.scorer.score(self.batcher, prompts, responses, call_alive(context))
        if len(prompts) * m.limits.max_length > m.limits.max_tokens:
            size = sum(map(len, prompts)) + sum(map(len, responses))
            return await self.score_rows(await self.off_loop(self._encode, prompts, responses, m, size=size), context)
        limit = m.limits.max_length
        rows = [TextRow(p, r, i) for i, (p, r) in enumerate(zip(prompts, responses))]
        tokens = sum(min(limit, len(p) + len(r) + 1) for p, r in zip(prompts, responses))  # a guess, for grouping
        scores = await self.batcher.submit(None, rows, tokens, call_alive(context), exact=False)
        for score in scores:
            if isinstance(score, InvalidArgument):
                raise score
        return scores

    async def score_rows(self, rows: list[torch.Tensor], context) -> list[float]:
        """Scores of token rows (validated against the model's limits) through the batcher."""
        return await self.batcher.submit(None, rows, sum(int(r.numel()) for r in rows), call_alive(context))

    async def Score(self, request, context):
        with self.batcher.admit():
            m = self.require()
            which = request.WhichOneof("input")
            if which == "tokens":
                if self.scorer is not None:
                    kind = "a Python rule" if self.cfg.backend == "python" else "a TEI server"
                    raise InvalidArgument("tokens", f"this reward service scores with {kind}, which scores texts: "
                                          "send texts (prompts, responses)")
                rows = await self.off_loop(tokens_from_pb, request.tokens, "tokens", m.limits,
                                           size=len(request.tokens.values.raw))
                scores = await self.score_rows(rows, context)
            elif which == "texts":
                scores = await self.score_texts(*self._text_columns(request.texts), context)
            else:
                raise InvalidArgument("input", "empty batch: set tokens or texts")
            return reward_pb2.ScoreResponse(scores=codec.floats_to_pb(scores), values=scores)

    async def compare(self, request: reward_pb2.CompareRequest, context) -> reward_pb2.CompareResponse:
        """Scores of both sides and P(chosen preferred) = sigmoid(chosen - rejected)."""
        with self.batcher.admit():
            prompts, responses = self._pair_columns(request.pairs)
            scores = torch.tensor(await self.score_texts(prompts, responses, context), dtype=torch.float32)
            chosen, rejected = scores.chunk(2)
            p_chosen = torch.sigmoid(chosen - rejected)
            return reward_pb2.CompareResponse(
                chosen_scores=codec.tensor_to_pb(chosen), rejected_scores=codec.tensor_to_pb(rejected),
                p_chosen=codec.tensor_to_pb(p_chosen), chosen_values=chosen.tolist(), rejected_values=rejected.tolist(),
                p_chosen_values=p_chosen.tolist(),
            )

    async def close(self) -> None:
        await super().close()
        if self.scorer is not None:
            self.scorer_pool.shutdown(wait=False, cancel_futures=True)
            self.scorer.close()

    async def Compare(self, request, context):
        return await self.compare(request, context)

    async def CompareStream(self, request_iterator, context):
        async for request in request_iterator:
            yield await self.compare(request, context)


add_to_server = reward_pb2_grpc.add_RewardServiceServicer_to_server
