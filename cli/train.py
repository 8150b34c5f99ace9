"""`rlhf sft` and `rlhf train-rm`: steps 1 and 2 of InstructGPT from the command line.

Thin: parse options, load and split the data (training.datasets), and hand
over to training/sft_objective.py or training/rm_objective.py. The options
the two commands share are defined once, in TRAINER_OPTIONS. Bad arguments,
unreadable data, a missing model or a checkpoint that cannot be resumed end
with one `error: ...` line and exit status 2. Heavy imports (torch,
DeepSpeed) happen inside the commands so that `rlhf --help` stays fast.
"""

import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

import typer

from cli.output import fail, one_line, setup_logging

log = logging.getLogger("training")

MODEL_HELP = "Hugging Face hub id or local directory"
DATA_HELP = ".jsonl/.jsonl.gz/.json/.parquet file or hub id owner/name[:split] (see docs/datasets.md)"


@dataclass(frozen=True)
class Shared:
    """One option both commands take; `{item}` in the help names what a batch counts."""

    name: str
    type: type
    default: Any
    help: str
    flag: str | None = None  # the flag when it is not derived from `name` (e.g. --resume)


TRAINER_OPTIONS = (
    Shared("epochs", int, 1, "Passes over the training split"),
    Shared("lr", float, 1e-5, "Peak learning rate (cosine decay to 10% of it)"),
    Shared("batch_size", int, 32, "{Items} per optimizer step{pairs}"),
    Shared("micro_batch_size", int, 8, "{Items} per forward/backward (gradient accumulation)"),
    Shared("max_length", int, 512, "Tokens per {example} (trimmed from the left)"),
    Shared("zero_stage", int, 0, "DeepSpeed ZeRO stage 0-3"),
    Shared("eval_fraction", float, 0.05, "Share of prompts held out for {metric}"),
    Shared("eval_every", int, 0, "{Metric} every N steps (0: at the end only)"),
    Shared("save_every", int, 0, "Checkpoint to OUT/checkpoint-STEP every N steps (0: never)"),
    Shared("resume", bool, False, "Continue from the latest OUT/checkpoint-STEP", "--resume"),
    Shared("skip_bad_rows", bool, False, "Count malformed rows instead of stopping", "--skip-bad-rows"),
    Shared("data_split", str, None, "Phase fractions sft,rm,ppo (e.g. 2,4,4): keep only this step's share "
           "of the prompts", "--data-split"),
    Shared("seed", int, 0, "Seed for the split, data order, initialisation and dropout"),
    Shared("device", str, "auto", "auto, cpu or cuda"),
    Shared("dtype", str, "fp32", "fp32, or bf16 (bf16 weights, fp32 master weights in the optimizer)"),
)
TRAINER_FIELDS = ("epochs", "lr", "batch_size", "micro_batch_size", "zero_stage", "save_every", "eval_every", "seed",
                  "device", "dtype")


def trainer_options(**words: str) -> Callable:
    """Add TRAINER_OPTIONS to a command's signature (help filled with `words`); it receives them as `opts`."""

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command).parameters.values() if p.name != "opts"]
        shared = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=o.type,
                                    default=typer.Option(o.default, *([o.flag] if o.flag else []),
                                                         help=o.help.format(**words)))
                  for o in TRAINER_OPTIONS]

        @functools.wraps(command)
        def run(**kwargs):
            opts = {o.name: kwargs.pop(o.name) for o in TRAINER_OPTIONS}
            return command(opts=opts, **kwargs)

        run.__signature__ = inspect.Signature(own + shared)
        return run

    return decorate


def _split(records: list, data_split: str | None, phase: int, eval_fraction: float, seed: int):
    """(train, eval) of this phase's records: phase_split first, then train_eval_split by prompt."""
    from training.datasets import phase_split, train_eval_split

    if data_split is not None:
        records = phase_split(records, data_split, seed)[phase]
        if not records:
            raise ValueError(f"--data-split {data_split}: this step's share of the data is empty")
    train, evaluation = train_eval_split(records, eval_fraction, seed)
    if not train:
        raise ValueError(f"--eval-fraction {eval_fraction} leaves no training data")
    return train, evaluation


