"""Transport security and channel options of every server and client of the mesh, importable without a model.

Servers: `server_credentials` turns a ServerTLSConfig into gRPC credentials
that pick up a renewed certificate (a cert-manager rotation, say) on new
connections. Clients: `open_channel` dials with TLS when configured and adds
`authorization: Bearer <token>` to every call when a token is configured.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time

import grpc

from services.config import ClientSecurity, ServerTLSConfig

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # what a client accepts: replies are sized by the servers' own limits
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
TOKEN_ENV = "RLHF_TOKEN"


def server_options(max_message_mb: int) -> list[tuple[str, int]]:
    """A server's options: requests above max_message_mb are refused by gRPC before they are parsed."""
    limit = max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as error:
        raise OSError(f"tls: cannot read the {what} {path}: {error.strerror}") from None


def _certificate_configuration(cfg: ServerTLSConfig):
    return grpc.ssl_server_certificate_configuration(
        [(_read(cfg.key_file, "key_file"), _read(cfg.cert_file, "cert_file"))],
        root_certificates=_read(cfg.client_ca_file, "client_ca_file"))


def server_credentials(cfg: ServerTLSConfig) -> grpc.ServerCredentials:
    """TLS credentials (mutual when client_ca_file is set) that reload the files when they change."""
    files = [f for f in (cfg.cert_file, cfg.key_file, cfg.client_ca_file) if f]
    state = {"stamp": _stamp(files), "checked": time.monotonic()}

    def fetch():  # called by gRPC for each new connection: None keeps the current certificate
        if not cfg.reload_seconds or time.monotonic() - state["checked"] < cfg.reload_seconds:
            return None
        state["checked"] = time.monotonic()
        stamp = _stamp(files)
        if stamp == state["stamp"]:
            return None
        try:
            configuration = _certificate_configuration(cfg)
        except OSError as error:  # a half-written renewal: keep serving the old certificate
            log.warning("%s; keeping the current certificate", error)
            return None
        state["stamp"] = stamp
        log.info("tls: loaded the renewed certificate %s", cfg.cert_file)
        return configuration

    return grpc.dynamic_ssl_server_credentials(_certificate_configuration(cfg), fetch,
                                               require_client_authentication=cfg.client_ca_file is not None)


def _stamp(files: list[str]) -> tuple:
    return tuple(os.stat(f).st_mtime_ns if os.path.exists(f) else None for f in files)


def read_token(security: ClientSecurity | None) -> str | None:
    """The bearer token a client sends: security.token_file, else $RLHF_TOKEN, else None."""
    if security is not None and security.token_file:
        try:
            token = pathlib.Path(security.token_file).read_text().strip()
        except OSError as error:
            raise OSError(f"token_file {security.token_file}: {error.strerror}") from None
        if not token:
            raise ValueError(f"token_file {security.token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def channel_credentials(security: ClientSecurity | None) -> grpc.ChannelCredentials | None:
    """TLS credentials for a client, or None for plain text."""
    tls = security.tls if security is not None else None
    if tls is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read(tls.ca_file, "ca_file"),
                                        private_key=_read(tls.key_file, "key_file"),
                                        certificate_chain=_read(tls.cert_file, "cert_file"))


def client_options(security: ClientSecurity | None) -> list:
    """Channel options: message sizes, and the name to check the server certificate against."""
    tls = security.tls if security is not None else None
    if tls is not None and tls.server_name:
        return [*GRPC_OPTIONS, ("grpc.ssl_target_name_override", tls.server_name)]
    return list(GRPC_OPTIONS)


def open_channel(target: str, security: ClientSecurity | None = None, aio: bool = True):
    """A channel to `target` (grpc.aio unless aio=False) with the configured TLS and bearer token."""
    credentials = channel_credentials(security)
    token = read_token(security)
    options = client_options(security)
    module = grpc.aio if aio else grpc
    if token is not None and credentials is None:  # gRPC call credentials need TLS: send the header ourselves
        return _plain_with_token(module, target, options, token, aio)
    if token is not None:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    if credentials is None:
        return module.insecure_channel(target, options=options)
    return module.secure_channel(target, credentials, options=options)


def _plain_with_token(module, target: str, options: list, token: str, aio: bool):
    """A plain-text channel that adds the token as metadata (loopback and tests; use TLS across a network)."""
    header = ("authorization", f"Bearer {token}")
    if aio:
        return module.insecure_channel(target, options=options, interceptors=_aio_interceptors(header))
    return grpc.intercept_channel(module.insecure_channel(target, options=options), _SyncHeader(header))


def _with_header(details, header):
    """The call's details with `header` added to its metadata (aio and sync details are both namedtuples)."""
    return details._replace(metadata=[*(details.metadata or []), header])


def _aio_interceptors(header) -> list:
    class Unary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            return await continuation(_with_header(details, header), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, details, request):
            return await continuation(_with_header(details, header), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, details, request_iterator):
            return await continuation(_with_header(details, header), request_iterator)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, details, request_iterator):
            return await continuation(_with_header(details, header), request_iterator)

    return [Unary(), UnaryStream(), StreamUnary(), StreamStream()]


class _SyncHeader(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, header):
        self.header = header

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_header(details, self.header), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_header(details, self.header), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(_with_header(details, self.header), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(_with_header(details, self.header), request_iterator)
