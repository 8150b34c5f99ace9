"""The PPO loop: generate, score, compute advantages, train (design.md, "One PPO iteration").

The controller holds no model. It moves token ids, log-probs, values and
advantages between the services and does the PPO bookkeeping with the pure
functions of controller.ppo.
"""

import asyncio
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field

import grpc
import torch

from controller import ppo
from controller.clients import ServiceClients
from controller.config import ControllerConfig, PPOConfig
from controller.durability import decode_generator, encode_generator
from controller.replicas import split_rows
from controller.rows import MISSED, KeptRows, Plan
from rlhf.v1 import common_pb2, policy_pb2, reward_pb2, tensor_pb2, value_pb2
from services import codec
from services.batch import Sequences
from services.seeds import row_seed

log = logging.getLogger(__name__)


@dataclass
class Experience:
    """One batch of rollouts; (B, R) tensors are right-padded over response tokens."""

    prompts: list[str]
    responses: list[str]
    seqs: Sequences  # prompt + response token ids
    mask: torch.Tensor  # (B, R) 1 on response tokens
    logprobs: torch.Tensor  # (B, R) log pi_old(a_t|s_t), from Generate
    ref_logprobs: torch.Tensor  # (B, R) log pi_ref(a_t|s_t)
    values: torch.Tensor  # (B, R) V_old(s_t)
    scores: torch.Tensor  # (B,) RM score r_theta(x, y)
    policy_version: int
    advantages: torch.Tensor | None = None  # (B, R) A_t (whitened if configured)
    returns: torch.Tensor | None = None  # (B, R) A_t + V(s_t) before whitening
    stats: dict = field(default_factory=dict)


def kl_controller(cfg: PPOConfig):
    """Fixed or adaptive (Ziegler et al. 2019) KL coefficient beta."""
    if cfg.adaptive_kl:
        return ppo.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return ppo.FixedKLController(cfg.kl_coef)


def _padded(rows: list[torch.Tensor]) -> torch.Tensor:
    return codec.pad_rows([r.float() for r in rows])[0]


def _ragged(name: str):
    return lambda reply: codec.ragged_from_pb(getattr(reply, name), name)


def _values(clients: ServiceClients):
    def rows_of(reply):
        clients.watch.check_version("value", reply.model_version)
        return codec.ragged_from_pb(reply.values, "values")

    return rows_of


async def generate(clients: ServiceClients, prompts: list[str], sampling: policy_pb2.SamplingParams) -> list[tuple]:
    """Policy.Generate over the policy's replicas; (prompt ids, response ids, logprobs, text, version) per row."""
    def request_for(index):
        texts = tensor_pb2.TextBatch(texts=[prompts[i] for i in index])
        return policy_pb2.GenerateRequest(prompt_texts=texts, sampling=sampling, first_row_index=index[0])

    def rows_of(reply):
        clients.watch.check_version("policy", reply.policy_version)
        version = [reply.policy_version] * len(reply.response_texts)
        return zip(codec.ragged_from_pb(reply.prompt_tokens, "prompt_tokens"),
                   codec.ragged_from_pb(reply.response_tokens, "response_tokens"),
                   codec.ragged_from_pb(reply.response_logprobs, "response_logprobs"), reply.response_texts, version)

    return await clients.spread_rows("policy", len(prompts), request_for, lambda s: s.Generate, rows_of)


