"""/metrics on a bounded server: idle or slow clients cost no threads, are dropped, and never block a scrape."""

import contextlib
import gzip
import socket
import threading
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from services.metrics import MetricsEndpoint, exposition
from services.metrics_http import BoundedHTTPServer
from tests.support.metrics import samples, scrape

TIMEOUT = 1.0  # seconds a silent connection is kept


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("rlhf_test_requests_total", "Requests.", ["role"], registry=registry).labels("reward").inc(3)
    return registry


@pytest.fixture
def endpoint(registry):
    with contextlib.closing(MetricsEndpoint(registry, "127.0.0.1", 0, timeout=TIMEOUT)) as endpoint:
        yield endpoint


def connect(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]


def closed_by_server(conn: socket.socket, wait: float) -> bool:
    """Whether the server closes `conn` (end of stream or reset) within `wait` seconds."""
    conn.settimeout(wait)
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_300_idle_connections_take_no_threads_do_not_block_a_scrape_and_are_dropped(registry):
    baseline = threading.active_count()
    with contextlib.closing(MetricsEndpoint(registry, "127.0.0.1", 0, timeout=TIMEOUT)) as endpoint:
        idle = connect(endpoint.port, 300)
        try:
            assert not closed_by_server(idle[-1], 0.1)  # the newest is held until its timeout ...
            assert threading.active_count() - baseline < 20
            start = time.monotonic()
            scraped = scrape(endpoint.url)
            assert time.monotonic() - start < 3
            assert scraped[("rlhf_test_requests_total", (("role", "reward"),))] == 3
            assert threading.active_count() - baseline < 20
            assert all(closed_by_server(c, TIMEOUT + 3) for c in idle)  # ... and every one is closed after it
        finally:
            for conn in idle:
                conn.close()


def test_a_client_sending_its_request_too_slowly_is_dropped(endpoint):
    with socket.create_connection(("127.0.0.1", endpoint.port)) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest of the headers
        start = time.monotonic()
        assert closed_by_server(slow, TIMEOUT + 3)
        assert time.monotonic() - start >= TIMEOUT * 0.9


def test_beyond_the_cap_the_longest_silent_connection_is_closed_first(registry):
    server = BoundedHTTPServer(lambda environ, start: [], "127.0.0.1", 0, workers=1, timeout=30, max_connections=4)
    conns = []
    try:
        for _ in range(6):  # one at a time, so that the server holds them in this order
            conns += connect(server.port, 1)
            time.sleep(0.05)
        assert [closed_by_server(c, 0.5) for c in conns[:2]] == [True, True]
        assert not any(closed_by_server(c, 0.2) for c in conns[2:])
    finally:
        for conn in conns:
            conn.close()
        server.close()


def test_it_serves_what_start_http_server_served(endpoint, registry):
    with urllib.request.urlopen(endpoint.url, timeout=5) as reply:
        assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert reply.read().decode() == exposition(registry)
    gzipped = urllib.request.Request(endpoint.url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(gzipped, timeout=5) as reply:
        assert reply.headers["Content-Encoding"] == "gzip"
        assert samples(gzip.decompress(reply.read()).decode()) == samples(exposition(registry))
    accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
    openmetrics = urllib.request.Request(endpoint.url, headers=accept)
    with urllib.request.urlopen(openmetrics, timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
        assert reply.read().decode().endswith("# EOF\n")


def test_close_frees_the_port_and_stops_the_threads(registry):
    baseline = threading.active_count()
    endpoint = MetricsEndpoint(registry, "127.0.0.1", 0, timeout=TIMEOUT)
    port = endpoint.port
    idle = connect(port, 3)
    endpoint.close()
    try:
        assert threading.active_count() == baseline
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        with contextlib.closing(MetricsEndpoint(registry, "127.0.0.1", port)) as again:  # the port is free again
            assert scrape(again.url)
    finally:
        for conn in idle:
            conn.close()
