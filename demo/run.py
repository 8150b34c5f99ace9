"""`rlhf demo`: the three InstructGPT steps on a tiny model, four services on loopback.

Step 1 SFT and step 2 reward-model training run in this process, on the same
DeepSpeed trainer as `rlhf sft` and `rlhf train-rm`; step 3 runs the policy,
reference, reward and value services as separate processes and
drives PPO with the controller. The hidden gold function judges greedy
responses to held-out prompts before and after PPO.
"""

import asyncio
import json
import logging
import pathlib
import shutil
import time
from dataclasses import dataclass

import torch

from controller.clients import ServiceClients
from controller.config import ControllerConfig
from controller.metrics import ControllerMetrics
from controller.service import run_controller
from demo.report import write_curves, write_report
from rlhf.v1 import policy_pb2, reward_pb2, tensor_pb2
from services import codec
from services.config import DEFAULT_METRICS_PORTS
from services.launcher import LocalMesh
from training import synthetic, tiny
from training.ds_trainer import TrainerConfig
from training.rm_objective import run_train_rm
from training.sft_objective import run_sft

log = logging.getLogger("demo")


@dataclass
class DemoSettings:
    """Sizes and hyperparameters of the embedded default."""

    sft_examples: int = 4000
    sft_epochs: int = 4
    sft_lr: float = 5e-3  # the tiny GPT-2 from scratch; fewer than ~500 steps and it misses the topic nouns
    rm_pairs: int = 3000
    rm_eval_pairs: int = 500
    rm_epochs: int = 2
    rm_lr: float = 1e-3
    train_batch_size: int = 32  # examples (SFT) or pairs (RM) per optimizer step, one micro-batch
    max_length: int = 64  # tokens per prompt + response in steps 1-2
    eval_prompts: int = 64
    ppo_steps: int = 60
    batch_size: int = 64
    minibatch_size: int = 16
    ppo_epochs: int = 4
    max_new_tokens: int = 24
    policy_lr: float = 1.5e-4
    value_lr: float = 5e-4
    kl_coef: float = 0.05
    threads_per_service: int = 1
    algorithm: str = "ppo"  # or a critic-free estimator: grpo, rloo, reinforce_pp (no value service)
    samples_per_prompt: int = 4  # critic-free: responses per prompt (batch_size counts responses)


def build_models(out: pathlib.Path, s: DemoSettings, seed: int) -> dict:
    """Steps 0-2: tokenizer + tiny LM, SFT, reward model. Returns paths and RM stats."""
    print("[0/3] building a tokenizer and a tiny GPT-2 locally (nothing is downloaded)", flush=True)
    torch.manual_seed(seed)
    tokenizer = tiny.build_tokenizer(synthetic.corpus_texts(seed), out / "tokenizer")
    base = tiny.build_tiny_lm(tokenizer, out / "base", seed=seed)
    print(f"[1/3] supervised fine-tuning on {s.sft_examples} demonstrations", flush=True)
    sft = run_sft(base, synthetic.sft_examples(s.sft_examples, seed), out / "sft",
                  trainer_config(s, s.sft_epochs, s.sft_lr, seed), max_length=s.max_length)
    print(f"      SFT response loss {sft['train']['loss']:.3f} after {sft['steps']} steps "
          f"in {sft['train_seconds']:.0f}s", flush=True)
    print(f"[2/3] reward model on {s.rm_pairs} comparisons labelled by the hidden gold function", flush=True)
    pairs = synthetic.preference_pairs(s.rm_pairs + s.rm_eval_pairs, seed + 1)
    rm = run_train_rm(out / "sft", pairs[: s.rm_pairs], out / "rm", trainer_config(s, s.rm_epochs, s.rm_lr, seed),
                      max_length=s.max_length, eval_records=pairs[s.rm_pairs :])
    accuracy = rm["eval"]["eval/accuracy"]
    print(f"      held-out pair accuracy {accuracy:.3f} in {rm['train_seconds']:.0f}s", flush=True)
    return {"sft": out / "sft", "rm": out / "rm", "rm_pair_accuracy": accuracy, "sft_stats": sft["train"],
            "rm_stats": rm["eval"]}