async def collect(clients: ServiceClients, prompts: list[str], cfg: PPOConfig, timings: dict, seed: int = 0,
                  on_phase=lambda phase: None, with_values: bool = True,
                  rewards: tuple = (("reward", 1.0, "reward"),)) -> Experience:
    """Generate, then reference log-probs, values and RM scores concurrently, each spread over its replicas.

    `seed` (nonzero) makes the samples depend only on it and the row, not on how the batch is split.
    on_phase("score") is called when generation is done.
    """
    start = time.perf_counter()
    sampling = policy_pb2.SamplingParams(
        temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k, top_p=cfg.top_p, seed=seed
    )
    prompt_rows, response_rows, logprobs, texts, versions = zip(*await generate(clients, prompts, sampling))
    responses = list(texts)
    seqs = Sequences([torch.cat([p, r]).long() for p, r in zip(prompt_rows, response_rows)], [len(p) for p in prompt_rows])
    timings["generate"] = time.perf_counter() - start
    on_phase("score")
    start = time.perf_counter()
    n = len(prompts)

    async def no_values():  # critic-free estimators: no value service to ask
        return [torch.zeros(len(r)) for r in response_rows]

    def score(pool: str):
        return clients.spread_rows(pool, n, lambda idx: reward_pb2.ScoreRequest(texts=reward_pb2.TextPairs(
            prompts=[prompts[i] for i in idx], responses=[responses[i] for i in idx])), lambda s: s.Score,
            lambda reply: list(codec.tensor_from_pb(reply.scores, f"{pool}.scores").float()))

    ref, values, *per_source = await asyncio.gather(
        clients.spread_rows("reference", n, lambda idx: common_pb2.LogProbsRequest(
            sequences=seqs.select(idx).to_pb(), temperature=cfg.temperature), lambda s: s.LogProbs, _ragged("logprobs")),
        clients.spread_rows("value", n, lambda idx: value_pb2.ValuesRequest(sequences=seqs.select(idx).to_pb()),
                            lambda s: s.Values, _values(clients)) if with_values else no_values(),
        *(score(pool) for pool, _, _ in rewards),
    )
    # several sources: each row's reward is the weighted sum of their scores
    source_scores = [torch.stack(s) for s in per_source]
    scores = list(sum(weight * s for (_, weight, _), s in zip(rewards, source_scores)))
    source_stats = {f"reward/{name}/mean": float(s.mean()) for (_, _, name), s in zip(rewards, source_scores)}
    timings["score"] = time.perf_counter() - start
    return Experience(
        prompts=prompts, responses=responses, seqs=seqs,
        mask=codec.pad_rows(list(response_rows))[1], logprobs=_padded(list(logprobs)),
        ref_logprobs=_padded(ref), values=_padded(values), scores=torch.stack(scores),
        policy_version=min(versions), stats=source_stats if len(rewards) > 1 else {},
    )


def compute_advantages(exp: Experience, cfg: PPOConfig, kl_coef: float, moments: ppo.RunningMoments | None) -> None:
    """Per-token KL penalty, RM score on the last token, GAE, whitening (fills exp)."""
    scores = exp.scores
    if moments is not None:
        moments.update(scores)
        scores = (scores - moments.mean) / moments.std
    kl = ppo.compute_approx_kl(exp.logprobs, exp.ref_logprobs, exp.mask, cfg.kl_estimator)  # (B, R)
    rewards, non_score = ppo.compute_rewards(kl, scores, exp.mask, kl_coef, cfg.reward_clip)
    advantages, returns = ppo.compute_gae(rewards, exp.values, exp.mask, cfg.gamma, cfg.lam)
    exp.stats.update({
        "objective/kl": float((kl * exp.mask).sum(1).mean()),
        "objective/kl_coef": kl_coef,
        "objective/non_score_reward": float(non_score.sum(1).mean()),
        "reward/mean": float(exp.scores.mean()),
        "reward/std": float(exp.scores.std()) if len(exp.scores) > 1 else 0.0,
        "advantages/mean": float(ppo.masked_mean(advantages, exp.mask)),
        "advantages/std": float(ppo.masked_var(advantages, exp.mask, unbiased=False).sqrt()),
        "returns/mean": float(ppo.masked_mean(returns, exp.mask)),
        "returns/std": float(ppo.masked_var(returns, exp.mask, unbiased=False).sqrt()),
        "response/length": float(exp.mask.sum(1).mean()),
    })
    exp.advantages = ppo.masked_whiten(advantages, exp.mask) if cfg.whiten_advantages else advantages
    exp.returns = returns


def _rows(padded: torch.Tensor, mask: torch.Tensor, index: list[int]) -> tensor_pb2.RaggedTensor:
    rows = codec.unpad_rows(padded[index], mask[index])
    return codec.ragged_to_pb(rows, torch.float32)


def _refs(plan: Plan) -> common_pb2.RowRefs:
    return common_pb2.RowRefs(keep=plan.send if plan.keep else [], cached=plan.cached)


