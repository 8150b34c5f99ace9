"""Interceptors build their handlers once per method handler, not once per call, and keep their behaviour."""

import asyncio

import grpc

from services.auth import AuthInterceptor, Grant, token_digest
from services.errors import ErrorInterceptor, InvalidArgument
from services.handlers import HandlerCache, kind
from services.limits import ConcurrencyLimit
from services.pushback import RetryPushback


class Details:
    def __init__(self, method: str, metadata=()):
        self.method, self.invocation_metadata = method, metadata


class Aborted(Exception):
    pass


class Context:
    def __init__(self):
        self.status = None
        self.trailers = ()

    async def abort(self, code, details, trailing_metadata=()):
        self.status = (code, details)
        self.trailers = trailing_metadata
        raise Aborted


async def fails(request, context):
    raise InvalidArgument("field", f"bad {request!r}")


HANDLER = grpc.unary_unary_rpc_method_handler(fails, request_deserializer=bytes.decode)


async def continuation(details):
    return HANDLER


def intercept(interceptor, details):
    return asyncio.run(interceptor.intercept_service(continuation, details))


def call(handler, request):
    context = Context()
    try:
        asyncio.run(handler.unary_unary(request, context))
    except Aborted:
        pass
    return context.status


def test_each_interceptor_returns_the_same_handler_call_after_call():
    details = Details("/rlhf.v1.RewardService/Score")
    errors = ErrorInterceptor()
    first, second = intercept(errors, details), intercept(errors, details)
    assert first is second and first is not HANDLER and kind(first) == (False, False)
    assert call(first, b"x") == (grpc.StatusCode.INVALID_ARGUMENT, "field: bad 'x'")  # parses, then maps the error
    limit = ConcurrencyLimit(1, RetryPushback(200))
    assert intercept(limit, details) is intercept(limit, details)


def test_refusals_are_kept_per_reason_and_still_refuse():
    details = Details("/rlhf.v1.RewardService/Score")
    limit = ConcurrencyLimit(0, RetryPushback(200))
    busy = intercept(limit, details)
    assert busy is intercept(limit, details) and limit.refused == 2
    assert call(busy, b"ignored")[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    auth = AuthInterceptor([Grant("app", token_digest("s3cret"), frozenset({"infer"}))])
    anonymous = intercept(auth, details)
    assert anonymous is intercept(auth, details)
    assert call(anonymous, b"")[0] == grpc.StatusCode.UNAUTHENTICATED
    wrong_scope = intercept(auth, Details(details.method, [("authorization", "Bearer s3cret")]))
    assert wrong_scope is not anonymous and call(wrong_scope, b"")[0] == grpc.StatusCode.PERMISSION_DENIED


def test_the_cache_holds_what_it_made_for_each_handler_and_key():
    made = []
    cache = HandlerCache(lambda handler, *key: made.append(key) or object())
    a, b = object(), object()
    assert cache.get(a, 1) is cache.get(a, 1)
    assert cache.get(a, 2) is not cache.get(a, 1) and cache.get(b, 1) is not cache.get(a, 1)
    assert made == [(1,), (2,), (1,)]