def trainer_config(s: DemoSettings, epochs: int, lr: float, seed: int) -> TrainerConfig:
    """Steps 1-2 of the demo on the DeepSpeed trainer: one micro-batch per step, on the CPU, fp32."""
    return TrainerConfig(epochs=epochs, lr=lr, batch_size=s.train_batch_size, micro_batch_size=s.train_batch_size,
                         seed=seed, device="cpu", dtype="fp32")


def service_configs(paths: dict, out: pathlib.Path, s: DemoSettings, seed: int) -> dict:
    """One config per service: policy/reference from SFT, reward and value from the RM."""
    models = {"policy": paths["sft"], "reference": paths["sft"], "reward": paths["rm"], "value": paths["rm"]}
    if s.algorithm != "ppo":  # the critic-free estimators need no value model
        models.pop("value")
    lrs = {"policy": s.policy_lr, "value": s.value_lr}
    configs = {}
    for role, path in models.items():
        server = {"num_threads": s.threads_per_service, "checkpoint_dir": str(out / "checkpoints" / role), "seed": seed}
        configs[role] = {"model": {"path": str(path)}, "server": server}
        if role in lrs:
            configs[role]["training"] = {"learning_rate": lrs[role], "micro_batch_size": s.minibatch_size}
    return configs


async def greedy_responses(clients: ServiceClients, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy responses of the policy service to `prompts`."""
    sampling = policy_pb2.SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    reply = await clients.one("policy", lambda s: s.Generate, policy_pb2.GenerateRequest(
        prompt_texts=tensor_pb2.TextBatch(texts=prompts), sampling=sampling))
    return list(reply.response_texts)


async def greedy_gold(clients: ServiceClients, prompts: list[str], max_new_tokens: int) -> float:
    """Mean gold score of the policy's greedy responses."""
    responses = await greedy_responses(clients, prompts, max_new_tokens)
    return sum(synthetic.gold_score(p, r) for p, r in zip(prompts, responses)) / len(prompts)


async def greedy_eval(clients: ServiceClients, prompts: list[str], max_new_tokens: int) -> dict:
    """Greedy responses to `prompts`, their gold scores and RM scores."""
    responses = await greedy_responses(clients, prompts, max_new_tokens)
    scored = await clients.one("reward", lambda s: s.Score, reward_pb2.ScoreRequest(
        texts=reward_pb2.TextPairs(prompts=prompts, responses=responses)))
    gold = [synthetic.gold_score(p, r) for p, r in zip(prompts, responses)]
    rewards = codec.tensor_from_pb(scored.scores, "scores")
    return {"responses": responses, "gold": sum(gold) / len(gold), "reward": float(rewards.mean()),
            "gold_each": gold}


def controller_config(endpoints: dict, out: pathlib.Path, s: DemoSettings, seed: int) -> ControllerConfig:
    """The controller's PPO settings for the demo."""
    prompts = out / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in synthetic.train_prompts(2000, seed)) + "\n")
    return ControllerConfig.model_validate({
        "run_id": f"demo-{seed}", "services": endpoints, "data": {"prompts": str(prompts)},
        "server": {"host": "127.0.0.1", "port": 0}, "output_dir": str(out), "seed": seed,
        "algorithm": s.algorithm, "critic_free": {"samples_per_prompt": s.samples_per_prompt},
        "ppo": {"total_steps": s.ppo_steps, "batch_size": s.batch_size, "minibatch_size": s.minibatch_size,
                "ppo_epochs": s.ppo_epochs, "max_new_tokens": s.max_new_tokens, "kl_coef": s.kl_coef},
    })


