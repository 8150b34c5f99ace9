"""The cap on RPCs in progress per server: a call beyond it is refused at once, before its request is read.

Health checks and reflection are not counted, so probes keep answering
while the server sheds load. The batchers' bounded queues shed the rest
(services/batcher.py); both answer RESOURCE_EXHAUSTED in milliseconds, which
the controller retries with backoff.
"""

import grpc

from services.auth import refusal, required_scope


class ConcurrencyLimit(grpc.aio.ServerInterceptor):
    """Counts the calls in progress; refuses new ones with RESOURCE_EXHAUSTED beyond `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self.refused = 0

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or required_scope(handler_call_details.method) is None:
            return handler
        if self.active >= self.limit:
            self.refused += 1
            return refusal(handler, grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{self.active} calls in progress; the server's limit is {self.limit} "
                           "(server.max_concurrent_rpcs)")
        return self._counted(handler)

    def _counted(self, handler):
        limiter = self
        kwargs = dict(request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                limiter.active += 1
                try:
                    return await inner(request, context)
                finally:
                    limiter.active -= 1

            return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def streaming(request_iterator, context):
                limiter.active += 1
                try:
                    async for reply in inner_stream(request_iterator, context):
                        yield reply
                finally:
                    limiter.active -= 1

            return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
        return handler
