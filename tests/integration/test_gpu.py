"""On a CUDA device (skipped where no GPU is present): the policy service in bf16, the device-memory gauges."""

import pytest
import torch

from rlhf.v1 import policy_pb2_grpc
from services.metrics import DeviceMemoryCollector
from tests.support.rpc import ppo_train, rows, sequences_from_generation, text_generate
from tests.support.servers import ServerThread, service_config
from training import synthetic

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_generate_and_train_on_cuda_bf16(tiny_dirs):
    server = ServerThread(service_config("policy", tiny_dirs["lm"], model={"device": "cuda", "dtype": "bf16"})).start()
    try:
        stub = policy_pb2_grpc.PolicyServiceStub(server.channel())
        reply = stub.Generate(text_generate(synthetic.train_prompts(8, seed=0), max_new_tokens=8), timeout=120)
        seqs = sequences_from_generation(reply)
        old = rows(reply.response_logprobs)
        result = stub.Train(ppo_train(seqs, old, [torch.randn(r.numel()) for r in old]), timeout=120)
        assert result.model_version == 1 and abs(result.approx_kl) < 1e-2
    finally:
        server.stop()


def test_device_memory_on_a_real_gpu():
    torch.ones(1024, device="cuda")
    got = {s.name: s.value for f in DeviceMemoryCollector("policy", "cuda").collect() for s in f.samples}
    assert got["rlhf_device_memory_allocated_bytes"] > 0 and got["rlhf_device_memory_total_bytes"] > 0
