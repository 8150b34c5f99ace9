"""`rlhf bench ppo`: one PPO iteration of the mesh against TRL's PPOTrainer, side by side.

Both sides get the same GPT-2 (4 layers x 256, a 2048-token BPE vocabulary
trained here), the same reward model and critic (that GPT-2 with a score
head), the same prompts, batch (32 prompts), response length (32 tokens,
both stopping at EOS), 4 PPO epochs over 2 minibatches of 16, fp32, on this
machine's CPUs. The mesh side is four `rlhf serve` processes with their
default settings (threads sized by services/cpus.py) and the PPO runner in
this process; the TRL side is `trl.experimental.ppo.PPOTrainer` of
trl==1.10.0 (the `bench` extra; later TRL releases removed PPO) in this
process. One warm-up iteration per side, then iterations alternate.

TRL ties its batch to per_device_train_batch_size x gradient_accumulation_steps:
with 2 minibatches of 16 it accumulates over both and steps the optimizer
once per epoch, where the mesh steps once per minibatch; the forward and
backward work is the same.
"""

import asyncio
import contextlib
import io
import json
import os
import pathlib
import resource
import statistics
import tempfile
import time

import torch

from services.launcher import LocalMesh

BATCH, MINIBATCH, EPOCHS, RESPONSE = 32, 16, 4, 32