def policy_request(exp: Experience, cfg: PPOConfig, key: common_pb2.TrainKey, plan: Plan, ptx=None,
                   kl_coef: float = 0.0, aggregation: int = policy_pb2.LOSS_AGGREGATION_TOKEN):
    """The Policy.Train request of one rank's part of a minibatch: the rows plan.send, and the kept rows
    plan.cached by id (controller/rows.py).

    kl_coef > 0 puts KL(pi || pi_ref) into the loss (the reference log-probs go along); aggregation: token or
    sequence mean (critic-free runs)."""
    index = plan.send
    ppo_objective = policy_pb2.PPOObjective(
        sequences=exp.seqs.select(index).to_pb(), old_logprobs=_rows(exp.logprobs, exp.mask, index),
        advantages=_rows(exp.advantages, exp.mask, index), clip_range=cfg.clip_range,
        entropy_coef=cfg.entropy_coef, temperature=cfg.temperature, kl_coef=kl_coef, aggregation=aggregation,
        ref_logprobs=_rows(exp.ref_logprobs, exp.mask, index) if kl_coef else None,
    )
    return policy_pb2.PolicyTrainRequest(key=key, ppo=ppo_objective, ptx=ptx, micro_batch_size=cfg.micro_batch_size,
                                         rows=_refs(plan))


def value_request(exp: Experience, cfg: PPOConfig, key: common_pb2.TrainKey, plan: Plan):
    """The Value.Train request of one rank's part of a minibatch (see policy_request)."""
    index = plan.send
    return value_pb2.ValueTrainRequest(
        key=key, sequences=exp.seqs.select(index).to_pb(), old_values=_rows(exp.values, exp.mask, index),
        returns=_rows(exp.returns, exp.mask, index), clip_range_value=cfg.clip_range_value,
        micro_batch_size=cfg.micro_batch_size, rows=_refs(plan),
    )


# Fields each rank reports as its share of the minibatch's value (normalised by the whole minibatch).
POLICY_ADDITIVE = ("loss", "policy_loss", "clip_fraction", "approx_kl", "entropy", "ptx_loss", "tokens", "kl_loss",
                   "reward_accuracy", "reward_margin")
VALUE_ADDITIVE = ("loss", "clip_fraction", "tokens")


def merge_shards(replies: list, additive: tuple[str, ...]):
    """One Train reply from the ranks' replies: shares summed; grad norm, version, EV as rank 0 saw them."""
    merged = type(replies[0])()
    merged.CopyFrom(replies[0])
    for name in additive:
        setattr(merged, name, sum(getattr(r, name) for r in replies))
    merged.replayed = all(r.replayed for r in replies)
    return merged


def _mean_stats(replies: list, fields: dict[str, str]) -> dict[str, float]:
    return {name: sum(getattr(r, attr) for r in replies) / len(replies) for name, attr in fields.items()}


POLICY_FIELDS = {"policy/loss": "policy_loss", "policy/clipfrac": "clip_fraction", "policy/approx_kl": "approx_kl",
                 "policy/entropy": "entropy", "policy/grad_norm": "grad_norm", "policy/ptx_loss": "ptx_loss",
                 "policy/kl_loss": "kl_loss"}
VALUE_FIELDS = {"value/loss": "loss", "value/clipfrac": "clip_fraction", "value/grad_norm": "grad_norm",
                "value/explained_variance": "explained_variance"}


def _train_rpc(stub):
    return stub.Train


@dataclass
class StepResult:
    """What one PPO iteration produced."""

    step: int
    stats: dict
    experience: Experience


