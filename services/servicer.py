"""The servicer base classes: loading, readiness, the model thread, Info, Train steps, checkpoints.

All model work of a service runs on one "model thread" so that inference and
optimizer steps never interleave and the event loop stays free to answer
health checks. Serving them (server, health, reflection, drain) is
services/serving.py.
"""

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

import torch

from rlhf.v1 import common_pb2
from services import codec
from services.batch import Sequences, budget_chunks, check_budget
from services.batcher import Batcher, call_alive
from services.checkpoint import (
    checkpoint_root,
    latest_state,
    load_training_state,
    read_state,
    resolve_under,
    save_checkpoint,
    save_training_state,
)
from services.config import ServiceConfig
from services.cpus import ThreadPlan, apply_threads
from services.engine import TrainEngine
from services.errors import GroupRejected, InvalidArgument, NotFound, NotReady, Refused, WrongRank
from services.idempotency import AppliedSteps, TrainerLease, check_run_id, key_from_pb
from services.metrics import NoMetrics, ServiceMetrics
from services.models import LOADERS, LoadedModel
from services.row_cache import RowCache, refs_from_pb
from services.validation import check_temperature

log = logging.getLogger(__name__)

INLINE_BYTES = 4096  # requests this small are decoded and tokenised on the event loop (ModelServicer.off_loop)