def _trainer_config(out: str, opts: dict):
    """The validated TrainerConfig; also fails early on --max-length and on --resume / OUT conflicts."""
    from training.ds_trainer import TrainerConfig, resume_point

    cfg = TrainerConfig(**{name: opts[name] for name in TRAINER_FIELDS})
    if opts["max_length"] < 2:
        raise ValueError(f"--max-length must be >= 2, got {opts['max_length']}")
    resume_point(out, opts["resume"])  # before any download or model load
    return cfg


def _report(summary: dict, out: str) -> None:
    """One closing line: steps, last train figures and last eval figures."""
    from training.ds_trainer import format_metrics

    shown = {**{f"train/{k}": v for k, v in summary["train"].items() if k in ("loss", "accuracy")},
             **{k: v for k, v in summary["eval"].items() if k != "step"}}
    typer.echo(f"{summary['steps']} steps; {format_metrics(shown)}; saved to {out}")


def _run(out: str, opts: dict, load: Callable, phase: int, fit: Callable) -> None:
    """Validate, load and split the data, then `fit(train, eval, cfg)`; errors become one line."""
    setup_logging()
    from services.cpus import apply_threads

    apply_threads()  # this process's share of the CPUs it may use
    try:
        cfg = _trainer_config(out, opts)
        records, report = load(skip_bad_rows=opts["skip_bad_rows"])
        log.info(report.summary())
        train, evaluation = _split(records, opts["data_split"], phase, opts["eval_fraction"], opts["seed"])
        log.info("%d training and %d eval records", len(train), len(evaluation))
        summary = fit(train, evaluation, cfg)
    except (ValueError, OSError) as error:  # DatasetError, ValidationError, ResumeError are ValueErrors
        fail(one_line(error))
    _report(summary, out)


@trainer_options(Items="Examples", pairs="", example="example", metric="the eval loss", Metric="Eval loss")
def sft(
    model: str = typer.Option(..., help=f"Causal LM to fine-tune: {MODEL_HELP}"),
    data: str = typer.Option(..., help=f"Demonstrations (sft, or the best response of preference data): {DATA_HELP}"),
    out: str = typer.Option(..., help="Output directory: final model, checkpoint-STEP directories"),
    opts: dict | None = None,
):
    """Step 1: supervised fine-tuning, loss on the response tokens only (DeepSpeed)."""

    def load(skip_bad_rows: bool):
        from training.datasets import load_sft

        return load_sft(data, skip_bad_rows=skip_bad_rows)

    def fit(train, evaluation, cfg):
        from training.sft_objective import run_sft

        return run_sft(model, train, out, cfg, max_length=opts["max_length"], eval_examples=evaluation,
                       resume=opts["resume"])

    _run(out, opts, load, 0, fit)


@trainer_options(Items="Prompts", pairs=" (all C(K,2) pairs of each)", example="prompt+response",
                 metric="pair accuracy", Metric="Pair accuracy")
def train_rm(
    model: str = typer.Option(..., help=f"Backbone: the SFT model or any sequence classifier; {MODEL_HELP}"),
    data: str = typer.Option(..., help=f"Comparisons (pairs, hh or ranked K responses): {DATA_HELP}"),
    out: str = typer.Option(..., help="Output directory: final reward model, checkpoint-STEP directories"),
    margin: float = typer.Option(0.0, help="Ask for r(better) - r(worse) > margin: -log sigmoid(diff - margin)"),
    opts: dict | None = None,
):
    """Step 2: reward model, InstructGPT's loss over all C(K,2) pairs per prompt (DeepSpeed)."""

    def load(skip_bad_rows: bool):
        from training.datasets import load_pairs

        return load_pairs(data, skip_bad_rows=skip_bad_rows)

    def fit(train, evaluation, cfg):
        from training.rm_objective import run_train_rm

        return run_train_rm(model, train, out, cfg, max_length=opts["max_length"], margin=margin,
                            eval_records=evaluation, resume=opts["resume"])

    _run(out, opts, load, 1, fit)
