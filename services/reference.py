"""ReferenceService: log-probs of the frozen SFT model, for the per-token KL penalty."""

import torch

from rlhf.v1 import reference_pb2_grpc
from services.batcher import Batcher
from services.inference import response_logprobs
from services.server import ModelServicer


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
        return self.per_sequence(response_logprobs, self.loaded.model, seqs, temperature)

    async def LogProbs(self, request, context):
        return await self.answer_logprobs(request, self.batcher, 0)


add_to_server = reference_pb2_grpc.add_ReferenceServiceServicer_to_server
