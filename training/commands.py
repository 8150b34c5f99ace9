"""`rlhf sft` and `rlhf train-rm`: steps 1 and 2 of InstructGPT from the command line.

Thin: parse options, load and split the data (training.datasets), and hand
over to training/sft_objective.py or training/rm_objective.py. Bad arguments,
unreadable data, a missing model or a checkpoint that cannot be resumed end
with one `error: ...` line and exit status 2. Heavy imports (torch,
DeepSpeed) happen inside the commands so that `rlhf --help` stays fast.
"""

import logging

import typer

log = logging.getLogger("training")

MODEL_HELP = "Hugging Face hub id or local directory"
DATA_HELP = ".jsonl/.jsonl.gz/.json/.parquet file or hub id owner/name[:split] (see docs/datasets.md)"
SPLIT_HELP = "Phase fractions sft,rm,ppo (e.g. 2,4,4): keep only this step's share of the prompts"


def _one_line(error: Exception) -> str:
    """A pydantic ValidationError as '--option: reason'; anything else as its message's first line."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        option = f"--{where.replace('_', '-')}: " if where else ""
        return option + first["msg"].removeprefix("Value error, ")
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


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


def _trainer_config(out: str, resume: bool, max_length: int, **options):
    """The validated TrainerConfig; also fails early on --max-length and on --resume / OUT conflicts."""
    from training.ds_trainer import TrainerConfig, resume_point

    cfg = TrainerConfig(**options)
    if max_length < 2:
        raise ValueError(f"--max-length must be >= 2, got {max_length}")
    resume_point(out, resume)  # before any download or model load
    return cfg


def _report(summary: dict, out: str) -> None:
    """One closing line: steps, last train figures and last eval figures."""
    shown = {**{f"train/{k}": v for k, v in summary["train"].items() if k in ("loss", "accuracy")},
             **{k: v for k, v in summary["eval"].items() if k != "step"}}
    from training.ds_trainer import format_metrics

    figures = format_metrics(shown)
    typer.echo(f"{summary['steps']} steps; {figures}; saved to {out}")


def sft(
    model: str = typer.Option(..., help=f"Causal LM to fine-tune: {MODEL_HELP}"),
    data: str = typer.Option(..., help=f"Demonstrations (sft, or the best response of preference data): {DATA_HELP}"),
    out: str = typer.Option(..., help="Output directory: final model, checkpoint-STEP directories"),
    epochs: int = typer.Option(1, help="Passes over the training split"),
    lr: float = typer.Option(1e-5, help="Peak learning rate (cosine decay to 10% of it)"),
    batch_size: int = typer.Option(32, help="Examples per optimizer step"),
    micro_batch_size: int = typer.Option(8, help="Examples per forward/backward (gradient accumulation)"),
    max_length: int = typer.Option(512, help="Tokens per example (prompt trimmed from the left first)"),
    zero_stage: int = typer.Option(0, help="DeepSpeed ZeRO stage 0-3"),
    eval_fraction: float = typer.Option(0.05, help="Share of prompts held out for the eval loss"),
    eval_every: int = typer.Option(0, help="Eval loss every N steps (0: at the end only)"),
    save_every: int = typer.Option(0, help="Checkpoint to OUT/checkpoint-STEP every N steps (0: never)"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest OUT/checkpoint-STEP"),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Count malformed rows instead of stopping"),
    data_split: str = typer.Option(None, "--data-split", help=SPLIT_HELP),
    seed: int = typer.Option(0, help="Seed for the split, data order, initialisation and dropout"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    dtype: str = typer.Option("fp32", help="fp32, or bf16 (bf16 weights, fp32 master weights in the optimizer)"),
):
    """Step 1: supervised fine-tuning, loss on the response tokens only (DeepSpeed)."""
    from controller.cli import fail, setup_logging

    setup_logging()
    try:
        cfg = _trainer_config(out, resume, max_length, epochs=epochs, lr=lr, batch_size=batch_size,
                              micro_batch_size=micro_batch_size, zero_stage=zero_stage, save_every=save_every,
                              eval_every=eval_every, seed=seed, device=device, dtype=dtype)
        from training.datasets import load_sft

        records, report = load_sft(data, skip_bad_rows=skip_bad_rows)
        log.info(report.summary())
        train, evaluation = _split(records, data_split, 0, eval_fraction, seed)
        log.info("sft: %d training and %d eval examples", len(train), len(evaluation))
        from training.sft_objective import run_sft

        summary = run_sft(model, train, out, cfg, max_length=max_length, eval_examples=evaluation,
                          resume=resume)
    except (ValueError, OSError) as error:  # DatasetError, ValidationError, ResumeError are ValueErrors
        fail(_one_line(error))
    _report(summary, out)


def train_rm(
    model: str = typer.Option(..., help=f"Backbone: the SFT model or any sequence classifier; {MODEL_HELP}"),
    data: str = typer.Option(..., help=f"Comparisons (pairs, hh or ranked K responses): {DATA_HELP}"),
    out: str = typer.Option(..., help="Output directory: final reward model, checkpoint-STEP directories"),
    epochs: int = typer.Option(1, help="Passes over the training split"),
    lr: float = typer.Option(1e-5, help="Peak learning rate (cosine decay to 10% of it)"),
    batch_size: int = typer.Option(32, help="Prompts per optimizer step (all C(K,2) pairs of each)"),
    micro_batch_size: int = typer.Option(8, help="Prompts per forward/backward (gradient accumulation)"),
    max_length: int = typer.Option(512, help="Tokens per prompt+response (trimmed from the left)"),
    margin: float = typer.Option(0.0, help="Ask for r(better) - r(worse) > margin: -log sigmoid(diff - margin)"),
    zero_stage: int = typer.Option(0, help="DeepSpeed ZeRO stage 0-3"),
    eval_fraction: float = typer.Option(0.05, help="Share of prompts held out for pair accuracy"),
    eval_every: int = typer.Option(0, help="Pair accuracy every N steps (0: at the end only)"),
    save_every: int = typer.Option(0, help="Checkpoint to OUT/checkpoint-STEP every N steps (0: never)"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest OUT/checkpoint-STEP"),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Count malformed rows instead of stopping"),
    data_split: str = typer.Option(None, "--data-split", help=SPLIT_HELP),
    seed: int = typer.Option(0, help="Seed for the split, data order, initialisation and dropout"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    dtype: str = typer.Option("fp32", help="fp32, or bf16 (bf16 weights, fp32 master weights in the optimizer)"),
):
    """Step 2: reward model, InstructGPT's loss over all C(K,2) pairs per prompt (DeepSpeed)."""
    from controller.cli import fail, setup_logging

    setup_logging()
    try:
        cfg = _trainer_config(out, resume, max_length, epochs=epochs, lr=lr, batch_size=batch_size,
                              micro_batch_size=micro_batch_size, zero_stage=zero_stage, save_every=save_every,
                              eval_every=eval_every, seed=seed, device=device, dtype=dtype)
        from training.datasets import load_pairs

        records, report = load_pairs(data, skip_bad_rows=skip_bad_rows)
        log.info(report.summary())
        train, evaluation = _split(records, data_split, 1, eval_fraction, seed)
        log.info("train-rm: %d training and %d eval prompts", len(train), len(evaluation))
        from training.rm_objective import run_train_rm

        summary = run_train_rm(model, train, out, cfg, max_length=max_length, margin=margin,
                               eval_records=evaluation, resume=resume)
    except (ValueError, OSError) as error:  # DatasetError, ValidationError, ResumeError are ValueErrors
        fail(_one_line(error))
    _report(summary, out)
