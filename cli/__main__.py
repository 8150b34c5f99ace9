"""`python -m cli ...` is `rlhf ...` (the local launcher starts services this way)."""

from cli.main import app

app()
