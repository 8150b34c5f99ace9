"""The policy service on a CUDA device in bf16 (skipped where no GPU is present)."""

import pytest
import torch

from demo import task
from rlhf.v1 import policy_pb2_grpc
from tests.conftest import ServerThread, service_config
from tests.rpc import ppo_train, rows, sequences_from_generation, text_generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_generate_and_train_on_cuda_bf16(tiny_dirs):
    server = ServerThread(service_config("policy", tiny_dirs["lm"], model={"device": "cuda", "dtype": "bf16"})).start()
    try:
        stub = policy_pb2_grpc.PolicyServiceStub(server.channel())
        reply = stub.Generate(text_generate(task.train_prompts(8, seed=0), max_new_tokens=8), timeout=120)
        seqs = sequences_from_generation(reply)
        old = rows(reply.response_logprobs)
        result = stub.Train(ppo_train(seqs, old, [torch.randn(r.numel()) for r in old]), timeout=120)
        assert result.model_version == 1 and abs(result.approx_kl) < 1e-2
    finally:
        server.stop()
