"""PolicyService: generation, log-probs and PPO optimizer steps on one copy of the weights."""

import dataclasses
import functools
from dataclasses import dataclass

import torch

from rlhf.v1 import policy_pb2, policy_pb2_grpc, tensor_pb2
from services import codec, objectives
from services.batch import Sequences, check_budget, check_token_rows, tokens_from_pb
from services.batcher import Batcher, call_alive
from services.errors import InvalidArgument
from services.formatting import IGNORE_INDEX, encode_sft_example
from services.inference import Sampling, generate, response_logits, response_logprobs
from services.models import LoadedModel, no_cache
from services.servicer import TrainableServicer
from services.validation import MAX_COEF, check_range, check_temperature, check_texts, micro_batch_size


def sampling_from_pb(pb: policy_pb2.SamplingParams, room: int) -> Sampling:
    """Validate SamplingParams; `room` is how many tokens the longest prompt leaves."""
    temperature = check_temperature(pb.temperature, "sampling.temperature")
    if not 1 <= pb.max_new_tokens <= room:
        raise InvalidArgument("sampling.max_new_tokens", f"must be in [1, {room}] for these prompts, got {pb.max_new_tokens}")
    if pb.top_k < 0:
        raise InvalidArgument("sampling.top_k", f"must be >= 0, got {pb.top_k}")
    check_range(pb.top_p, "sampling.top_p", 0.0, 1.0)
    return Sampling(temperature, pb.max_new_tokens, pb.top_k, pb.top_p or 1.0, pb.seed)


@dataclass
class PPOBatch:
    """A decoded PPOObjective."""

    seqs: Sequences
    old_logprobs: list[torch.Tensor]  # B x (R_i,) log pi_old(a_t|s_t)
    advantages: list[torch.Tensor]  # B x (R_i,) A_t
    clip_range: float
    entropy_coef: float
    temperature: float
    ref_logprobs: list[torch.Tensor] | None = None  # with kl_coef > 0: B x (R_i,) log pi_ref(a_t|s_t)
    kl_coef: float = 0.0
    by_sequence: bool = False  # LOSS_AGGREGATION_SEQUENCE: each response's token mean, then the mean over responses


def ppo_from_pb(pb: policy_pb2.PPOObjective, limits, bound: float, cached_rows: bool = False) -> PPOBatch:
    """Decode and validate a PPO minibatch; `bound` is training.max_abs_input. With cached_rows (the request
    names kept rows) it may carry no rows of its own."""
    if cached_rows and not pb.sequences.tokens.lengths:
        seqs, old, adv, ref = Sequences([], []), [], [], [] if pb.kl_coef else None
    else:
        seqs = Sequences.from_pb(pb.sequences, "ppo.sequences", limits)
        lengths = seqs.response_lengths
        old = codec.float_rows_from_pb(pb.old_logprobs, "ppo.old_logprobs", lengths, bound=bound)
        adv = codec.float_rows_from_pb(pb.advantages, "ppo.advantages", lengths, bound=bound)
        ref = (codec.float_rows_from_pb(pb.ref_logprobs, "ppo.ref_logprobs", lengths, bound=bound)
               if pb.kl_coef else None)
    check_range(pb.clip_range, "ppo.clip_range", 0.0, MAX_COEF, low_open=True)
    check_range(pb.entropy_coef, "ppo.entropy_coef", -MAX_COEF, MAX_COEF)
    temperature = check_temperature(pb.temperature, "ppo.temperature") or 1.0
    check_range(pb.kl_coef, "ppo.kl_coef", 0.0, MAX_COEF)
    if pb.aggregation not in (policy_pb2.LOSS_AGGREGATION_TOKEN, policy_pb2.LOSS_AGGREGATION_SEQUENCE):
        raise InvalidArgument("ppo.aggregation", f"unknown loss aggregation {pb.aggregation}")
    return PPOBatch(seqs, old, adv, pb.clip_range, pb.entropy_coef, temperature, ref, pb.kl_coef,
                    pb.aggregation == policy_pb2.LOSS_AGGREGATION_SEQUENCE)


