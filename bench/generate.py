"""`rlhf bench generate`: Policy.Generate over gRPC vs in-process model.generate.

Both sides use the same checkpoint, prompts (as token ids), batch size,
sampling settings and thread count, and are timed alternately in one run so
that machine noise hits both alike. The figure is tokens generated per second.
"""

import asyncio
import json
import pathlib
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rlhf.v1 import policy_pb2, policy_pb2_grpc
from services import codec
from services.channels import open_channel
from services.inference import Sampling, left_pad
from services.launcher import LocalMesh
from services.models import fuse_activations


def bench_model(out: pathlib.Path) -> pathlib.Path:
    """A small local GPT-2 (4 layers, 256 wide) with the demo's tokenizer."""
    from training import synthetic, tiny

    tokenizer = tiny.build_tokenizer(synthetic.corpus_texts(0), out / "tokenizer")
    return pathlib.Path(tiny.build_tiny_lm(tokenizer, out / "model", n_layer=4, n_embd=256, n_head=4, n_positions=256))


def prompt_rows(tokenizer, batch_size: int) -> list[torch.Tensor]:
    """Token ids of `batch_size` short prompts."""
    from training import synthetic

    texts = synthetic.train_prompts(batch_size, seed=0)
    return [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def count_tokens(rows) -> int:
    return sum(int(r.numel()) for r in rows)


def time_grpc(stub, prompts, sampling: policy_pb2.SamplingParams) -> tuple[float, int]:
    request = policy_pb2.GenerateRequest(prompt_tokens=codec.ragged_to_pb(prompts, torch.int32), sampling=sampling)
    start = time.perf_counter()
    reply = stub.Generate(request, timeout=600)
    seconds = time.perf_counter() - start
    return seconds, count_tokens(codec.ragged_from_pb(reply.response_tokens, "response_tokens"))


def time_local(model, prompts, s: Sampling, pad_id: int, eos_id: int) -> tuple[float, int]:
    """Plain transformers sampling, as a user would call it in process (no log-probs, no per-row streams)."""
    sample = s.temperature > 0
    config = GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=sample, pad_token_id=pad_id,
                              eos_token_id=eos_id, **({"temperature": s.temperature} if sample else {}))
    start = time.perf_counter()
    torch.manual_seed(s.seed)
    ids, mask = left_pad(prompts, pad_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    new = out[:, ids.shape[1]:]
    seconds = time.perf_counter() - start
    # tokens up to and including the first eos, as the service counts them
    tokens = sum(int((row == eos_id).nonzero()[0]) + 1 if (row == eos_id).any() else row.numel() for row in new)
    return seconds, tokens


def bench_generate(model_path, batch_size: int, max_new_tokens: int, repeats: int, temperature: float, as_json: bool,
                   same_kernels: bool = False):
    """Print grpc tokens/s, in-process tokens/s and their ratio (one JSON object with --json).

    The in-process side is plain transformers; with same_kernels it runs the service's fused activations too."""
    threads = torch.get_num_threads()
    work = pathlib.Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    model_path = model_path or str(bench_model(work))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    if same_kernels:
        fuse_activations(model)
    prompts = prompt_rows(tokenizer, batch_size)
    sampling = policy_pb2.SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=1)
    local_sampling = Sampling(temperature, max_new_tokens, seed=1)
    config = {"policy": {"model": {"path": model_path}, "server": {"num_threads": threads}}}
    with LocalMesh(work / "services", config) as mesh:
        asyncio.run(mesh.wait_ready(300))
        channel = open_channel(mesh.endpoints["policy"], aio=False)
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        time_grpc(stub, prompts, sampling)  # warm-up both sides
        time_local(model, prompts, local_sampling, pad_id, tokenizer.eos_token_id)
        grpc_runs, local_runs = [], []
        for _ in range(repeats):  # alternate so that noise hits both sides alike
            grpc_runs.append(time_grpc(stub, prompts, sampling))
            local_runs.append(time_local(model, prompts, local_sampling, pad_id, tokenizer.eos_token_id))
    grpc_tps = sum(t for _, t in grpc_runs) / sum(s for s, _ in grpc_runs)
    local_tps = sum(t for _, t in local_runs) / sum(s for s, _ in local_runs)
    result = {"grpc_tokens_per_s": grpc_tps, "inprocess_tokens_per_s": local_tps, "ratio": grpc_tps / local_tps,
              "model": model_path, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
              "temperature": temperature, "repeats": repeats, "threads": threads, "same_kernels": same_kernels}
    if as_json:
        print(json.dumps(result))
    else:
        print(f"Policy.Generate over gRPC : {grpc_tps:10.1f} tokens/s")
        print(f"in-process model.generate : {local_tps:10.1f} tokens/s"
              + (" (fused activations)" if same_kernels else " (plain transformers)"))
        print(f"ratio (gRPC / in-process) : {grpc_tps / local_tps:10.3f}")
    return result
