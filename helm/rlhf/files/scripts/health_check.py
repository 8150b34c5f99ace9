"""Ask one service's grpc.health.v1.Health/Check; exit 0 on SERVING.

`helm test` runs it against each Service; with TLS on, the pods' probes run it
too (kubelet's own gRPC probes cannot speak TLS before Kubernetes 1.37).

Usage: python health_check.py HOST:PORT [TIMEOUT_SECONDS]
           [--ca FILE [--server-name NAME] [--cert FILE --key FILE]]
"""

import argparse
import pathlib
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def read(path: str | None) -> bytes | None:
    """A PEM file's bytes; None for no file."""
    return pathlib.Path(path).read_bytes() if path else None


def channel(args: argparse.Namespace) -> grpc.Channel:
    """Plain text without --ca; else TLS checked against --ca (and --server-name), with a client cert if given."""
    if args.ca is None:
        return grpc.insecure_channel(args.target)
    credentials = grpc.ssl_channel_credentials(read(args.ca), read(args.key), read(args.cert))
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.target, credentials, options)


def check(args: argparse.Namespace) -> int:
    """Print the target's serving status; 0 when SERVING, 1 otherwise."""
    request = health_pb2.HealthCheckRequest(service="")
    try:
        with channel(args) as chan:
            reply = health_pb2_grpc.HealthStub(chan).Check(request, timeout=args.timeout)
    except grpc.RpcError as error:
        print(f"{args.target}: health check failed: {error.code().name}: {error.details()}")
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line: target, timeout and the TLS files."""
    parser = argparse.ArgumentParser(prog="health_check.py")
    parser.add_argument("target", help="HOST:PORT")
    parser.add_argument("timeout", nargs="?", type=float, default=10.0, help="seconds")
    parser.add_argument("--ca", help="PEM CA bundle: connect with TLS")
    parser.add_argument("--server-name", help="name to check the certificate against, if not HOST")
    parser.add_argument("--cert", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--key", help="PEM private key of --cert")
    args = parser.parse_args(argv)
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together")
    return args


if __name__ == "__main__":
    sys.exit(check(parse(sys.argv[1:])))