class Runner:
    """What every algorithm's runner keeps: the run id, the step count, the seeded generator, the policy version.

    `phase` says where the current step is ("generate" and "score" before any
    Train of it was sent, "train" after, "idle" between steps): a step stopped
    before "train" changed no weights and can be abandoned. `state_dict` /
    `load_state_dict` are the runner's part of a run checkpoint
    (controller/durability.py).
    """

    def __init__(self, cfg: ControllerConfig, clients: ServiceClients):
        self.cfg = cfg
        self.clients = clients
        self.run_id = cfg.run_id or uuid.uuid4().hex[:12]
        # the run's lease on the trainers (TrainKey.secret): never shown by Status, kept in run.json for a resume
        self.lease_secret = secrets.token_hex(16)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step_count = 0
        self.policy_version = 0
        self.last_stats: dict = {}
        self.phase = "idle"
        self.rows = KeptRows(cfg.ppo.reuse_rows)  # rows of the current step each trainer rank keeps

    def train_key(self, step: int, minibatch_index: int) -> common_pb2.TrainKey:
        """The idempotency key of one Train request of this run, with the run's lease secret."""
        return common_pb2.TrainKey(run_id=self.run_id, step=step, minibatch_index=minibatch_index,
                                   secret=self.lease_secret)

    def lease(self) -> common_pb2.Lease:
        """The run's lease, for checkpoint requests and Release."""
        return common_pb2.Lease(run_id=self.run_id, secret=self.lease_secret)

    def state_dict(self) -> dict:
        """The runner's state between two steps, as JSON-ready data."""
        return {"step": self.step_count, "policy_version": self.policy_version,
                "generator": encode_generator(self.generator), "last_stats": self.last_stats}

    def load_state_dict(self, state: dict) -> None:
        """Go back to a state `state_dict` returned."""
        self.step_count, self.policy_version = state["step"], state["policy_version"]
        decode_generator(self.generator, state["generator"])
        self.last_stats = dict(state["last_stats"])