class ModelServicer:
    """Base of the four model servicers: loading, readiness, the model thread, Info."""

    role = ""
    service_name = ""  # full proto service name, e.g. rlhf.v1.PolicyService

    def __init__(self, cfg: ServiceConfig):
        self.cfg = cfg
        self.instance_id = uuid.uuid4().hex  # new on every start: clients tell a restarted process by it
        self.loaded: LoadedModel | None = None
        self.threads: ThreadPlan | None = None  # set when the model loads
        self.draining = False
        self.metrics: ServiceMetrics | NoMetrics | None = None  # set by build_server
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.role}-model")
        # decoding and tokenising requests, off the event loop and off the model thread
        self.text_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{self.role}-text")

    def load(self) -> None:
        """Load weights (runs on the model thread); subclasses add engines in after_load."""
        self.threads = apply_threads(self.cfg.server.num_threads)
        torch.manual_seed(self.cfg.server.seed)
        loaded = self.load_model()
        # every decoder of token rows enforces the configured rows-per-request bound
        loaded.limits = dataclasses.replace(loaded.limits, max_batch=self.cfg.batching.max_request_rows,
                                            max_tokens=self.cfg.batching.max_request_tokens)
        self.after_load(loaded)
        self.loaded = loaded

    def load_model(self) -> LoadedModel:
        """The role's model and tokenizer (on the model thread)."""
        return LOADERS[self.role](self.cfg.model)

    def after_load(self, loaded: LoadedModel) -> None:
        """Hook for role-specific set-up once the model is in memory."""

    def on_drain(self) -> None:
        """Hook called when SIGTERM starts the drain."""

    def require(self) -> LoadedModel:
        """The loaded model, or UNAVAILABLE while loading or draining."""
        if self.loaded is None:
            raise NotReady(f"{self.role} service is still loading its weights")
        if self.draining:
            raise NotReady(f"{self.role} service is shutting down")
        return self.loaded

    async def on_model_thread(self, fn, *args):
        """Run fn(*args) on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def off_loop(self, fn, *args, size: int | None = None):
        """Run fn(*args) (request decoding, tokenising) on the text threads, so the event loop keeps answering;
        a request of at most INLINE_BYTES (`size`: its text characters or tensor bytes) runs here at once, as the
        trip to a thread and back costs more than the work."""
        if size is not None and size <= INLINE_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.text_pool, fn, *args)

    def model_version(self) -> int:
        """Applied optimizer steps; frozen models stay at 0."""
        return 0

    def model_info(self) -> common_pb2.ModelInfo:
        """Info RPC payload."""
        m = self.require()
        rank, size = self.data_parallel()
        return common_pb2.ModelInfo(
            role=self.role,
            model_name=self.cfg.model.path,
            tokenizer_fingerprint=m.fingerprint,
            vocab_size=m.limits.vocab_size,
            max_sequence_length=m.limits.max_length,
            device=str(m.device),
            dtype=self.cfg.model.dtype,
            model_version=self.model_version(),
            eos_token_id=m.eos_id,
            pad_token_id=m.pad_id,
            num_parameters=sum(p.numel() for p in m.model.parameters()) if m.model is not None else 0,
            data_parallel_rank=rank,
            data_parallel_size=size,
            instance_id=self.instance_id,
            torch_threads=self.threads.intra_op,
            cpu_limit=self.threads.cpus / self.threads.processes,
        )

    def data_parallel(self) -> tuple[int, int]:
        """(rank, size) of this process in its data-parallel group; (0, 1) when alone."""
        return 0, 1

    async def Info(self, request, context):
        return self.model_info()

    def per_sequence(self, fn, model, items: list[tuple[torch.Tensor, int]], *args) -> list:
        """fn(model, Sequences, pad_id, device, *args) over max_batch_size chunks of (row, prompt length) items.

        Runs without gradients on the model thread (batchers call it); returns one result per item.
        """
        m = self.loaded
        batch = Sequences([row for row, _ in items], [p for _, p in items])
        with torch.no_grad():
            return self.model_calls([int(row.numel()) for row in batch.rows],
                                    lambda idx: fn(model, batch.select(idx), m.pad_id, m.device, *args))

    def model_calls(self, lengths: list[int], run) -> list:
        """run(index list) over chunks of rows of similar length within max_batch_size rows and max_batch_tokens
        padded tokens; one result per row, in the rows' order. Records each call's padding."""
        out: list = [None] * len(lengths)
        cfg = self.cfg.batching
        for idx in budget_chunks(lengths, cfg.max_batch_size, cfg.max_batch_tokens, by_length=True):
            width = max(lengths[i] for i in idx)
            self.on_padding(1 - sum(lengths[i] for i in idx) / (width * len(idx)))
            for i, result in zip(idx, run(idx)):
                out[i] = result
        return out

    def on_padding(self, waste: float) -> None:
        """Hook: the share of padded positions in one model call (metrics observe it)."""

    async def answer_logprobs(self, request, batcher, version: int, context) -> common_pb2.LogProbsResponse:
        """Validate a LogProbsRequest, run it through `batcher`, encode the reply."""
        with batcher.admit():
            m = self.require()
            seqs = await self.off_loop(Sequences.from_pb, request.sequences, "sequences", m.limits,
                                       size=len(request.sequences.tokens.values.raw))
            temperature = check_temperature(request.temperature, "temperature")
            tokens = sum(int(r.numel()) for r in seqs.rows)
            rows = await batcher.submit(temperature, list(zip(seqs.rows, seqs.prompt_lengths)), tokens, call_alive(context))
            return common_pb2.LogProbsResponse(logprobs=codec.ragged_to_pb(rows, torch.float32), model_version=version,
                                               instance_id=self.instance_id)

    async def close(self) -> None:
        """Stop the batching tasks (after the server has drained)."""
        for value in vars(self).values():
            if isinstance(value, Batcher):
                await value.close()


class FrozenServicer(ModelServicer):
    """A servicer whose weights never change (reference, reward): one batcher over `run_batch`."""

    def __init__(self, cfg: ServiceConfig):
        super().__init__(cfg)
        self.batcher = Batcher(self.run_batch, cfg.batching, self.executor)

    def after_load(self, loaded: LoadedModel) -> None:
        if loaded.model is not None:
            loaded.model.requires_grad_(False)

    def run_batch(self, key, items: list):
        """The model call of one batch of requests' items (on the model thread)."""
        raise NotImplementedError


