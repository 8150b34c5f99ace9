"""The TLS and token options of the commands that call a running service (`rlhf score`, `rlhf eval-rm`)."""

import functools
import inspect
from typing import Callable

import typer

from cli.output import fail

OPTIONS = (
    ("token_file", "--token-file", "File holding the bearer token to send (default: $RLHF_TOKEN)"),
    ("tls_ca", "--tls-ca", "Connect with TLS, checking the server against this PEM CA bundle"),
    ("tls_cert", "--tls-cert", "PEM client certificate for mutual TLS"),
    ("tls_key", "--tls-key", "PEM private key of --tls-cert"),
    ("tls_server_name", "--tls-server-name", "Name to check the server certificate against"),
)


def client_security(**values):
    """A ClientSecurity from the options' values; a bad combination fails with one line (exit 2)."""
    from pydantic import ValidationError

    from services.config import ClientSecurity

    tls_given = any(values[name] for name in ("tls_ca", "tls_cert", "tls_key", "tls_server_name"))
    tls = {"ca_file": values["tls_ca"], "cert_file": values["tls_cert"], "key_file": values["tls_key"],
           "server_name": values["tls_server_name"]} if tls_given else None
    try:
        return ClientSecurity(tls=tls, token_file=values["token_file"])
    except ValidationError as error:
        fail(f"{error.errors()[0]['msg']} (--tls-cert and --tls-key go together)", 2)


def security_options(command: Callable) -> Callable:
    """Add the TLS and token options to a command's signature; it receives them as `security`."""
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "security"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=str,
                               default=typer.Option(None, flag, help=text))
             for name, flag, text in OPTIONS]

    @functools.wraps(command)
    def run(**kwargs):
        values = {name: kwargs.pop(name) for name, _, _ in OPTIONS}
        return command(security=client_security(**values), **kwargs)

    run.__signature__ = inspect.Signature(own + added)
    return run
