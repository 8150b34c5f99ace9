"""ReferenceService: log-probs of the frozen SFT model, for the per-token KL penalty."""

import torch

from rlhf.v1 import reference_pb2, reference_pb2_grpc
from services.inference import response_logprobs
from services.servicer import FrozenServicer


class ReferenceServicer(FrozenServicer, reference_pb2_grpc.ReferenceServiceServicer):
    """Frozen; concurrent LogProbs requests are batched."""

    role = "reference"
    service_name = reference_pb2.DESCRIPTOR.services_by_name["ReferenceService"].full_name

    def run_batch(self, temperature, seqs: list[tuple[torch.Tensor, int]]):
        return self.per_sequence(response_logprobs, self.loaded.model, seqs, temperature)

    async def LogProbs(self, request, context):
        return await self.answer_logprobs(request, self.batcher, 0, context)


add_to_server = reference_pb2_grpc.add_ReferenceServiceServicer_to_server