async def ppo_phase(mesh: LocalMesh, out: pathlib.Path, s: DemoSettings, seed: int, metrics=None) -> dict:
    """Step 3: greedy eval, PPO through the services, greedy eval again."""
    from tqdm import tqdm

    await mesh.wait_ready(600)
    clients = ServiceClients(mesh.endpoints)
    heldout = synthetic.heldout_prompts(s.eval_prompts, seed)
    before = await greedy_eval(clients, heldout, s.max_new_tokens)
    print(f"      before PPO: gold {before['gold']:.3f}, reward {before['reward']:.3f}", flush=True)
    curve = []
    bar = tqdm(total=s.ppo_steps, desc=s.algorithm.upper(), unit="step")

    def on_step(result):
        mesh.check_alive()
        gold = [synthetic.gold_score(p, r) for p, r in zip(result.experience.prompts, result.experience.responses)]
        st = result.stats
        curve.append({"step": result.step + 1, "reward": st["reward/mean"], "kl": st["objective/kl"],
                      "gold": sum(gold) / len(gold), "policy_loss": st["policy/loss"], "value_loss": st.get("value/loss", 0.0),
                      "response_length": st["response/length"]})
        bar.set_postfix(reward=f"{st['reward/mean']:.2f}", kl=f"{st['objective/kl']:.2f}", gold=f"{curve[-1]['gold']:.2f}")
        bar.update(1)

    cfg = controller_config(mesh.endpoints, out, s, seed)
    try:
        runner = await run_controller(cfg, on_step, metrics)
    finally:
        bar.close()
    after = await greedy_eval(clients, heldout, s.max_new_tokens)
    await clients.close()
    return {"heldout": heldout, "before": before, "after": after, "curve": curve, "stats": runner.last_stats}


def metrics_urls(mesh: LocalMesh, controller_metrics) -> dict[str, str]:
    """process -> its /metrics URL."""
    return {"controller": controller_metrics.endpoint.url} | {r: f"http://{a}/metrics" for r, a in mesh.metrics_endpoints.items()}


def hold_metrics(mesh: LocalMesh, controller_metrics) -> None:
    """Keep the services and every /metrics endpoint up until Ctrl-C, printing where they are."""
    print("metrics endpoints, up until Ctrl-C:", flush=True)
    for name, url in metrics_urls(mesh, controller_metrics).items():
        print(f"      {name:<10} {url}", flush=True)
    print("      prometheus --config.file=monitoring/prometheus/prometheus.yml scrapes them; "
          "Grafana: import monitoring/grafana/rlhf-mesh.json", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        controller_metrics.close()


def run_demo(out_dir: str = "runs/demo", steps: int | None = None, seed: int = 0, metrics: bool = False,
             algorithm: str = "ppo") -> dict:
    """Run all three steps and write report.json, curves.png and samples.md under out_dir.

    metrics: serve /metrics on the default ports (controller 9400, services 9401-9404) and keep them
    up after the run until Ctrl-C.
    """
    start = time.monotonic()
    out = pathlib.Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    s = DemoSettings(ppo_steps=steps or DemoSettings.ppo_steps, algorithm=algorithm)
    paths = build_models(out, s, seed)
    roles = "policy, reference, reward and value" if algorithm == "ppo" else "policy, reference and reward"
    print(f"[3/3] {algorithm.upper()}: starting {roles} services on 127.0.0.1", flush=True)
    ports, controller_metrics = None, None
    if metrics:
        ports = {role: DEFAULT_METRICS_PORTS[role] for role in ("policy", "reference", "reward", "value")}
        controller_metrics = ControllerMetrics()
        controller_metrics.serve("127.0.0.1", DEFAULT_METRICS_PORTS["controller"])
    with LocalMesh(out / "services", service_configs(paths, out, s, seed), metrics_ports=ports) as mesh:
        print("      " + ", ".join(f"{r} {a}" for r, a in mesh.endpoints.items()), flush=True)
        if metrics:
            print("      metrics: " + ", ".join(f"{n} {u}" for n, u in metrics_urls(mesh, controller_metrics).items()))
        ppo = asyncio.run(ppo_phase(mesh, out, s, seed, controller_metrics))
        report = write_report(out, paths, ppo, s, time.monotonic() - start)
        write_curves(out / "curves.png", ppo["curve"])
        print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}, indent=2))
        if metrics:
            hold_metrics(mesh, controller_metrics)
    return report
