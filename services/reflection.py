"""Server reflection that can describe every rlhf.v1 service, method and message it serves.

grpc_reflection answers from the process's default descriptor pool, which
holds only the .proto files whose *_pb2 module was imported. A servicer needs
only its *_pb2_grpc module, and reference_pb2_grpc imports common_pb2 alone
(ReferenceService uses no message of its own), so a process could list
rlhf.v1.ReferenceService yet answer "Symbol not found" to `describe`. Here
every rlhf.v1 file is loaded first, and a served name that the pool does not
know fails at start-up instead of at a client's first question.

The default pool does not find the file of a method (`describe
rlhf.v1.RewardService.Score`, grpc/grpc#34743), nor, in protobuf's
pure-Python build, of a oneof; `_SymbolPool` adds both.
"""

import importlib
import pkgutil

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection

import rlhf.v1

PROTO_PACKAGE = rlhf.v1.__name__


def load_proto_files() -> list:
    """Import every rlhf.v1 *_pb2 module, so that each .proto file (and what it imports) is in the default pool.

    Returns their file descriptors.
    """
    names = sorted(m.name for m in pkgutil.iter_modules(rlhf.v1.__path__) if m.name.endswith("_pb2"))
    return [importlib.import_module(f"{PROTO_PACKAGE}.{name}").DESCRIPTOR for name in names]


class _SymbolPool:
    """The default descriptor pool, also finding the file of a service's method or a message's oneof."""

    def __init__(self, pool: descriptor_pool.DescriptorPool):
        self._pool = pool

    def __getattr__(self, name: str):
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str):  # the DescriptorPool method it stands in for
        """The file that defines `symbol` (a fully qualified name); KeyError when there is none."""
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            parent, _, member = symbol.rpartition(".")
            return self._member_file(parent, member, symbol)

    def _member_file(self, parent: str, member: str, symbol: str):
        try:
            return self._pool.FindServiceByName(parent).methods_by_name[member].containing_service.file
        except KeyError:
            pass
        try:
            return self._pool.FindMessageTypeByName(parent).oneofs_by_name[member].containing_type.file
        except KeyError:
            raise KeyError(symbol) from None


def enable_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    """Serve reflection for `service_names` (fully qualified) and reflection itself, every rlhf.v1 file loaded.

    Raises ValueError naming a service the descriptor pool does not hold.
    """
    load_proto_files()
    pool = descriptor_pool.Default()
    names = list(dict.fromkeys([*service_names, reflection.SERVICE_NAME]))  # in order, once each
    for name in names:
        try:
            pool.FindServiceByName(name)
        except KeyError:
            raise ValueError(f"reflection: no descriptor for service {name!r}; is its *_pb2 module imported?") from None
    reflection.enable_server_reflection(names, server, pool=_SymbolPool(pool))
