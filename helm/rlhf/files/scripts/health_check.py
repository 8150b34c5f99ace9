"""`helm test`: ask one service's grpc.health.v1.Health/Check; exit 0 on SERVING.

Usage: python health_check.py HOST:PORT [TIMEOUT_SECONDS]
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, timeout: float) -> int:
    """Print the target's serving status; 0 when SERVING, 1 otherwise."""
    request = health_pb2.HealthCheckRequest(service="")
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
    except grpc.RpcError as error:
        print(f"{target}: health check failed: {error.code().name}: {error.details()}")
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(check(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 10.0))
