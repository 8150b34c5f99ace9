"""ReferenceService: log-probs of the frozen SFT model, for the per-token KL penalty."""

import torch

from rlhf.v1 import policy_pb2, reference_pb2_grpc
from services import codec
from services.batch import Sequences
from services.batcher import Batcher
from services.inference import response_logprobs
from services.policy import check_temperature
from services.server import ModelServicer, chunks


class ReferenceServicer(ModelServicer, reference_pb2_grpc.ReferenceServiceServicer):
    """Frozen; concurrent LogProbs requests are batched."""

    role = "reference"
    service_name = "rlhf.v1.ReferenceService"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.batcher = Batcher(self._run, cfg.batching, self.executor)

    def after_load(self, loaded) -> None:
        loaded.model.requires_grad_(False)

    def _run(self, temperature, seqs: list[tuple[torch.Tensor, int]]):
        m = self.loaded
        batch = Sequences([s[0] for s in seqs], [s[1] for s in seqs])
        out = []
        with torch.no_grad():
            for idx in chunks(len(batch), self.cfg.batching.max_batch_size):
                out.extend(response_logprobs(m.model, batch.select(idx), m.pad_id, m.device, temperature))
        return out

    async def LogProbs(self, request, context):
        m = self.require()
        seqs = Sequences.from_pb(request.sequences, "sequences", m.limits)
        temperature = check_temperature(request.temperature, "temperature")
        tokens = sum(int(r.numel()) for r in seqs.rows)
        rows = await self.batcher.submit(temperature, list(zip(seqs.rows, seqs.prompt_lengths)), tokens)
        return policy_pb2.LogProbsResponse(logprobs=codec.ragged_to_pb(rows, torch.float32), model_version=0)


add_to_server = reference_pb2_grpc.add_ReferenceServiceServicer_to_server
