"""ValueService: the critic's per-token values and clipped value-loss steps."""

import torch

from rlhf.v1 import value_pb2, value_pb2_grpc
from services import codec, objectives
from services.batch import Sequences
from services.batcher import Batcher, call_alive
from services.inference import response_values
from services.servicer import TrainableServicer
from services.validation import check_range, micro_batch_size


class ValueServicer(TrainableServicer, value_pb2_grpc.ValueServiceServicer):
    """Holds the critic; Values is batched, Train is one step per request."""

    role = "value"
    train_response = value_pb2.ValueTrainResponse
    service_name = value_pb2.DESCRIPTOR.services_by_name["ValueService"].full_name

    def __init__(self, cfg):
        super().__init__(cfg)
        self.batcher = Batcher(self._run_values, cfg.batching, self.executor)

    def _run_values(self, _key, seqs: list[tuple[torch.Tensor, int]]):
        return self.per_sequence(response_values, self.trainer.module, seqs)

    async def Values(self, request, context):
        with self.batcher.admit():
            m = self.require()
            seqs = await self.off_loop(Sequences.from_pb, request.sequences, "sequences", m.limits,
                                       size=len(request.sequences.tokens.values.raw))
            version = self.model_version()
            tokens = sum(int(r.numel()) for r in seqs.rows)
            rows = await self.batcher.submit(None, list(zip(seqs.rows, seqs.prompt_lengths)), tokens, call_alive(context))
            return value_pb2.ValuesResponse(values=codec.ragged_to_pb(rows, torch.float32), model_version=version,
                                           instance_id=self.instance_id)

    def _train(self, seqs: Sequences, old_values, returns, clip, micro: int) -> value_pb2.ValueTrainResponse:
        """One optimizer step. In a data-parallel group loss and clip fraction are this shard's share."""
        m = self.loaded
        tokens = sum(seqs.response_lengths)  # this shard's
        n_tokens = self.trainer.agree([tokens])[0]  # the whole minibatch's
        stats = {"loss": 0.0, "clip_fraction": 0.0}
        predicted: dict[int, torch.Tensor] = {}

        def micro_loss(idx):
            def fn(engine):
                input_ids, attention_mask, index, mask = seqs.select(idx).padded(m.pad_id)
                full = engine(input_ids=input_ids.to(m.device), attention_mask=attention_mask.to(m.device))  # (b, T)
                values = full.gather(1, index.to(m.device)).float()  # (b, R)
                old, _ = codec.pad_rows([old_values[i] for i in idx])
                ret, _ = codec.pad_rows([returns[i] for i in idx])
                loss, clipfrac = objectives.value_loss(values, old.to(m.device), ret.to(m.device), mask.to(m.device),
                                                clip or None, n_tokens)
                stats["loss"] += float(loss.detach())
                stats["clip_fraction"] += float(clipfrac)
                for j, i in enumerate(idx):
                    predicted[i] = values[j, : int(mask[j].sum())].detach().cpu()
                return loss

            return fn

        grad_norm, applied = self.trainer.step(
            [micro_loss(idx) for idx in self.micro_batches([int(r.numel()) for r in seqs.rows], micro)])
        if not applied:  # nothing to measure: the weights did not move
            return value_pb2.ValueTrainResponse(grad_norm=grad_norm, model_version=self.trainer.version,
                                                tokens=tokens, skipped=True, **stats)
        v = torch.cat([predicted[i] for i in range(len(seqs))])  # every response token, (N,)
        r = torch.cat(returns)
        sums = self.trainer.agree(objectives.explained_variance_sums(v, r, torch.ones_like(r)))  # the whole minibatch's
        return value_pb2.ValueTrainResponse(
            grad_norm=grad_norm, model_version=self.trainer.version, tokens=tokens,
            explained_variance=objectives.explained_variance_from_sums(sums), **stats,
        )

    def _decode_train(self, request, m) -> tuple:
        bound = self.cfg.training.max_abs_input
        clip = check_range(request.clip_range_value, "clip_range_value", 0.0, bound)
        carried = []  # (tokens, prompt length, old values, returns) per row
        if not (request.rows.cached and not request.sequences.tokens.lengths):
            seqs = Sequences.from_pb(request.sequences, "sequences", m.limits)
            lengths = seqs.response_lengths
            old_values = codec.float_rows_from_pb(request.old_values, "old_values", lengths, bound=bound)
            returns = codec.float_rows_from_pb(request.returns, "returns", lengths, bound=bound)
            carried = list(zip(seqs.rows, seqs.prompt_lengths, old_values, returns))
        records = self.with_cached_rows(request, carried, m.limits)
        rows, prompts, old_values, returns = (list(c) for c in zip(*records))
        return (Sequences(rows, prompts), old_values, returns, clip,
                micro_batch_size(request.micro_batch_size, self.cfg.training.micro_batch_size))

    async def Train(self, request, context):
        return await self.train_step(request, self._decode_train, self._train)


add_to_server = value_pb2_grpc.add_ValueServiceServicer_to_server
