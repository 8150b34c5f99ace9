"""`rlhf serve ROLE`: run one model service until SIGTERM."""

import asyncio
import enum

import typer

from cli.output import fail, setup_logging


class Role(str, enum.Enum):
    policy = "policy"
    reference = "reference"
    reward = "reward"
    value = "value"


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
    from services.serving import serve as serve_forever

    servicer_cls, add = SERVICES[role.value]
    try:
        asyncio.run(serve_forever(servicer_cls(cfg), add))
    except OSError as error:
        fail(str(error))
