"""What every command shares: log set-up and the one-line error exit."""

import logging
import os
import sys

import typer


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


def one_line(error: Exception) -> str:
    """A pydantic ValidationError as '--option: reason'; anything else as its message's first line."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        option = f"--{where.replace('_', '-')}: " if where else ""
        return option + first["msg"].removeprefix("Value error, ")
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
