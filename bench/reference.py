"""`rlhf bench reference`: the reference phase of a PPO iteration with the local backend and with backend: tgi.

Two reference services on the same model (the `rlhf bench ppo` GPT-2): one
runs it itself (backend: local), the other asks a TGI stand-in
(bench/tgi_standin.py: TGI's documented generate schema, one forward pass
per request, in this process) for prefill log-probs (backend: tgi). The
figure is the time of one LogProbs call over a PPO batch (32 prompts with
32 response tokens), alternating between the backends. A real TGI server
batches requests on a GPU; the stand-in shows what the protocol costs here
(one HTTP request and one tokenisation per row), not TGI's speed.
"""

import asyncio
import json
import pathlib
import statistics
import tempfile
import time

import torch

from bench.ppo import BATCH, RESPONSE, build_models
from bench.tgi_standin import TGIStandIn
from rlhf.v1 import common_pb2, reference_pb2_grpc
from services.batch import Sequences
from services.channels import open_channel
from services.launcher import LocalMesh


def ppo_batch(lm: pathlib.Path) -> Sequences:
    """32 demo prompts, each followed by 32 response tokens sampled from the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training import synthetic

    tokenizer = AutoTokenizer.from_pretrained(lm)
    model = AutoModelForCausalLM.from_pretrained(lm).eval()
    torch.manual_seed(0)
    rows, prompt_lengths = [], []
    for prompt in synthetic.train_prompts(BATCH, seed=3):
        ids = torch.tensor(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            out = model.generate(ids[None], attention_mask=torch.ones_like(ids)[None], do_sample=True,
                                 max_new_tokens=RESPONSE, min_new_tokens=RESPONSE, pad_token_id=tokenizer.pad_token_id)
        # keep only responses the tokenizer reproduces from their text (the tgi backend refuses the others)
        text = tokenizer.decode(out[0], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        again = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        rows.append(again)
        prompt_lengths.append(min(len(ids), len(again) - 1))
    return Sequences(rows, prompt_lengths)


async def timed_call(address: str, seqs: Sequences, repeats: int) -> list[float]:
    async with open_channel(address) as channel:
        stub = reference_pb2_grpc.ReferenceServiceStub(channel)
        request = common_pb2.LogProbsRequest(sequences=seqs.to_pb(), temperature=1.0)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            await stub.LogProbs(request, timeout=300)
            seconds.append(time.perf_counter() - start)
        return seconds


def bench_reference(rounds: int, as_json: bool) -> dict:
    """Alternate one LogProbs call per backend per round; print and return the median seconds of each."""
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-reference-") as tmp:
        work = pathlib.Path(tmp)
        lm, _ = build_models(work / "models")
        seqs = ppo_batch(lm)
        with TGIStandIn(lm) as stand_in:
            configs = {"local": {"reference": {"model": {"path": str(lm)}, "server": {"metrics_port": -1}}},
                       "tgi": {"reference": {"model": {"path": str(lm)}, "server": {"metrics_port": -1},
                                             "backend": "tgi", "tgi": {"url": stand_in.url}}}}
            meshes = {name: LocalMesh(work / name, cfg) for name, cfg in configs.items()}
            with meshes["local"], meshes["tgi"]:
                for mesh in meshes.values():
                    asyncio.run(mesh.wait_ready(300))
                seconds = {name: [] for name in meshes}
                for name, mesh in meshes.items():  # warm-up
                    asyncio.run(timed_call(mesh.endpoints["reference"], seqs, 1))
                for i in range(rounds):
                    for name in (("local", "tgi") if i % 2 == 0 else ("tgi", "local")):
                        seconds[name] += asyncio.run(timed_call(meshes[name].endpoints["reference"], seqs, 1))
    tokens = sum(seqs.response_lengths)
    result = {"rows": len(seqs), "response_tokens": tokens, "rounds": rounds,
              **{f"{name}_median_seconds": statistics.median(s) for name, s in seconds.items()}, "seconds": seconds}
    result["tgi_over_local"] = result["tgi_median_seconds"] / result["local_median_seconds"]
    if as_json:
        print(json.dumps(result))
    else:
        print(f"reference phase, one LogProbs call of {len(seqs)} rows ({tokens} response tokens): local backend "
              f"{result['local_median_seconds']:.3f} s, tgi backend on the stand-in "
              f"{result['tgi_median_seconds']:.3f} s ({result['tgi_over_local']:.2f}x)")
    return result
