"""A process that serves rlhf.v1 services importing only their *_pb2_grpc modules, with services.reflection.

    python -m tests.support.stub_server rlhf.v1.reference_pb2_grpc=rlhf.v1.ReferenceService ...

Each service gets the generated base servicer (every RPC answers UNIMPLEMENTED): enough for reflection,
and no *_pb2 module is imported here, as in a process whose servicer needs only its *_pb2_grpc module.
Prints the bound loopback port, then serves until stdin closes.
"""

import asyncio
import importlib
import sys

import grpc

from services.reflection import enable_reflection


async def serve(specs: list[str]) -> None:
    """Serve each "grpc module=full service name" of `specs` on an ephemeral loopback port until stdin closes."""
    server = grpc.aio.server()
    names = []
    for spec in specs:
        module_name, name = spec.split("=")
        module, service = importlib.import_module(module_name), name.rpartition(".")[2]
        getattr(module, f"add_{service}Servicer_to_server")(getattr(module, f"{service}Servicer")(), server)
        names.append(name)
    enable_reflection(server, names)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1:]))
