"""The `rlhf` command line: serve, controller, demo, score, bench."""

import asyncio
import enum
import logging
import os
import sys

import typer

app = typer.Typer(help="RLHF (SFT, reward model, PPO) as gRPC model services.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
bench_app = typer.Typer(help="Benchmarks (not tests): print side-by-side figures.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


class Role(str, enum.Enum):
    policy = "policy"
    reference = "reference"
    reward = "reward"
    value = "value"


def setup_logging(verbose: bool = False) -> None:
    """Plain log lines on stderr; quiet the libraries' chatter."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("DeepSpeed", "deepspeed", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and a non-zero exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def serve(
    role: Role = typer.Argument(..., help="Which model service to run"),
    config: str = typer.Option(..., "--config", "-c", help="Service YAML"),
    port: int = typer.Option(None, help="Override server.port"),
    model: str = typer.Option(None, help="Override model.path (hub id or directory)"),
    device: str = typer.Option(None, help="Override model.device"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Run one model service (policy, reference, reward or value) until SIGTERM."""
    from services.config import ConfigError, load_service_config

    setup_logging(verbose)
    try:
        cfg = load_service_config(config, role.value)
    except ConfigError as error:
        fail(str(error))
    if port is not None:
        cfg.server.port = port
    if model is not None:
        cfg.model.path = model
    if device is not None:
        cfg.model.device = device
    from services.registry import SERVICES
    from services.server import serve as serve_forever

    servicer_cls, add = SERVICES[role.value]
    try:
        asyncio.run(serve_forever(servicer_cls(cfg), add))
    except OSError as error:
        fail(str(error))


@app.command()
def controller(
    config: str = typer.Option(..., "--config", "-c", help="Controller YAML"),
    steps: int = typer.Option(None, help="Override the algorithm's total_steps"),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Count malformed data rows instead of stopping"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Drive PPO across running policy, reference, reward and value services."""
    from controller.clients import TokenizerMismatch
    from controller.config import load_controller_config
    from controller.service import run_controller
    from services.config import ConfigError

    setup_logging(verbose)
    try:
        cfg = load_controller_config(config)
    except ConfigError as error:
        fail(str(error))
    if steps is not None:
        cfg.ppo.total_steps = cfg.dpo.total_steps = steps
    cfg.data.skip_bad_rows = cfg.data.skip_bad_rows or skip_bad_rows

    keys = ("reward/mean", "objective/kl", "policy/loss", "value/loss", "dpo/loss", "dpo/reward_accuracy",
            "eval/rm_accuracy")

    def report(result):
        shown = " ".join(f"{k} {result.stats[k]:.4f}" for k in keys if k in result.stats)
        logging.getLogger("controller").info("step %d/%d %s", result.step + 1, cfg.total_steps(), shown)

    try:
        asyncio.run(run_controller(cfg, report))
    except (TokenizerMismatch, TimeoutError, ValueError, OSError) as error:
        fail(str(error))


@app.command()
def score(
    target: str = typer.Option(..., help="RewardService address, HOST:PORT"),
    prompt: str = typer.Option(..., help="Prompt text"),
    response: str = typer.Option(..., help="Response text"),
    timeout: float = typer.Option(30.0, help="Deadline in seconds"),
):
    """Ask a running RewardService for the score of one (prompt, response)."""
    from controller.score import score_text

    try:
        value = score_text(target, prompt, response, timeout)
    except RuntimeError as error:
        fail(str(error), 1)
    typer.echo(f"{value:.6f}")


@app.command("eval-rm")
def eval_rm(
    target: str = typer.Option(..., help="RewardService address, HOST:PORT"),
    data: str = typer.Option(..., help="Preference pairs: .jsonl/.jsonl.gz/.json/.parquet file or hub id"),
    against: str = typer.Option(None, help="A second RewardService to compare with on the same pairs"),
    json_out: str = typer.Option(None, "--json", help="Also write the full result as JSON to this file"),
    examples: int = typer.Option(3, help="Pairs to show as prompt / good answer / bad answer"),
    limit: int = typer.Option(None, help="Use at most this many pairs"),
    chunk: int = typer.Option(64, help="Pairs per streamed Compare message"),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Count malformed rows instead of stopping"),
):
    """Reward-model comparison evaluation: accuracy, margins, score distributions, calibration."""
    import json as json_module

    from controller.evaluation import eval_rm as run

    try:
        result, text = run(target, data, against, examples, chunk, skip_bad_rows, limit)
    except (RuntimeError, ValueError) as error:
        fail(str(error), 1)
    typer.echo(text)
    if json_out:
        with open(json_out, "w") as handle:
            json_module.dump(result, handle, indent=2)


from training import commands as training_commands  # noqa: E402 - steps 1 and 2; imports stay lazy

app.command("sft")(training_commands.sft)
app.command("train-rm")(training_commands.train_rm)


@app.command()
def demo(
    out: str = typer.Option("runs/demo", help="Output directory"),
    steps: int = typer.Option(None, help="PPO iterations (default: the demo's setting)"),
    seed: int = typer.Option(0, help="Seed for data, models and sampling"),
    metrics: bool = typer.Option(False, "--metrics",
                                 help="Serve /metrics on ports 9400-9404 and keep them up after the run until Ctrl-C"),
):
    """The embedded default: SFT, reward model and PPO on a tiny model, four services on loopback."""
    from demo.run import run_demo

    setup_logging()
    try:
        run_demo(out, steps=steps, seed=seed, metrics=metrics)
    except (RuntimeError, OSError) as error:
        fail(str(error), 1)


@bench_app.command("generate")
def bench_generate(
    model: str = typer.Option(None, help="Causal LM directory or hub id (default: a tiny local model)"),
    batch_size: int = typer.Option(32, help="Prompts per call"),
    max_new_tokens: int = typer.Option(64, help="Tokens generated per prompt"),
    repeats: int = typer.Option(5, help="Timed calls per side"),
    temperature: float = typer.Option(1.0, help="Sampling temperature"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
):
    """tokens/s of Policy.Generate over gRPC vs in-process model.generate, side by side."""
    from controller.bench import bench_generate as run

    setup_logging()
    run(model, batch_size, max_new_tokens, repeats, temperature, as_json)


@bench_app.command("train-rm")
def bench_train_rm(
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
    from controller.bench_rm import RMBenchSettings, bench_train_rm as run

    setup_logging()
    settings = RMBenchSettings(model, batch_size, max_length, steps, repeats, lr, device, threads, bf16)
    try:
        run(settings, as_json)
    except RuntimeError as error:
        fail(str(error), 1)


@bench_app.command("metrics")
def bench_metrics(
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
    from controller.bench_metrics import bench_metrics as run

    setup_logging()
    run(model, processes, rounds, requests, pairs, concurrency, scrape_interval, as_json)


if __name__ == "__main__":
    app()
