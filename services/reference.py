"""ReferenceService: log-probs of the frozen SFT model, for the per-token KL penalty.

backend: local runs the model here; backend: tgi loads only the tokenizer and
asks a text-generation-inference server for the log-probs (services/tgi.py).
"""

import torch

from rlhf.v1 import common_pb2, reference_pb2, reference_pb2_grpc
from services import codec
from services.batch import Sequences
from services.inference import response_logprobs
from services.models import LoadedModel, load_tokenizer_only
from services.servicer import FrozenServicer
from services.tgi import TGIClient, check_tgi_temperature


class ReferenceServicer(FrozenServicer, reference_pb2_grpc.ReferenceServiceServicer):
    """Frozen; concurrent LogProbs requests are batched (local) or sent row by row to TGI (tgi)."""

    role = "reference"
    service_name = reference_pb2.DESCRIPTOR.services_by_name["ReferenceService"].full_name

    def __init__(self, cfg):
        super().__init__(cfg)
        self.tgi: TGIClient | None = None  # set when the tokenizer loads, with backend: tgi

    def load_model(self) -> LoadedModel:
        return load_tokenizer_only(self.cfg.model) if self.cfg.backend == "tgi" else super().load_model()

    def after_load(self, loaded: LoadedModel) -> None:
        super().after_load(loaded)
        if self.cfg.backend == "tgi":
            self.tgi = TGIClient(self.cfg.tgi, loaded.tokenizer)

    def run_batch(self, temperature, seqs: list[tuple[torch.Tensor, int]]):
        return self.per_sequence(response_logprobs, self.loaded.model, seqs, temperature)

    async def LogProbs(self, request, context):
        if self.cfg.backend == "tgi":
            return await self.tgi_logprobs(request, context)
        return await self.answer_logprobs(request, self.batcher, 0, context)

    async def tgi_logprobs(self, request, context) -> common_pb2.LogProbsResponse:
        """LogProbs validated as the local backend does, the log-probs from the TGI server."""
        with self.batcher.admit():
            m = self.require()
            seqs = await self.off_loop(Sequences.from_pb, request.sequences, "sequences", m.limits)
            check_tgi_temperature(request.temperature, "temperature")
            texts = await self.off_loop(self.tgi.texts, seqs)
            rows = await self.tgi.logprobs(seqs, texts, context.time_remaining())
            return common_pb2.LogProbsResponse(logprobs=codec.ragged_to_pb(rows, torch.float32), model_version=0,
                                               instance_id=self.instance_id)

    async def close(self) -> None:
        await super().close()
        if self.tgi is not None:
            await self.tgi.close()


add_to_server = reference_pb2_grpc.add_ReferenceServiceServicer_to_server