def ppo_rows(batch: PPOBatch) -> list[tuple]:
    """One record per row of a PPO minibatch: (tokens, prompt length, old log-probs, advantages, ref log-probs)."""
    refs = batch.ref_logprobs or [None] * len(batch.seqs)
    return list(zip(batch.seqs.rows, batch.seqs.prompt_lengths, batch.old_logprobs, batch.advantages, refs))


def with_ppo_rows(batch: PPOBatch, records: list[tuple]) -> PPOBatch:
    """`batch`'s objective over `records` (ppo_rows), which must carry reference log-probs when its KL term is on."""
    if batch.kl_coef and any(r[4] is None for r in records):
        raise InvalidArgument("rows.cached", "ppo.kl_coef > 0 needs reference log-probs, and a named row was kept "
                              "without them")
    columns = list(zip(*records))
    return dataclasses.replace(batch, seqs=Sequences(list(columns[0]), list(columns[1])), old_logprobs=list(columns[2]),
                               advantages=list(columns[3]), ref_logprobs=list(columns[4]) if batch.kl_coef else None)


@dataclass
class DPOBatch:
    """A decoded DPOObjective: rows 2i (chosen) and 2i+1 (rejected) of pair i."""

    seqs: Sequences
    reference_logps: torch.Tensor  # (2N,) sum of log pi_ref over each response
    beta: float
    label_smoothing: float

    @property
    def n_pairs(self) -> int:
        return len(self.seqs) // 2


def dpo_from_pb(pb: policy_pb2.DPOObjective, limits, bound: float) -> DPOBatch:
    """Decode and validate a DPO minibatch; `bound` is training.max_abs_input."""
    seqs = Sequences.from_pb(pb.sequences, "dpo.sequences", limits)
    if len(seqs) % 2:
        raise InvalidArgument("dpo.sequences", f"{len(seqs)} rows: expected chosen/rejected pairs (an even count)")
    ref = codec.tensor_from_pb(pb.reference_logps, "dpo.reference_logps", allowed=codec.FLOAT_DTYPES, ndim=1)
    if ref.shape[0] != len(seqs):
        raise InvalidArgument("dpo.reference_logps.shape", f"expected ({len(seqs)},), got {tuple(ref.shape)}")
    if not torch.isfinite(ref).all():
        raise InvalidArgument("dpo.reference_logps", "contains NaN or infinity")
    codec.check_bound(ref.float(), "dpo.reference_logps", bound)
    check_range(pb.beta, "dpo.beta", 0.0, MAX_COEF, low_open=True)
    if not 0 <= pb.label_smoothing < 0.5:
        raise InvalidArgument("dpo.label_smoothing", f"must be in [0, 0.5), got {pb.label_smoothing}")
    return DPOBatch(seqs, ref.float(), pb.beta, pb.label_smoothing)


def ptx_from_pb(pb: policy_pb2.PtxBatch, m: LoadedModel, batching) -> tuple[list[torch.Tensor], float]:
    """Decode PPO-ptx pretraining rows (each >= 2 tokens) and their weight gamma."""
    check_range(pb.coef, "ptx.coef", 0.0, MAX_COEF)
    if pb.WhichOneof("source") == "texts":
        if not pb.texts.texts:
            raise InvalidArgument("ptx.texts", "empty batch")
        check_texts([("ptx.texts", pb.texts.texts)], batching)
        encoded = m.tokenizer(list(pb.texts.texts), add_special_tokens=False, truncation=True, max_length=m.limits.max_length)
        rows = check_token_rows([torch.tensor(ids, dtype=torch.long) for ids in encoded["input_ids"]], "ptx.texts", m.limits)
    else:
        rows = tokens_from_pb(pb.tokens, "ptx.tokens", m.limits)
    if any(r.numel() < 2 for r in rows):
        raise InvalidArgument("ptx", "every pretraining row needs >= 2 tokens")
    return rows, pb.coef


