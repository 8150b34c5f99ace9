"""gRPC method handlers rebuilt around a wrapper, once per handler rather than once per call.

Server interceptors run on every call, but what they return depends only on
the method's handler (and, for a refusal, on why): `rebuild` makes a handler
of the same kind (unary or streaming, each way) around a new behaviour, and
`HandlerCache` keeps what was made from each handler, so that an interceptor
returns the same objects call after call instead of building closures and
handler tuples for each one.
"""

from collections.abc import Callable, Hashable

import grpc

_BUILDERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
_KEEP = object()


def kind(handler) -> tuple[bool, bool]:
    """(request streaming, response streaming) of a method handler."""
    return bool(handler.request_streaming), bool(handler.response_streaming)


def behaviour(handler) -> Callable:
    """The function a handler calls: its unary_unary, unary_stream, stream_unary or stream_stream."""
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def rebuild(handler, fn: Callable, request_deserializer=_KEEP):
    """A handler of `handler`'s kind and response serializer that calls `fn`; its request deserializer
    unless one is given (None: `fn` receives the raw bytes)."""
    deserializer = handler.request_deserializer if request_deserializer is _KEEP else request_deserializer
    return _BUILDERS[kind(handler)](fn, request_deserializer=deserializer,
                                    response_serializer=handler.response_serializer)


class HandlerCache:
    """What `make(handler, *key)` returned, kept per (handler, *key).

    Handlers come from the server's method table (or from another cache), so
    the entries are bounded by methods x keys. The entry holds the handler
    itself, so its id cannot be reused while the entry lives.
    """

    def __init__(self, make: Callable):
        self._make = make
        self._made: dict[tuple, tuple] = {}

    def get(self, handler, *key: Hashable):
        slot = (id(handler), *key)
        entry = self._made.get(slot)
        if entry is None or entry[0] is not handler:
            entry = self._made[slot] = (handler, self._make(handler, *key))
        return entry[1]
