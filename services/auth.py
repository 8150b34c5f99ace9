"""Bearer-token authentication with scopes, checked by a server interceptor.

Each call sends `authorization: Bearer <token>`. The server keeps only the
SHA-256 of each configured token and compares digests with
hmac.compare_digest. A token carries scopes, and every method needs one:

- score: RewardService Score/Compare/CompareStream, and Info of any service
- infer: Generate, LogProbs, Values, Tokenize
- train: Train, SaveCheckpoint, LoadCheckpoint, Release
- admin: the ControllerService (run status and evaluations)

Health checks and server reflection (when enabled) stay open, so that
kubelet probes and schema browsers need no token. With no tokens configured
the server asks for none.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import pathlib
from dataclasses import dataclass

import grpc

from services.config import AuthConfig
from services.handlers import HandlerCache, rebuild

log = logging.getLogger(__name__)

OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")
METHOD_SCOPES = {
    "Info": "score",
    "Score": "score", "Compare": "score", "CompareStream": "score",
    "Generate": "infer", "LogProbs": "infer", "Values": "infer", "Tokenize": "infer",
    "Train": "train", "SaveCheckpoint": "train", "LoadCheckpoint": "train", "Release": "train",
}
SERVICE_SCOPES = {"rlhf.v1.ControllerService": "admin"}


def required_scope(method: str) -> str | None:
    """The scope `/package.Service/Method` needs; None for open methods. Unknown methods need `admin`."""
    service, _, name = method.lstrip("/").partition("/")
    if service in OPEN_SERVICES:
        return None
    return SERVICE_SCOPES.get(service) or METHOD_SCOPES.get(name, "admin")


def token_digest(token: str) -> bytes:
    """SHA-256 of a token, the only form a server keeps."""
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Grant:
    """One accepted token: who holds it, its digest and what it may call."""

    name: str
    digest: bytes
    scopes: frozenset[str]


def load_grants(cfg: AuthConfig) -> list[Grant]:
    """The configured tokens as digests; a token `file` is read once here. OSError/ValueError name the token."""
    grants = []
    for token in cfg.tokens:
        if token.file is not None:
            try:
                secret = pathlib.Path(token.file).read_text().strip()
            except OSError as error:
                raise OSError(f"auth token {token.name!r}: cannot read {token.file}: {error.strerror}") from None
            if not secret:
                raise ValueError(f"auth token {token.name!r}: {token.file} is empty")
            digest = token_digest(secret)
        else:
            digest = bytes.fromhex(token.sha256)
        grants.append(Grant(token.name, digest, frozenset(token.scopes)))
    return grants


def bearer(metadata) -> str | None:
    """The token of an `authorization: Bearer <token>` header, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid token (UNAUTHENTICATED) or without the method's scope (PERMISSION_DENIED)."""

    def __init__(self, grants: list[Grant]):
        self.grants = grants
        self._refusals = HandlerCache(refusal)  # per (method handler, code, details): methods x grants x 2

    def find(self, token: str) -> Grant | None:
        """The grant whose digest matches; every digest is compared, in constant time each."""
        digest = token_digest(token)
        found = None
        for grant in self.grants:
            if hmac.compare_digest(digest, grant.digest):
                found = grant
        return found

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        scope = required_scope(method)
        handler = await continuation(handler_call_details)
        if scope is None or handler is None:
            return handler
        token = bearer(handler_call_details.invocation_metadata)
        grant = self.find(token) if token is not None else None
        if grant is None:
            why = "missing `authorization: Bearer <token>` metadata" if token is None else "unknown token"
            return self._refusals.get(handler, grpc.StatusCode.UNAUTHENTICATED, f"{method}: {why}")
        if scope not in grant.scopes:
            log.warning("token %r (scopes %s) called %s, which needs %r", grant.name, sorted(grant.scopes), method,
                        scope)
            return self._refusals.get(handler, grpc.StatusCode.PERMISSION_DENIED,
                                      f"{method} needs the {scope!r} scope; this token has {', '.join(sorted(grant.scopes))}")
        return handler


def refusal(handler, code: grpc.StatusCode, details: str, trailers=lambda: ()):
    """A handler of the same kind as `handler` that fails every call at once without parsing the request;
    trailers() gives each refusal's trailing metadata."""

    async def unary(request, context):
        await context.abort(code, details, trailing_metadata=trailers())

    async def streaming(request, context):
        await context.abort(code, details, trailing_metadata=trailers())
        yield  # pragma: no cover - makes this an async generator

    return rebuild(handler, streaming if handler.response_streaming else unary, request_deserializer=None)
