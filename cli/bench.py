"""`rlhf bench ...`: side-by-side benchmarks (not tests). The work is in bench/."""

import typer

from cli.output import fail, setup_logging

SAME_KERNELS = typer.Option(False, "--same-kernels", help="Give the in-process side the service's fused activations "
                            "(model.fused_activations) instead of plain transformers")


def generate(
    model: str = typer.Option(None, help="Causal LM directory or hub id (default: a tiny local model)"),
    batch_size: int = typer.Option(32, help="Prompts per call"),
    max_new_tokens: int = typer.Option(64, help="Tokens generated per prompt"),
    repeats: int = typer.Option(5, help="Timed calls per side"),
    temperature: float = typer.Option(1.0, help="Sampling temperature"),
    same_kernels: bool = SAME_KERNELS,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
):
    """tokens/s of Policy.Generate over gRPC vs in-process model.generate, side by side."""
    from bench.generate import bench_generate as run

    setup_logging()
    run(model, batch_size, max_new_tokens, repeats, temperature, as_json, same_kernels)


def train_rm(
    model: str = typer.Option(None, help="Causal LM or classifier directory / hub id (default: a local 4x256 GPT-2)"),
    batch_size: int = typer.Option(16, help="Pairs per optimizer step, both sides"),
    max_length: int = typer.Option(128, help="Max tokens per prompt+response, both sides"),
    steps: int = typer.Option(30, help="Optimizer steps per timed run"),
    repeats: int = typer.Option(3, help="Timed runs per side, alternating"),
    lr: float = typer.Option(1e-4, help="Peak learning rate, both sides"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    threads: int = typer.Option(None, help="torch threads (default: torch's choice)"),
    bf16: bool = typer.Option(False, "--bf16", help="Both sides in bf16 (ours: DeepSpeed bf16, TRL: its default autocast)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
):
    """pairs/s of reward-model training: our train-rm path vs TRL's RewardTrainer, side by side."""
    from bench.train_rm import RMBenchSettings
    from bench.train_rm import bench_train_rm as run

    setup_logging()
    settings = RMBenchSettings(model, batch_size, max_length, steps, repeats, lr, device, threads, bf16)
    try:
        run(settings, as_json)
    except RuntimeError as error:
        fail(str(error), 1)


def metrics(
    model: str = typer.Option(None, help="Reward model directory or hub id (default: the demo's tiny GPT-2 + score head)"),
    processes: int = typer.Option(6, help="Fresh (on, off) pairs of service processes, measured one after another"),
    rounds: int = typer.Option(30, help="Timed rounds per side and process pair, alternating"),
    requests: int = typer.Option(50, help="Score requests per round"),
    pairs: int = typer.Option(4, help="(prompt, response) pairs per request"),
    concurrency: int = typer.Option(8, help="Requests in flight"),
    scrape_interval: float = typer.Option(1.0, help="Seconds between scrapes of the instrumented service; 0: none"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
):
    """Reward.Score throughput with metrics on vs off (metrics_port -1), side by side in alternate rounds."""
    from bench.metrics import bench_metrics as run

    setup_logging()
    run(model, processes, rounds, requests, pairs, concurrency, scrape_interval, as_json)


def overload(
    model: str = typer.Option(None, help="Reward model directory or hub id (default: the demo's tiny GPT-2 + score head)"),
    queue: int = typer.Option(32, help="The service's batching.max_queue: calls in flight at saturation"),
    batch: int = typer.Option(32, help="The service's batching.max_batch_size"),
    factor: int = typer.Option(4, help="Overload: this many times the queue in flight"),
    rounds: int = typer.Option(6, help="Timed rounds per load, alternating"),
    seconds: float = typer.Option(5.0, help="Seconds per round"),
    pairs: int = typer.Option(1, help="(prompt, response) pairs per Score call"),
    backoff_ms: float = typer.Option(0.0, help="A refused caller waits this long (jittered) before its next call; "
                                     "0: at once"),
    pushback: bool = typer.Option(False, "--pushback", help="A refused caller waits as long as the refusal's "
                                  "grpc-retry-pushback-ms asks, as gRPC retry policies do (and at least --backoff-ms)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
):
    """Reward.Score at saturation vs overload: successful throughput ratio and how fast refusals come back."""
    from bench.overload import bench_overload as run

    setup_logging()
    run(model, queue, batch, factor, rounds, seconds, pairs, backoff_ms, as_json, pushback)


def score(
    model: str = typer.Option(None, help="Reward model directory or hub id (default: the demo's tiny GPT-2 + score head)"),
    clients: int = typer.Option(64, help="Concurrent callers"),
    pairs: int = typer.Option(4, help="(prompt, response) pairs per Score call"),
    requests: int = typer.Option(256, help="Score calls per round"),
    rounds: int = typer.Option(6, help="Timed rounds per side, alternating"),
    batch: int = typer.Option(64, help="Rows per forward pass on both sides (the service's max_batch_size)"),
    same_kernels: bool = SAME_KERNELS,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
):
    """Reward.Score rows/s from concurrent small calls vs one in-process batched forward over the same rows."""
    from bench.score import bench_score as run

    setup_logging()
    run(model, clients, pairs, requests, rounds, batch, as_json, same_kernels)


def ppo(
    iterations: int = typer.Option(5, help="Timed iterations per side, alternating, after one warm-up each"),
    mesh_only: bool = typer.Option(False, "--mesh-only", help="Only the mesh (no TRL needed)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (`ratio`: mesh / TRL median)"),
):
    """One PPO iteration of the mesh (four service processes + controller) vs TRL 1.10's PPOTrainer."""
    from bench.ppo import bench_ppo as run

    setup_logging()
    run(iterations, mesh_only, as_json)


def reference(
    rounds: int = typer.Option(6, help="Timed LogProbs calls per backend, alternating"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
):
    """The reference phase (LogProbs of a PPO batch) with backend: local and backend: tgi on a TGI stand-in."""
    from bench.reference import bench_reference as run

    setup_logging()
    run(rounds, as_json)