class PPORunner(Runner):
    """Runs PPO iterations against the services; `step()` is one iteration.

    Subclasses change what an iteration samples (`_next_prompts`), whether it asks the value service
    (`with_values`), how scores become advantages (`advantages`) and which services train and on what
    (`_train_requests`).
    """

    with_values = True  # rollouts ask the value service for V(s_t)

    def __init__(self, cfg: ControllerConfig, clients: ServiceClients, prompts: list[str], ptx_texts=None):
        super().__init__(cfg, clients)
        self.prompts = prompts
        self.ptx_texts = ptx_texts or []
        self.kl_ctl = kl_controller(cfg.ppo)
        self.moments = ppo.RunningMoments() if cfg.ppo.normalize_reward else None

    def state_dict(self) -> dict:
        moments = self.moments and [self.moments.count, self.moments.mean, self.moments.m2]
        return super().state_dict() | {"kl_coef": self.kl_ctl.value, "moments": moments}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.kl_ctl.value = state["kl_coef"]
        if self.moments is not None:
            self.moments.count, self.moments.mean, self.moments.m2 = state["moments"]

    def reward_sources(self) -> tuple:
        """(pool, weight, name) of each reward source of the run."""
        return tuple((pool, weight, name) for pool, _, weight, name in self.cfg.reward_sources())

    def _pick_prompts(self, n: int) -> list[str]:
        """`n` prompts in the run's seeded order (cycled when there are fewer)."""
        order = torch.randperm(len(self.prompts), generator=self.generator)[:n]
        picked = [self.prompts[i] for i in order.tolist()]
        while len(picked) < n:  # fewer prompts than a batch: cycle
            picked += picked[: n - len(picked)]
        return picked

    def _next_prompts(self) -> list[str]:
        return self._pick_prompts(self.cfg.ppo.batch_size)

    def advantages(self, exp: Experience) -> None:
        """Per-token KL penalty, GAE and whitening (fills exp.advantages, exp.returns and stats)."""
        compute_advantages(exp, self.cfg.ppo, self.kl_ctl.value, self.moments)

    def _ptx_shards(self, ranks: int) -> list[policy_pb2.PtxBatch | None]:
        """One PPO-ptx batch per policy rank (None where a rank gets no pretraining rows)."""
        if not self.ptx_texts or self.cfg.ppo.ptx_coef == 0:
            return [None] * ranks
        order = torch.randperm(len(self.ptx_texts), generator=self.generator)[: self.cfg.ppo.ptx_batch_size].tolist()
        parts = split_rows(len(order), ranks)
        batches = [policy_pb2.PtxBatch(texts=tensor_pb2.TextBatch(texts=[self.ptx_texts[order[i]] for i in part]),
                                       coef=self.cfg.ppo.ptx_coef) for part in parts]
        return batches + [None] * (ranks - len(batches))

    async def train_ranks(self, role: str, index: list[int], request_for) -> list:
        """Train each rank of `role` on its shard of minibatch rows `index`; request_for(rank, plan) makes its
        request. Rows a rank kept earlier in the step go by id; a rank that no longer holds them gets the
        minibatch again in full (controller/rows.py). Returns the ranks' replies."""
        parts = self.rows.shards(role, index, self.clients.ranks(role))
        plans = [self.rows.plan(role, rank, part) for rank, part in enumerate(parts)]
        try:
            replies = await self.clients.each_rank(role, _train_rpc, [request_for(r, p) for r, p in enumerate(plans)])
        except grpc.aio.AioRpcError as error:
            if error.code() not in MISSED or not any(p.cached for p in plans):
                raise
            self.rows.missed(role, error)
            plans = [Plan(part, [], False) for part in parts]
            replies = await self.clients.each_rank(role, _train_rpc, [request_for(r, p) for r, p in enumerate(plans)])
        for rank, plan in enumerate(plans):
            self.rows.sent(role, rank, plan)
        self.clients.watch.trained(role, replies)
        return replies

    def _train_requests(self, exp: Experience) -> dict:
        """The services a step trains: role -> (request_for(rank, plan, key, ptx shards), additive reply fields)."""
        cfg = self.cfg.ppo
        return {"policy": (lambda rank, plan, key, ptx: policy_request(exp, cfg, key, plan, ptx[rank]),
                           POLICY_ADDITIVE),
                "value": (lambda rank, plan, key, ptx: value_request(exp, cfg, key, plan), VALUE_ADDITIVE)}

    def _minibatches(self, exp: Experience, step: int) -> list[tuple]:
        """(Train key, rows, PPO-ptx shards) of each optimizer step of `step`: ppo_epochs passes over the batch
        in a fresh order each, drawn from the run's generator."""
        cfg = self.cfg.ppo
        n = cfg.batch_size // cfg.minibatch_size
        minibatches = []
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(len(exp.prompts), generator=self.generator).tolist()
            for mb in range(n):
                minibatches.append((self.train_key(step, epoch * n + mb),
                                    order[mb * cfg.minibatch_size : (mb + 1) * cfg.minibatch_size],
                                    self._ptx_shards(self.clients.ranks("policy"))))
        return minibatches

    async def _train_roles(self, exp: Experience, step: int) -> dict[str, list]:
        """Every trained role through the step's minibatches, each at its own pace (policy and value steps do
        not wait for each other); role -> its merged replies in minibatch order.

        When one role fails, the others stop after the call they have in flight, so that no Train of the step
        is still running when the failure reaches the driver (which may load checkpoints next)."""
        minibatches = self._minibatches(exp, step)
        failures: list[BaseException] = []

        async def train(role: str, request_for, additive) -> list:
            merged = []
            try:
                for key, index, ptx in minibatches:
                    if failures:
                        break
                    replies = await self.train_ranks(
                        role, index, lambda rank, plan, key=key, ptx=ptx: request_for(rank, plan, key, ptx))
                    merged.append(merge_shards(replies, additive))
            except BaseException as error:
                failures.append(error)
                raise
            return merged

        roles = self._train_requests(exp)
        results = await asyncio.gather(*(train(role, *spec) for role, spec in roles.items()), return_exceptions=True)
        if failures:
            raise failures[0]
        return dict(zip(roles, results))

    async def _train(self, exp: Experience, step: int, timings: dict) -> dict:
        start = time.perf_counter()
        self.rows.begin(step)
        replies = await self._train_roles(exp, step)
        timings["train"] = time.perf_counter() - start
        policy = replies["policy"]
        self.policy_version = policy[-1].model_version
        stats = _mean_stats(policy, POLICY_FIELDS)
        if "value" in replies:
            stats |= _mean_stats(replies["value"], VALUE_FIELDS)
        stats["policy/first_minibatch_approx_kl"] = policy[0].approx_kl
        stats["policy/first_minibatch_clipfrac"] = policy[0].clip_fraction
        return stats

    async def step(self) -> StepResult:
        """One PPO iteration; returns its statistics."""
        step = self.step_count
        timings: dict[str, float] = {}
        seed = row_seed(self.cfg.seed, step) or 1  # sampling seed of this iteration (0 would mean unseeded)
        self.phase = "generate"
        exp = await collect(self.clients, self._next_prompts(), self.cfg.ppo, timings, seed,
                            lambda phase: setattr(self, "phase", phase), with_values=self.with_values,
                            rewards=self.reward_sources())
        self.advantages(exp)
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