class TrainableServicer(ModelServicer):
    """A servicer with a DeepSpeed TrainEngine (policy, value): Train steps, versions, checkpoints."""

    train_response = None  # the Train reply's message class (applied results are stored as it)

    def __init__(self, cfg: ServiceConfig):
        super().__init__(cfg)
        self.trainer: TrainEngine | None = None
        self.applied = AppliedSteps(cfg.training.idempotency_cache)
        self.lease = TrainerLease(cfg.training.lease_seconds)
        self.skipped_steps = 0  # Train steps not applied: loss or gradient norm not finite
        self.row_cache = RowCache(cfg.training.row_cache_tokens)

    def after_load(self, loaded: LoadedModel) -> None:
        self.trainer = TrainEngine(loaded.model, self.cfg.training, loaded.dtype, loaded.device)
        if self.cfg.training.restore_from:
            self.restore_latest(self.cfg.training.restore_from)

    def restore_latest(self, runs_dir: str) -> None:
        """At start: load the newest complete training state under checkpoint_dir/runs_dir, if there is one."""
        root = resolve_under(checkpoint_root(self), runs_dir)
        found = latest_state(root, self.trainer.rank)
        if found is None:
            log.info("%s: no complete training state under %s; starting from the model's weights", self.role, root)
            return
        extra = read_state(self, found / f"rank-{self.trainer.rank}")
        self.applied.restore(extra["applied"], self.train_response)
        self.lease.restore(extra.get("lease"))
        log.info("%s: continued from %s (model version %d)", self.role, found, self.trainer.version)

    def model_version(self) -> int:
        return self.trainer.version if self.trainer else 0

    def data_parallel(self) -> tuple[int, int]:
        return (self.trainer.rank, self.trainer.world_size) if self.trainer else (0, 1)

    def on_drain(self) -> None:
        if self.trainer is not None:
            self.trainer.closing.set()

    def micro_batches(self, lengths: list[int], micro: int) -> list[list[int]]:
        """Micro-batches of at most `micro` rows and training.max_micro_batch_tokens padded tokens."""
        return budget_chunks(lengths, micro, self.cfg.training.max_micro_batch_tokens)

    def with_cached_rows(self, request, carried: list, limits) -> list:
        """The records of a Train request's rows, each a tuple whose first item is the row's token ids: those it
        carries (already checked by their decoder), then the kept ones it names (request.rows), with the whole
        minibatch checked against the request limits; keeps the carried ones when it asks."""
        keep, cached = refs_from_pb(request.rows, len(carried))
        step = (request.key.run_id, request.key.step)
        records = list(carried)
        if cached:
            records += self.row_cache.take(step, cached, "rows.cached")
            if len(records) > limits.max_batch:
                raise InvalidArgument("rows.cached", f"{len(records)} rows exceed the limit of {limits.max_batch}")
            check_budget(len(records), max(int(r[0].numel()) for r in records), "rows.cached", limits.max_tokens)
        if keep:
            self.row_cache.keep(step, keep, carried, [int(r[0].numel()) for r in carried])
        return records

    async def train_step(self, request, decode, work):
        """Decode a Train request, then apply `work(*decoded)` once per idempotency key on the model thread.

        decode(request, loaded) -> tuple of arguments; it raises InvalidArgument.
        In a data-parallel group a rank whose shard fails to decode still joins
        the step's first collective, so the other ranks fail the step too
        (ABORTED) instead of waiting for it.
        """
        m = self.require()
        try:
            key = key_from_pb(request.key)
            self.lease.take(key[0], request.key.secret, self.role)
            decoded = await self.off_loop(decode, request, m)
        except (InvalidArgument, Refused, NotFound):
            if self.trainer is not None and self.trainer.world_size > 1:
                with contextlib.suppress(GroupRejected):
                    await self.on_model_thread(self.trainer.agree, [], False)
            raise
        result, replayed = await self.applied.run(key, lambda: self.on_model_thread(work, *decoded))
        if result.skipped and not replayed:
            self.skipped_steps += 1
            log.warning("%s: Train %s not applied: its loss or gradient norm is not finite", self.role, key)
        response = type(result)()
        response.CopyFrom(result)
        response.replayed = replayed
        response.instance_id = self.instance_id
        return response

    async def SaveCheckpoint(self, request, context):
        m = self.require()
        if request.training_state:  # every rank writes its own part
            return await save_training_state(self, request)
        if self.trainer.rank != 0:  # every rank holds the same weights; rank 0 writes them
            raise WrongRank(f"SaveCheckpoint goes to rank 0 of the {self.role} data-parallel group, "
                            f"this is rank {self.trainer.rank}")
        return await save_checkpoint(self, request, self.trainer.module, m.tokenizer)

    async def LoadCheckpoint(self, request, context):
        self.require()
        return await load_training_state(self, request)

    async def Release(self, request, context):
        self.require()
        run_id = check_run_id(request.lease.run_id, "lease.run_id")
        released = self.lease.release(run_id, request.lease.secret)
        if released:
            self.row_cache.clear()  # the run's kept rows go with its lease
            log.info("%s: run %s released its lease", self.role, run_id)
        return common_pb2.ReleaseResponse(released=released)
