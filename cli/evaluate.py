"""`rlhf score` and `rlhf eval-rm`: clients of a running RewardService."""

import typer

from cli.output import fail
from cli.security import security_options


@security_options
def score(
    target: str = typer.Option(..., help="RewardService address, HOST:PORT"),
    prompt: str = typer.Option(..., help="Prompt text"),
    response: str = typer.Option(..., help="Response text"),
    timeout: float = typer.Option(30.0, help="Deadline in seconds"),
    security=None,
):
    """Ask a running RewardService for the score of one (prompt, response)."""
    from controller.score import score_text

    try:
        value = score_text(target, prompt, response, timeout, security)
    except (RuntimeError, OSError) as error:
        fail(str(error), 1)
    typer.echo(f"{value:.6f}")


@security_options
def eval_rm(
    target: str = typer.Option(..., help="RewardService address, HOST:PORT"),
    data: str = typer.Option(..., help="Preference pairs: .jsonl/.jsonl.gz/.json/.parquet file or hub id"),
    against: str = typer.Option(None, help="A second RewardService to compare with on the same pairs"),
    json_out: str = typer.Option(None, "--json", help="Also write the full result as JSON to this file"),
    examples: int = typer.Option(3, help="Pairs to show as prompt / good answer / bad answer"),
    limit: int = typer.Option(None, help="Use at most this many pairs"),
    chunk: int = typer.Option(64, help="Pairs per streamed Compare message"),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Count malformed rows instead of stopping"),
    security=None,
):
    """Reward-model comparison evaluation: accuracy, margins, score distributions, calibration."""
    import json as json_module

    from controller.evaluation import eval_rm as run

    try:
        result, text = run(target, data, against, examples, chunk, skip_bad_rows, limit, security)
    except (RuntimeError, ValueError, OSError) as error:
        fail(str(error), 1)
    typer.echo(text)
    if json_out:
        with open(json_out, "w") as handle:
            json_module.dump(result, handle, indent=2)