class PolicyServicer(TrainableServicer, policy_pb2_grpc.PolicyServiceServicer):
    """Holds the actor; Generate and LogProbs are batched, Train is one step per request."""

    role = "policy"
    train_response = policy_pb2.PolicyTrainResponse
    service_name = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name

    def __init__(self, cfg):
        super().__init__(cfg)
        self.generate_batcher = Batcher(self._run_generate, cfg.batching, self.executor)
        self.logprob_batcher = Batcher(self._run_logprobs, cfg.batching, self.executor)

    # --- Generate -----------------------------------------------------------
    def _prompt_rows(self, request, m: LoadedModel) -> list[torch.Tensor]:
        which = request.WhichOneof("prompts")
        if which == "prompt_tokens":
            return tokens_from_pb(request.prompt_tokens, "prompt_tokens", m.limits)
        if which == "prompt_texts" and request.prompt_texts.texts:
            texts = list(request.prompt_texts.texts)
            check_texts([("prompt_texts.texts", texts)], self.cfg.batching)
            if any(not t for t in texts):
                raise InvalidArgument("prompt_texts.texts", "empty prompt")
            encoded = m.tokenizer(texts, add_special_tokens=False)["input_ids"]
            return check_token_rows([torch.tensor(ids, dtype=torch.long) for ids in encoded], "prompt_texts", m.limits)
        raise InvalidArgument("prompts", "empty batch: set prompt_tokens or prompt_texts")

    def _run_generate(self, key, items: list[tuple[torch.Tensor, int]]):
        """Generate for (prompt, row index) items that share sampling params `key`."""
        m = self.loaded
        sampling = Sampling(*key)
        version = self.model_version()

        def run(idx):
            rows = [items[i][0] for i in idx]
            responses, logprobs, finished = generate(self.trainer.module, rows, sampling, m.pad_id, m.eos_id, m.device,
                                                     [items[i][1] for i in idx], self.generate_batcher.batch_alive)
            return list(zip(responses, logprobs, finished, [version] * len(rows)))

        return self.model_calls([int(row.numel()) + sampling.max_new_tokens for row, _ in items], run)

    async def Generate(self, request, context):
        with self.generate_batcher.admit():
            m = self.require()
            prompts = await self.off_loop(self._prompt_rows, request, m)
            longest = max(int(p.numel()) for p in prompts)
            sampling = sampling_from_pb(request.sampling, m.limits.max_length - longest)
            check_budget(len(prompts), longest + sampling.max_new_tokens, "sampling.max_new_tokens", m.limits.max_tokens)
            tokens = sum(int(p.numel()) + sampling.max_new_tokens for p in prompts)
            first = request.first_row_index
            items = [(p, first + i) for i, p in enumerate(prompts)]
            results = await self.generate_batcher.submit(sampling.key(), items, tokens, call_alive(context))
            responses = [r[0] for r in results]
            texts = await self.off_loop(functools.partial(m.tokenizer.batch_decode, skip_special_tokens=True), responses)
            return policy_pb2.GenerateResponse(
                prompt_tokens=codec.token_rows_to_pb(prompts),
                response_tokens=codec.token_rows_to_pb(responses),
                response_logprobs=codec.ragged_to_pb([r[1] for r in results], torch.float32),
                response_texts=texts,
                policy_version=min(r[3] for r in results),
                finished=[r[2] for r in results],
                instance_id=self.instance_id,
            )

    # --- LogProbs -----------------------------------------------------------
    def _run_logprobs(self, temperature, seqs: list[tuple[torch.Tensor, int]]):
        return self.per_sequence(response_logprobs, self.trainer.module, seqs, temperature)

    async def LogProbs(self, request, context):
        return await self.answer_logprobs(request, self.logprob_batcher, self.model_version(), context)

    # --- Train --------------------------------------------------------------
    def _ppo_micro_losses(self, batch: PPOBatch, micro: int, stats: dict, normalizer: float) -> list:
        """normalizer: response tokens (or, by sequence, responses) of the whole minibatch (all ranks' shards)."""
        m = self.loaded

        def loss_for(idx):
            def fn(engine):
                logits, labels, mask = response_logits(engine, batch.seqs.select(idx), m.pad_id, m.device)
                logits = logits.float()  # (b, R, V)
                if batch.temperature != 1.0:
                    logits = logits / batch.temperature
                old, _ = codec.pad_rows([batch.old_logprobs[i] for i in idx])
                adv, _ = codec.pad_rows([batch.advantages[i] for i in idx])
                if batch.by_sequence:  # each token weighs 1 / its response's length: sums become sequence means
                    mask = mask / mask.sum(1, keepdim=True).clamp_min(1)
                logprobs = objectives.logprobs_from_logits(logits, labels)  # (b, R)
                out = objectives.policy_loss(logprobs, old.to(m.device), adv.to(m.device), mask, batch.clip_range,
                                             normalizer)
                with torch.set_grad_enabled(bool(batch.entropy_coef)):  # without a bonus, entropy is a statistic
                    entropy = (objectives.entropy_from_logits(logits) * mask).sum() / normalizer
                loss = out.loss - batch.entropy_coef * entropy
                parts = [("policy_loss", out.loss), ("clip_fraction", out.clipfrac), ("approx_kl", out.approx_kl),
                         ("entropy", entropy)]
                if batch.kl_coef:
                    ref, _ = codec.pad_rows([batch.ref_logprobs[i] for i in idx])
                    kl = objectives.k3_kl(logprobs, ref.to(m.device), mask, normalizer)
                    loss = loss + batch.kl_coef * kl
                    parts.append(("kl_loss", kl))
                for name, value in parts:
                    stats[name] = stats.get(name, 0.0) + float(value.detach())
                return loss

            return fn

        return [loss_for(idx) for idx in self.micro_batches([int(r.numel()) for r in batch.seqs.rows], micro)]

    def _ptx_micro_losses(self, rows: list[torch.Tensor], coef: float, micro: int, stats: dict, n_tokens: float) -> list:
        """n_tokens: predicted pretraining tokens of the whole minibatch (all ranks' shards)."""
        m = self.loaded

        def loss_for(idx):
            def fn(engine):
                ids, mask = codec.pad_rows([rows[i] for i in idx], m.pad_id)
                ids, mask = ids.to(m.device), mask.to(m.device)
                out = engine(input_ids=ids, attention_mask=mask.long(), **no_cache(engine))
                logits = out.logits[:, :-1].float()  # (b, T-1, V)
                nll = -objectives.logprobs_from_logits(logits, ids[:, 1:]) * mask[:, 1:]
                loss = nll.sum() / n_tokens  # mean LM loss over every pretraining token
                stats["ptx_loss"] = stats.get("ptx_loss", 0.0) + float(loss.detach())
                return coef * loss

            return fn

        return [loss_for(idx) for idx in self.micro_batches([int(r.numel()) for r in rows], micro)]

    def _dpo_micro_losses(self, batch: DPOBatch, micro: int, stats: dict, n_pairs: float) -> list:
        """n_pairs: preference pairs of the whole minibatch (all ranks' shards)."""
        m = self.loaded
        pairs_per_micro = max(1, micro // 2)
        rows = batch.seqs.rows
        pair_widths = [2 * max(int(rows[2 * i].numel()), int(rows[2 * i + 1].numel())) for i in range(batch.n_pairs)]

        def loss_for(pair_idx):
            def fn(engine):
                rows = [2 * i + side for i in pair_idx for side in (0, 1)]
                logits, labels, mask = response_logits(engine, batch.seqs.select(rows), m.pad_id, m.device)
                logps = (objectives.logprobs_from_logits(logits.float(), labels) * mask).sum(1)  # (2b,)
                ref = batch.reference_logps[rows].to(m.device)
                loss, chosen, rejected = objectives.dpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2],
                                                      batch.beta, batch.label_smoothing)
                share = len(pair_idx) / n_pairs  # micro-batch losses add up to the minibatch mean
                stats["policy_loss"] = stats.get("policy_loss", 0.0) + float(loss.detach()) * share
                stats["reward_accuracy"] = stats.get("reward_accuracy", 0.0) + float((chosen > rejected).float().sum()) / n_pairs
                stats["reward_margin"] = stats.get("reward_margin", 0.0) + float((chosen - rejected).sum()) / n_pairs
                return loss * share

            return fn

        return [loss_for(idx) for idx in self.micro_batches(pair_widths, pairs_per_micro)]

    def _train(self, batch, ptx, micro: int) -> policy_pb2.PolicyTrainResponse:
        """One optimizer step. In a data-parallel group the stats are this shard's share of the minibatch's."""
        stats: dict[str, float] = {}
        dpo = isinstance(batch, DPOBatch)
        tokens = sum(batch.seqs.response_lengths)  # this shard's response tokens
        ptx_tokens = sum(int(r.numel()) - 1 for r in ptx[0]) if ptx else 0
        main = batch.n_pairs if dpo else len(batch.seqs) if batch.by_sequence else tokens
        n_main, n_ptx = self.trainer.agree([main, ptx_tokens])
        if dpo:
            losses = self._dpo_micro_losses(batch, micro, stats, n_main)
        else:
            losses = self._ppo_micro_losses(batch, micro, stats, n_main)
        if ptx is not None:
            losses += self._ptx_micro_losses(ptx[0], ptx[1], micro, stats, n_ptx)
        grad_norm, applied = self.trainer.step(losses)
        entropy_term = getattr(batch, "entropy_coef", 0.0) * stats.get("entropy", 0.0)
        total = stats["policy_loss"] - entropy_term + (ptx[1] * stats["ptx_loss"] if ptx else 0.0)
        total += getattr(batch, "kl_coef", 0.0) * stats.get("kl_loss", 0.0)
        return policy_pb2.PolicyTrainResponse(
            loss=total, grad_norm=grad_norm, model_version=self.trainer.version,
            tokens=tokens, skipped=not applied, **stats,
        )

    def _decode_train(self, request, m: LoadedModel) -> tuple:
        which = request.WhichOneof("objective")
        if which is None:
            raise InvalidArgument("objective", "set ppo or dpo")
        bound = self.cfg.training.max_abs_input
        if which == "ppo":
            batch = ppo_from_pb(request.ppo, m.limits, bound, cached_rows=bool(request.rows.cached))
            batch = with_ppo_rows(batch, self.with_cached_rows(request, ppo_rows(batch), m.limits))
        elif request.HasField("rows"):
            raise InvalidArgument("rows", "row references are for PPO minibatches; a DPO request carries its pairs")
        else:
            batch = dpo_from_pb(request.dpo, m.limits, bound)
        ptx = ptx_from_pb(request.ptx, m, self.cfg.batching) if request.HasField("ptx") else None
        return batch, ptx, micro_batch_size(request.micro_batch_size, self.cfg.training.micro_batch_size)

    async def Train(self, request, context):
        return await self.train_step(request, self._decode_train, self._train)

    async def Tokenize(self, request, context):
        m = self.require()
        prompts, responses = list(request.prompts), list(request.responses)
        if not prompts:
            raise InvalidArgument("prompts", "empty batch")
        if len(responses) != len(prompts):
            raise InvalidArgument("responses", f"{len(responses)} responses for {len(prompts)} prompts")
        check_texts([("prompts", prompts), ("responses", responses)], self.cfg.batching)
        return await self.off_loop(self._tokenize, prompts, responses, m)

    def _tokenize(self, prompts: list[str], responses: list[str], m: LoadedModel) -> tensor_pb2.SequenceBatch:
        rows, prompt_lengths = [], []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            ids, labels = encode_sft_example(m.tokenizer, prompt, response, m.limits.max_length)
            n_prompt = sum(label == IGNORE_INDEX for label in labels)
            if n_prompt == 0:
                raise InvalidArgument(f"prompts[{i}]", "empty prompt, or the response fills the model's context")
            rows.append(torch.tensor(ids, dtype=torch.long))
            prompt_lengths.append(n_prompt)
        check_token_rows(rows, "prompts", m.limits)
        return Sequences(rows, prompt_lengths).to_pb()


add_to_server = policy_pb2_grpc.add_PolicyServiceServicer_to_server
