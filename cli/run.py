"""`rlhf controller` and `rlhf demo`: drive a run over running services, or the embedded default."""

import asyncio
import logging

import typer

from cli.output import fail, setup_logging


def controller(
    config: str = typer.Option(..., "--config", "-c", help="Controller YAML"),
    steps: int = typer.Option(None, help="Override the algorithm's total_steps"),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Count malformed data rows instead of stopping"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from output_dir's last complete checkpoint"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Drive PPO across running policy, reference, reward and value services.

    Exit status: 0 finished; 1 a service failed or stayed away past services.restart_timeout_seconds (a checkpoint
    is left to resume from); 2 bad configuration, data or resume request; 75 stopped by SIGTERM after a checkpoint.
    """
    import grpc

    from controller.config import load_controller_config
    from controller.durability import RunStopped
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
    if resume:
        cfg.checkpoint.resume = "yes"

    keys = ("reward/mean", "objective/kl", "policy/loss", "value/loss", "dpo/loss", "dpo/reward_accuracy",
            "eval/rm_accuracy")

    def report(result):
        shown = " ".join(f"{k} {result.stats[k]:.4f}" for k in keys if k in result.stats)
        logging.getLogger("controller").info("step %d/%d %s", result.step + 1, cfg.total_steps(), shown)

    from services.serving import freeze_loaded_objects

    freeze_loaded_objects()  # what the imports built stays for good: keep full collections from walking it
    try:
        asyncio.run(run_controller(cfg, report, handle_sigterm=True))
    except RunStopped as stopped:
        fail(str(stopped), 75)
    except (ValueError, OSError) as error:  # ConfigError, ResumeRefused, DatasetError, a port in use
        fail(str(error))
    except grpc.aio.AioRpcError as error:  # a service refused a request: a bug or a misconfiguration, not a fault
        fail(f"a service answered {error.code().name}: {error.details()}", 1)
    except (RuntimeError, TimeoutError) as error:  # ServiceUnavailable, NoReplica, GroupError, TokenizerMismatch
        fail(str(error).splitlines()[0], 1)


def demo(
    out: str = typer.Option("runs/demo", help="Output directory"),
    steps: int = typer.Option(None, help="PPO iterations (default: the demo's setting)"),
    seed: int = typer.Option(0, help="Seed for data, models and sampling"),
    metrics: bool = typer.Option(False, "--metrics",
                                 help="Serve /metrics on ports 9400-9404 and keep them up after the run until Ctrl-C"),
    algorithm: str = typer.Option("ppo", help="Step 3: ppo (four services), or grpo, rloo, reinforce_pp (no value "
                                  "service)"),
):
    """The embedded default: SFT, reward model and PPO on a tiny model, four services on loopback."""
    from demo.run import run_demo

    setup_logging()
    if algorithm not in ("ppo", "grpo", "rloo", "reinforce_pp"):
        fail(f"--algorithm {algorithm!r}: choose ppo, grpo, rloo or reinforce_pp", 2)
    try:
        run_demo(out, steps=steps, seed=seed, metrics=metrics, algorithm=algorithm)
    except (RuntimeError, OSError) as error:
        fail(str(error), 1)
