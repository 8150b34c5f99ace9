"""The cap on RPCs in progress per server: a call beyond it is refused at once, before its request is read.

Health checks and reflection are not counted, so probes keep answering
while the server sheds load. The batchers' bounded queues shed the rest
(services/batcher.py); both answer RESOURCE_EXHAUSTED in milliseconds, with
the time to wait before a retry (services/pushback.py), which the controller
and gRPC retry policies honour.
"""

import grpc

from services.auth import refusal, required_scope
from services.handlers import HandlerCache, behaviour, kind, rebuild
from services.pushback import RetryPushback


class ConcurrencyLimit(grpc.aio.ServerInterceptor):
    """Counts the calls in progress; refuses new ones with RESOURCE_EXHAUSTED beyond `limit`."""

    def __init__(self, limit: int, pushback: RetryPushback):
        self.limit = limit
        self.active = 0
        self.refused = 0
        self._counted = HandlerCache(self._counting)
        self._refusals = HandlerCache(lambda handler: refusal(
            handler, grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the server's limit of {limit} calls in progress is reached (server.max_concurrent_rpcs)",
            pushback.trailers))

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or required_scope(handler_call_details.method) is None:
            return handler
        if self.active >= self.limit:
            self.refused += 1
            return self._refusals.get(handler)
        return self._counted.get(handler)

    def _counting(self, handler):
        """`handler` counted in `active` while it runs (unary and bidirectional-streaming methods)."""
        limiter, inner = self, behaviour(handler)
        request_streaming, response_streaming = kind(handler)
        if request_streaming != response_streaming:
            return handler

        async def unary(request, context):
            limiter.active += 1
            try:
                return await inner(request, context)
            finally:
                limiter.active -= 1

        async def streaming(request_iterator, context):
            limiter.active += 1
            try:
                async for reply in inner(request_iterator, context):
                    yield reply
            finally:
                limiter.active -= 1

        return rebuild(handler, streaming if response_streaming else unary)
