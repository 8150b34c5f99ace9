"""ValueService: the critic's per-token values and clipped value-loss steps."""

import math

import torch

from controller import ppo
from rlhf.v1 import value_pb2, value_pb2_grpc
from services import codec
from services.batch import Sequences
from services.batcher import Batcher
from services.checkpoint import save_checkpoint
from services.engine import TrainEngine
from services.errors import InvalidArgument
from services.idempotency import AppliedSteps, key_from_pb
from services.inference import response_values
from services.server import ModelServicer, chunks, micro_batch_size


class ValueServicer(ModelServicer, value_pb2_grpc.ValueServiceServicer):
    """Holds the critic; Values is batched, Train is one step per request."""

    role = "value"
    service_name = "rlhf.v1.ValueService"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.trainer: TrainEngine | None = None
        self.applied = AppliedSteps(cfg.training.idempotency_cache)
        self.batcher = Batcher(self._run_values, cfg.batching, self.executor)

    def after_load(self, loaded) -> None:
        self.trainer = TrainEngine(loaded.model, self.cfg.training, loaded.dtype, loaded.device)

    def model_version(self) -> int:
        return self.trainer.version if self.trainer else 0

    def _run_values(self, _key, seqs: list[tuple[torch.Tensor, int]]):
        return self.per_sequence(response_values, self.trainer.module, seqs)

    async def Values(self, request, context):
        m = self.require()
        seqs = Sequences.from_pb(request.sequences, "sequences", m.limits)
        version = self.model_version()
        tokens = sum(int(r.numel()) for r in seqs.rows)
        rows = await self.batcher.submit(None, list(zip(seqs.rows, seqs.prompt_lengths)), tokens)
        return value_pb2.ValuesResponse(values=codec.ragged_to_pb(rows, torch.float32), model_version=version)

    def _train(self, seqs: Sequences, old_values, returns, clip, micro: int) -> value_pb2.ValueTrainResponse:
        m = self.loaded
        n_tokens = sum(seqs.response_lengths)
        stats = {"loss": 0.0, "clip_fraction": 0.0}
        predicted: dict[int, torch.Tensor] = {}

        def micro_loss(idx):
            def fn(engine):
                input_ids, attention_mask, index, mask = seqs.select(idx).padded(m.pad_id)
                full = engine(input_ids=input_ids.to(m.device), attention_mask=attention_mask.to(m.device))  # (b, T)
                values = full.gather(1, index.to(m.device)).float()  # (b, R)
                old, _ = codec.pad_rows([old_values[i] for i in idx])
                ret, _ = codec.pad_rows([returns[i] for i in idx])
                loss, clipfrac = ppo.value_loss(values, old.to(m.device), ret.to(m.device), mask.to(m.device),
                                                clip or None, n_tokens)
                stats["loss"] += float(loss.detach())
                stats["clip_fraction"] += float(clipfrac)
                for j, i in enumerate(idx):
                    predicted[i] = values[j, : int(mask[j].sum())].detach().cpu()
                return loss

            return fn

        grad_norm = self.trainer.step([micro_loss(idx) for idx in chunks(len(seqs), micro)])
        v, mask = codec.pad_rows([predicted[i] for i in range(len(seqs))])
        r, _ = codec.pad_rows(returns)
        ev = float(ppo.explained_variance(v, r, mask))
        return value_pb2.ValueTrainResponse(
            grad_norm=grad_norm, model_version=self.trainer.version, tokens=n_tokens, explained_variance=ev, **stats
        )

    async def Train(self, request, context):
        m = self.require()
        key = key_from_pb(request.key)
        seqs = Sequences.from_pb(request.sequences, "sequences", m.limits)
        lengths = seqs.response_lengths
        old_values = codec.float_rows_from_pb(request.old_values, "old_values", lengths)
        returns = codec.float_rows_from_pb(request.returns, "returns", lengths)
        clip = request.clip_range_value
        if not (math.isfinite(clip) and clip >= 0):
            raise InvalidArgument("clip_range_value", f"must be finite and >= 0, got {clip}")
        micro = micro_batch_size(request.micro_batch_size, self.cfg.training.micro_batch_size)
        work = lambda: self.on_model_thread(self._train, seqs, old_values, returns, clip, micro)  # noqa: E731
        result, replayed = await self.applied.run(key, work)
        response = value_pb2.ValueTrainResponse()
        response.CopyFrom(result)
        response.replayed = replayed
        return response

    async def SaveCheckpoint(self, request, context):
        m = self.require()
        return await save_checkpoint(self, request, self.trainer.module, m.tokenizer)


add_to_server = value_pb2_grpc.add_ValueServiceServicer_to_server
