"""Domain errors and the one interceptor that maps them to gRPC status codes."""

import logging

import grpc

from services.handlers import HandlerCache, behaviour, kind, rebuild

log = logging.getLogger(__name__)


class InvalidArgument(ValueError):
    """A request field is malformed; the message names the field."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class Overloaded(RuntimeError):
    """The request queue is full (RESOURCE_EXHAUSTED)."""


class NotReady(RuntimeError):
    """The service is loading or draining (UNAVAILABLE)."""


class GroupRejected(RuntimeError):
    """Another rank of the data-parallel group rejected its shard of this Train step (ABORTED)."""


class WrongRank(RuntimeError):
    """The call belongs on another rank of the data-parallel group (FAILED_PRECONDITION)."""


class Refused(RuntimeError):
    """The request is well formed but the service's state forbids it (FAILED_PRECONDITION): a Train key
    already applied whose result is no longer kept, or a checkpoint that is incomplete or of another kind."""


class AlreadyExists(RuntimeError):
    """The request would replace something it did not ask to replace (ALREADY_EXISTS)."""


class NotFound(RuntimeError):
    """The named checkpoint does not exist (NOT_FOUND)."""


class OverQuota(RuntimeError):
    """A configured quota (checkpoint count or bytes) would be passed (RESOURCE_EXHAUSTED)."""


class RuleFailed(RuntimeError):
    """A rule-based reward function raised or returned something that is not a finite number (INTERNAL)."""


class TooSlow(RuntimeError):
    """The work of a request took longer than its configured limit (DEADLINE_EXCEEDED)."""


_STATUS = (
    (WrongRank, grpc.StatusCode.FAILED_PRECONDITION),
    (Refused, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (GroupRejected, grpc.StatusCode.ABORTED),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OverQuota, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (RuleFailed, grpc.StatusCode.INTERNAL),
    (TooSlow, grpc.StatusCode.DEADLINE_EXCEEDED),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: Exception) -> grpc.StatusCode:
    """The gRPC status code a domain error maps to (INTERNAL for anything else)."""
    for error_type, code in _STATUS:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Parses requests and turns exceptions raised by handlers into gRPC status codes.

    The request bytes are parsed here rather than by gRPC, so that bytes that
    are not the method's message (corrupt wire format, invalid UTF-8 in a
    string) end in INVALID_ARGUMENT instead of UNKNOWN or INTERNAL.
    """

    def __init__(self, pushback=None):
        self._wrapped = HandlerCache(lambda handler, method: _mapping_errors(handler, method, pushback))

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        return None if handler is None else self._wrapped.get(handler, handler_call_details.method)


def _mapping_errors(handler, method: str, pushback=None):
    """`handler` parsing its own request bytes and answering every exception with its status (the unary and
    the bidirectional-streaming methods, which are all the services have; others pass unchanged). A refusal
    for load (Overloaded) carries pushback's retry delay (services/pushback.py)."""
    request_streaming, response_streaming = kind(handler)
    if request_streaming != response_streaming:
        return handler
    parse = handler.request_deserializer or (lambda raw: raw)
    inner = behaviour(handler)

    def parsed(raw):
        return _parsed(parse, raw) if request_streaming else _parse(parse, raw)

    async def unary(raw, context):
        try:
            return await inner(parsed(raw), context)
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            await _abort(context, method, error, pushback)

    async def streaming(raw, context):
        try:
            async for reply in inner(parsed(raw), context):
                yield reply
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            await _abort(context, method, error, pushback)

    return rebuild(handler, streaming if response_streaming else unary, request_deserializer=None)


def _parse(parse, raw):
    try:
        return parse(raw)
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError, or UnicodeDecodeError on a bad string
        raise InvalidArgument("request", f"not a valid message of this method: {error}") from None


async def _parsed(parse, raw_iterator):
    async for raw in raw_iterator:
        yield _parse(parse, raw)


async def _abort(context, method: str, error: Exception, pushback=None) -> None:
    """Abort the RPC with the status the error maps to (AbortError passes through)."""
    if isinstance(error, grpc.aio.AbortError):
        raise error
    code = status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method)
    trailers = pushback.trailers() if pushback is not None and isinstance(error, Overloaded) else ()
    await context.abort(code, str(error) or type(error).__name__, trailing_metadata=trailers)