def build_models(out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(causal LM dir, reward model dir): a 4x256 GPT-2 on a 2048-token vocabulary, and it with a score head."""
    from transformers import AutoModelForSequenceClassification

    from training import synthetic, tiny

    tokenizer = tiny.build_tokenizer(synthetic.corpus_texts(0), out / "tokenizer", vocab_size=2048)
    lm = pathlib.Path(tiny.build_tiny_lm(tokenizer, out / "lm", n_layer=4, n_embd=256, n_head=4, n_positions=256))
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_pretrained(lm, num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(out / "rm")
    tokenizer.save_pretrained(out / "rm")
    return lm, out / "rm"


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of this process and `pids` so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError):
            pass
    return total


FRAME = 5  # gRPC's length-prefixed message frame: 1 flag byte + 4 length bytes
FLOOR_BYTES = 4 + 4 + 4 + 4 + 4  # per response token: int32 id, float32 old log-prob, value, advantage, return


def as_json(message) -> object:
    """`message` as the JSON a JSON/HTTP API would send: tensors as lists of numbers, the rest as protobuf JSON."""
    from google.protobuf import json_format

    from services import codec

    name = message.DESCRIPTOR.full_name
    if name == "rlhf.v1.Tensor":
        return codec.tensor_from_pb(message, "t").tolist() if message.raw else []
    if name == "rlhf.v1.RaggedTensor":
        return [row.tolist() for row in codec.ragged_from_pb(message, "r")] if message.lengths else []
    out = {}
    for field, value in message.ListFields():
        if field.message_type is None:
            out[field.name] = json_format.MessageToDict(message, preserving_proto_field_name=True)[field.name]
        elif field.is_repeated:
            out[field.name] = [as_json(v) for v in value]
        else:
            out[field.name] = as_json(value)
    return out


class WireTally:
    """Bytes of every RPC message both ways, as gRPC frames them and as JSON."""

    def __init__(self):
        self.grpc = self.json = self.calls = 0
        self.by_rpc: dict[str, int] = {}  # "Service.Method" -> gRPC bytes

    def add(self, rpc: str, request, reply) -> None:
        self.calls += 1
        size = request.ByteSize() + reply.ByteSize() + 2 * FRAME
        self.grpc += size
        self.by_rpc[rpc] = self.by_rpc.get(rpc, 0) + size
        self.json += len(json.dumps(as_json(request))) + len(json.dumps(as_json(reply)))


class CountingStub:
    """A stub whose unary calls add their messages to a WireTally."""

    def __init__(self, stub, tally: WireTally):
        self._stub, self._tally = stub, tally
        self._service = type(stub).__name__.removesuffix("Stub")

    def __getattr__(self, name: str):
        method = getattr(self._stub, name)

        async def call(request, **kwargs):
            reply = await method(request, **kwargs)
            self._tally.add(f"{self._service}.{name}", request, reply)
            return reply

        return call


class MeshSide:
    """The four services as processes and the PPO runner in this process."""

    def __init__(self, lm: pathlib.Path, rm: pathlib.Path, prompts: list[str], work: pathlib.Path):
        from controller.clients import ServiceClients
        from controller.config import ControllerConfig
        from controller.loop import PPORunner

        configs = {"policy": {"model": {"path": str(lm)}}, "reference": {"model": {"path": str(lm)}},
                   "reward": {"model": {"path": str(rm)}}, "value": {"model": {"path": str(rm)}}}
        for cfg in configs.values():
            cfg["server"] = {"metrics_port": -1, "grace_seconds": 1}
        self.mesh = LocalMesh(work / "mesh", configs).start()
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.mesh.wait_ready(600))
        self.clients = ServiceClients(self.mesh.endpoints)
        cfg = ControllerConfig.model_validate({
            "run_id": "bench", "services": self.mesh.endpoints, "data": {"prompts": "unused.jsonl"},
            "ppo": {"batch_size": BATCH, "minibatch_size": MINIBATCH, "ppo_epochs": EPOCHS,
                    "max_new_tokens": RESPONSE, "total_steps": 10**6}})
        self.loop.run_until_complete(self.clients.wait_ready(600))  # forms the data-parallel groups
        self.runner = PPORunner(cfg, self.clients, prompts, None)
        self.pids = [p.pid for p in self.mesh.processes.values()]
        self.tally = WireTally()
        for pool in self.clients.pools.values():
            pool.stubs = {address: CountingStub(stub, self.tally) for address, stub in pool.stubs.items()}

    def wire(self) -> dict:
        """Bytes per response token of one iteration: gRPC, the floor, and the same messages as JSON."""
        self.tally = WireTally()
        for pool in self.clients.pools.values():
            for stub in pool.stubs.values():
                stub._tally = self.tally
        result = self.loop.run_until_complete(self.runner.step())
        tokens = float(result.experience.mask.sum())
        return {"response_tokens": tokens, "calls": self.tally.calls,
                "grpc_bytes_per_token": self.tally.grpc / tokens, "floor_bytes_per_token": FLOOR_BYTES,
                "json_bytes_per_token": self.tally.json / tokens,
                "grpc_over_floor": self.tally.grpc / tokens / FLOOR_BYTES,
                "grpc_bytes_per_token_by_rpc": {rpc: size / tokens for rpc, size in sorted(self.tally.by_rpc.items())}}

    def iteration(self) -> dict:
        cpu = cpu_seconds(self.pids)
        start = time.perf_counter()
        result = self.loop.run_until_complete(self.runner.step())
        seconds = time.perf_counter() - start
        phases = {k.removeprefix("time/"): v for k, v in result.stats.items()
                  if k in ("time/generate", "time/score", "time/train")}
        return {"seconds": seconds, "cpu_seconds": cpu_seconds(self.pids) - cpu, **phases}

    def close(self) -> None:
        self.loop.run_until_complete(self.clients.close())
        self.loop.close()
        self.mesh.stop()


class TRLSide:
    """trl.experimental.ppo.PPOTrainer on the same models; one `train()` call is one iteration."""

    def __init__(self, lm: pathlib.Path, rm: pathlib.Path, prompts: list[str], work: pathlib.Path):
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        import datasets
        import trl.experimental.ppo.ppo_trainer as ppo_module
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
        from transformers.trainer_callback import PrinterCallback
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        datasets.disable_progress_bars()
        tokenizer = AutoTokenizer.from_pretrained(str(lm))
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        dataset = datasets.Dataset.from_list([{"input_ids": row} for row in ids])
        args = PPOConfig(
            output_dir=str(work / "trl"), per_device_train_batch_size=MINIBATCH,
            gradient_accumulation_steps=BATCH // MINIBATCH, num_mini_batches=BATCH // MINIBATCH,
            num_ppo_epochs=EPOCHS, response_length=RESPONSE, total_episodes=BATCH, stop_token="eos",
            learning_rate=1e-5, kl_coef=0.05, temperature=1.0, num_sample_generations=0, report_to=[],
            save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, bf16=False)
        self.phases = {"generate": 0.0, "score": 0.0}
        self._wrap(ppo_module, "batch_generation", "generate")
        self._wrap(ppo_module, "get_reward", "score")
        self.trainer = PPOTrainer(
            args=args, processing_class=tokenizer, model=AutoModelForCausalLM.from_pretrained(lm),
            ref_model=AutoModelForCausalLM.from_pretrained(lm),
            reward_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1),
            value_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1),
            train_dataset=dataset)
        self.trainer.remove_callback(PrinterCallback)

    def _wrap(self, module, name: str, phase: str) -> None:
        inner = getattr(module, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.phases[phase] += time.perf_counter() - start

        setattr(module, name, timed)

    def iteration(self) -> dict:
        self.phases = {"generate": 0.0, "score": 0.0}
        cpu = cpu_seconds([])
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # TRL prints "===training policy===" (breaks --json)
            self.trainer.train()
        seconds = time.perf_counter() - start
        # get_reward runs for the reward model and the critic; the critic's share is training-side work
        return {"seconds": seconds, "cpu_seconds": cpu_seconds([]) - cpu, **self.phases,
                "train": seconds - sum(self.phases.values())}


def summary(runs: list[dict]) -> dict:
    seconds = [r["seconds"] for r in runs]
    median = statistics.median(seconds)
    return {"median_seconds": median, "min_seconds": min(seconds), "max_seconds": max(seconds),
            "worst_over_median": max(seconds) / median,
            "median_cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
            "phases": {k: statistics.median(r[k] for r in runs) for k in ("generate", "score", "train") if k in runs[0]},
            "runs": runs}


def bench_ppo(iterations: int, mesh_only: bool, as_json: bool) -> dict:
    """Warm up each side once, then alternate `iterations` iterations per side; print and return the figures."""
    from training import synthetic

    with tempfile.TemporaryDirectory(prefix="rlhf-bench-ppo-") as tmp:
        work = pathlib.Path(tmp)
        lm, rm = build_models(work / "models")
        prompts = synthetic.train_prompts(BATCH * (iterations + 2), seed=3)
        sides = {"mesh": MeshSide(lm, rm, prompts, work)}
        try:
            if not mesh_only:
                sides["trl"] = TRLSide(lm, rm, prompts, work)
            for side in sides.values():
                side.iteration()  # warm-up
            wire = sides["mesh"].wire()
            runs = {name: [] for name in sides}
            order = list(sides)
            for i in range(iterations):
                for name in (order if i % 2 == 0 else order[::-1]):
                    runs[name].append(sides[name].iteration())
                    print(f"iteration {i + 1}/{iterations} {name}: {runs[name][-1]['seconds']:.2f} s", flush=True)
        finally:
            sides["mesh"].close()
    result = {name: summary(r) for name, r in runs.items()}
    result["load_average"] = os.getloadavg()
    result["wire"] = wire
    if "trl" in result:
        result["ratio"] = result["mesh"]["median_seconds"] / result["trl"]["median_seconds"]
    if as_json:
        print(json.dumps(result))
    else:
        for name in runs:
            s = result[name]
            phases = ", ".join(f"{k} {v:.2f} s" for k, v in s["phases"].items())
            print(f"{name}: median {s['median_seconds']:.2f} s per iteration (min {s['min_seconds']:.2f}, "
                  f"max {s['max_seconds']:.2f}); {phases}; {s['median_cpu_seconds']:.1f} CPU s")
        if "ratio" in result:
            print(f"ratio mesh / TRL: {result['ratio']:.3f} (target <= 0.8)")
        print(f"wire, per response token of one iteration ({wire['calls']} RPCs): gRPC "
              f"{wire['grpc_bytes_per_token']:.0f} B, floor {wire['floor_bytes_per_token']} B "
              f"({wire['grpc_over_floor']:.2f}x, target <= 1.2x), JSON {wire['json_bytes_per_token']:.0f} B\n"
              "  by RPC: " + ", ".join(f"{rpc} {size:.1f} B" for rpc, size in wire["grpc_bytes_per_token_by_rpc"].items()))
    return result
