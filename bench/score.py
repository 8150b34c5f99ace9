"""`rlhf bench score`: Reward.Score throughput against one in-process batched forward pass over the same rows.

The service side: one reward service process and `clients` concurrent
callers, each sending `pairs` (prompt, response) pairs per Score call, as
application teams would. The in-process side: the same model in this
process scores the same rows with one batched forward pass per
max_batch_size rows (tokenising included, as the service does). Rounds
alternate; the figure is rows scored per second, and the ratio
service / in-process (target >= 0.9).
"""

import asyncio
import json
import pathlib
import statistics
import tempfile
import time

import torch

from bench.metrics import bench_reward_model
from rlhf.v1 import reward_pb2, reward_pb2_grpc
from services.channels import open_channel
from services.cpus import apply_threads
from services.launcher import LocalMesh
from services.models import fuse_activations


def texts(n: int) -> tuple[list[str], list[str]]:
    """n demo prompts with responses of mixed length."""
    from training import synthetic

    prompts = synthetic.train_prompts(n, seed=1)
    words = "the moon is far and bright tonight so we look".split()
    return prompts, [" ".join(words[: 1 + i % len(words)]) for i in range(n)]


async def service_round(address: str, requests: list, clients: int) -> float:
    """Seconds for `clients` callers to send every request once."""
    queue = list(requests)

    async def caller(stub):
        while queue:
            await stub.Score(queue.pop(), timeout=120)

    async with open_channel(address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        start = time.perf_counter()
        await asyncio.gather(*(caller(stub) for _ in range(clients)))
        return time.perf_counter() - start


def in_process_round(model, tokenizer, prompts: list[str], responses: list[str], batch: int) -> float:
    """Seconds to tokenise (one tokenizer call per batch) and score every row with batched forward passes."""
    from services.codec import pad_rows
    from services.formatting import encode_many_for_reward

    start = time.perf_counter()
    limit = getattr(model.config, "n_positions", 1024)
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            ids = encode_many_for_reward(tokenizer, prompts[i : i + batch], responses[i : i + batch], limit)
            ids, mask = pad_rows([torch.tensor(row, dtype=torch.long) for row in ids], tokenizer.pad_token_id)
            model(input_ids=ids, attention_mask=mask.long()).logits.float()
    return time.perf_counter() - start


def bench_score(model_path: str | None, clients: int, pairs: int, requests: int, rounds: int, batch: int,
                as_json: bool, same_kernels: bool = False) -> dict:
    """Alternate service and in-process rounds over the same rows; print and return rows/s and the ratio.

    The in-process side is plain transformers, as a caller would write it; with same_kernels it runs the
    service's fused activations too, so that the ratio measures serving alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="rlhf-bench-score-") as tmp:
        work = pathlib.Path(tmp)
        model_path = model_path or str(bench_reward_model(work / "model"))
        prompts, responses = texts(requests * pairs)
        calls = [reward_pb2.ScoreRequest(texts=reward_pb2.TextPairs(prompts=prompts[i:i + pairs],
                                                                    responses=responses[i:i + pairs]))
                 for i in range(0, len(prompts), pairs)]
        config = {"reward": {"model": {"path": model_path}, "batching": {"max_batch_size": batch}}}
        with LocalMesh(work / "mesh", config) as mesh:
            threads = apply_threads()  # this process shares the machine with the service like it
            model = AutoModelForSequenceClassification.from_pretrained(model_path).eval()
            if same_kernels:
                fuse_activations(model)
            tokenizer = AutoTokenizer.from_pretrained(model_path)
            asyncio.run(mesh.wait_ready(300))
            address = mesh.endpoints["reward"]
            asyncio.run(service_round(address, calls[: max(1, len(calls) // 4)], clients))  # warm-up
            in_process_round(model, tokenizer, prompts[:batch], responses[:batch], batch)
            seconds = {"service": [], "in_process": []}
            for i in range(rounds):
                for side in (("service", "in_process") if i % 2 == 0 else ("in_process", "service")):
                    if side == "service":
                        seconds[side].append(asyncio.run(service_round(address, calls, clients)))
                    else:
                        seconds[side].append(in_process_round(model, tokenizer, prompts, responses, batch))
    rows = len(prompts)
    rates = {side: rows / statistics.median(s) for side, s in seconds.items()}
    result = {"rows": rows, "clients": clients, "pairs_per_call": pairs, "rounds": rounds, "batch": batch,
              "same_kernels": same_kernels, "torch_threads": threads.intra_op,
              "service_rows_per_second": rates["service"], "in_process_rows_per_second": rates["in_process"],
              "ratio": rates["service"] / rates["in_process"],
              "seconds": seconds}
    if as_json:
        print(json.dumps(result))
    else:
        kernels = "fused activations" if same_kernels else "plain transformers"
        print(f"{rows} rows, {clients} clients x {pairs} pairs per Score call: service {rates['service']:.0f} rows/s, "
              f"in-process batched forward ({kernels}) {rates['in_process']:.0f} rows/s; ratio {result['ratio']:.3f} "
              "(target >= 0.9)")
    return result
