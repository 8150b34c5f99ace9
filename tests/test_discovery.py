"""Discovery of service replicas: target parsing, DNS re-resolution, and EndpointSlice list+watch
against a fake Kubernetes API server driven by the real `kubernetes` client."""

import asyncio
import json
import logging
import queue
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import kubernetes
import pytest

from controller.discovery import (
    DiscoveryError,
    DnsDiscovery,
    KubernetesDiscovery,
    StaticDiscovery,
    parse_target,
)

SERVICE, NAMESPACE = "policy", "rl"
SLICES_PATH = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"


def wait_for(predicate, deadline: float = 3.0) -> bool:
    """Poll `predicate` until it holds or `deadline` seconds pass; returns its last value."""
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            return predicate()
        time.sleep(0.02)
    return True


# --- parse_target ------------------------------------------------------------------------


def test_static_single_list_and_ipv6():
    """Static targets keep the given order, drop duplicates, and keep IPv6 brackets."""
    assert parse_target("policy-0:50051").addresses() == ["policy-0:50051"]
    listed = parse_target(" h1:1 ,h2:2,  h1:1,10.0.0.5:3 ")
    assert isinstance(listed, StaticDiscovery)
    assert listed.addresses() == ["h1:1", "h2:2", "10.0.0.5:3"]
    assert parse_target("[::1]:50051,[fd00::2]:7").addresses() == ["[::1]:50051", "[fd00::2]:7"]


def test_static_start_and_close_change_nothing():
    """A static list is usable before start() and unchanged by start()/close()."""
    d = parse_target("b:2,a:1")

    async def run():
        await d.start()
        await d.close()

    asyncio.run(run())
    assert d.addresses() == ["b:2", "a:1"]
    assert d.target == "b:2,a:1"


def test_dns_and_kubernetes_targets_parse():
    """Scheme prefixes pick the source; namespace and named/numeric ports are parsed."""
    for target in ("dns:///svc-headless:50051", "dns:svc-headless:50051"):
        d = parse_target(target, interval=2.0)
        assert isinstance(d, DnsDiscovery)
        assert (d.host, d.port, d.interval, d.target) == ("svc-headless", 50051, 2.0, target)
    named = parse_target("kubernetes:///policy.rl:grpc")
    assert isinstance(named, KubernetesDiscovery)
    assert (named.service, named.namespace, named.port) == ("policy", "rl", "grpc")
    assert parse_target("kubernetes:///policy.rl:50051").port == 50051


def test_kubernetes_namespace_default(monkeypatch):
    """Without `.namespace`, the namespace comes from $POD_NAMESPACE, else `default` here."""
    monkeypatch.setenv("POD_NAMESPACE", "team-a")
    assert parse_target("kubernetes:///policy:grpc").namespace == "team-a"
    monkeypatch.delenv("POD_NAMESPACE")
    assert parse_target("kubernetes:///policy:grpc").namespace == "default"  # no service account file here


@pytest.mark.parametrize("target", [
    "",
    "   ",
    "policy",
    "policy:",
    "policy:0",
    "policy:65536",
    "policy:grpc",
    ":50051",
    "a:1,,b:2",
    "::1:50051",
    "[not-v6]:1",
    "foo:///x:1",
    "dns:///:1",
    "dns:///host",
    "dns://8.8.8.8/host:1",
    "kubernetes:///policy",
    "kubernetes:///:grpc",
    "kubernetes:///policy:0",
    "kubernetes:///Policy:grpc",
    "kubernetes:///policy:bad_name",
])
def test_bad_targets_raise_value_error_naming_them(target):
    """Every malformed target is rejected up front, with the target in the message."""
    with pytest.raises(ValueError) as info:
        parse_target(target)
    assert repr(target) in str(info.value)


# --- DNS -----------------------------------------------------------------------------------


def test_dns_resolves_localhost():
    """dns:///localhost resolves through the real resolver to loopback ip:port addresses."""
    d = parse_target("dns:///localhost:50051")

    async def run():
        await d.start()
        try:
            return d.addresses()
        finally:
            await d.close()

    addresses = asyncio.run(run())
    assert set(addresses) & {"127.0.0.1:50051", "[::1]:50051"}
    assert addresses == sorted(set(addresses))


def test_dns_first_failure_raises_discovery_error():
    """An unresolvable name fails start() with a DiscoveryError naming the host."""
    d = parse_target("dns:///no-such-host.invalid:1")
    with pytest.raises(DiscoveryError, match="no-such-host.invalid"):
        asyncio.run(d.start())


class FakeResolver:
    """Stands in for socket.getaddrinfo: returns `answer` (a list of IPs) or raises when it is None."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = 0

    def __call__(self, host, port, *args, **kwargs):
        self.calls += 1
        if self.answer is None:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        family = {True: socket.AF_INET6, False: socket.AF_INET}
        return [(family[":" in ip], socket.SOCK_STREAM, 6, "", (ip, port)) for ip in self.answer]


def test_dns_re_resolution_keeps_last_good_list(monkeypatch, caplog):
    """Re-resolution publishes new records, and a failure in between keeps the last good list."""
    resolver = FakeResolver(["10.0.0.2", "10.0.0.1", "10.0.0.2"])
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    d = parse_target("dns:///replicas:7", interval=0.02)

    async def run():
        await d.start()
        first = d.addresses()
        resolver.answer = None
        calls = resolver.calls
        while resolver.calls < calls + 3:  # several failed re-resolutions
            await asyncio.sleep(0.01)
        during_failure = d.addresses()
        resolver.answer = ["fd00::1", "10.0.0.3"]
        for _ in range(200):
            if d.addresses() != during_failure:
                break
            await asyncio.sleep(0.01)
        await d.close()
        return first, during_failure, d.addresses()

    with caplog.at_level(logging.WARNING, logger="controller.discovery"):
        first, during_failure, recovered = asyncio.run(run())
    assert first == ["10.0.0.1:7", "10.0.0.2:7"]
    assert during_failure == first
    assert recovered == ["10.0.0.3:7", "[fd00::1]:7"]
    assert "keeping 2 addresses" in caplog.text


def test_dns_resolution_does_not_block_the_event_loop(monkeypatch):
    """getaddrinfo runs off the loop: a task on the loop gets to run while a lookup is pending."""
    loop_ran = threading.Event()
    seen = []

    def slow_getaddrinfo(host, port, *args, **kwargs):
        seen.append(loop_ran.wait(2.0))  # never set in time if this call holds the loop thread
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.9", port))]

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    d = parse_target("dns:///replicas:7", interval=60)

    async def mark():
        await asyncio.sleep(0)
        loop_ran.set()

    async def run():
        marker = asyncio.create_task(mark())
        await d.start()
        await marker
        await d.close()

    asyncio.run(run())
    assert seen == [True]
    assert d.addresses() == ["10.0.0.9:7"]


# --- Kubernetes: a fake API server -----------------------------------------------------------


def endpoint_slice(name: str, endpoints: list[tuple[str, bool | None, bool | None]],
                   ports: list[tuple[str, int]] = (("grpc", 50051),)) -> dict:
    """An EndpointSlice of SERVICE; endpoints are (ip, ready, terminating), None meaning unset."""
    eps = []
    for ip, ready, terminating in endpoints:
        conditions = {k: v for k, v in (("ready", ready), ("terminating", terminating)) if v is not None}
        eps.append({"addresses": [ip], "conditions": conditions})
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": SERVICE}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
    }


class FakeKubeApi:
    """Serves list and watch of EndpointSlices for SERVICE in NAMESPACE, controlled by the test.

    `put`/`delete` change the stored slices and queue the matching watch event; `put(..., event=False)`
    changes state silently (an event the client missed). `expire()` queues a 410 ERROR event and
    `end_watch()` ends the current watch response, as an API server does on timeoutSeconds.
    """

    def __init__(self):
        self.slices: dict[str, dict] = {}
        self.version = 100
        self.events: queue.Queue = queue.Queue()
        self.lists = 0
        self.watch_versions: list[str | None] = []  # resourceVersion of each watch request
        self.closed = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def _stamp(self, obj: dict) -> dict:
        self.version += 1
        obj = json.loads(json.dumps(obj))
        obj["metadata"]["resourceVersion"] = str(self.version)
        return obj

    def put(self, obj: dict, event: bool = True) -> None:
        """Create or replace a slice; queue ADDED or MODIFIED unless `event` is False."""
        kind = "MODIFIED" if obj["metadata"]["name"] in self.slices else "ADDED"
        obj = self._stamp(obj)
        self.slices[obj["metadata"]["name"]] = obj
        if event:
            self.events.put({"type": kind, "object": obj})

    def delete(self, name: str) -> None:
        """Remove a slice and queue DELETED."""
        obj = self._stamp(self.slices.pop(name))
        self.events.put({"type": "DELETED", "object": obj})

    def expire(self) -> None:
        """Queue the 410 Gone ERROR event an API server sends when a watch's version is too old."""
        status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired",
                  "message": "too old resource version", "code": 410}
        self.events.put({"type": "ERROR", "object": status})

    def end_watch(self) -> None:
        """End the current watch response cleanly."""
        self.events.put(None)

    def close(self) -> None:
        """Stop serving; open watch responses end."""
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # chunked watch responses need it

            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path != SLICES_PATH:
                    return self._json(404, {"kind": "Status", "code": 404, "message": url.path})
                if query.get("labelSelector") != f"kubernetes.io/service-name={SERVICE}":
                    return self._json(400, {"kind": "Status", "code": 400, "message": "bad labelSelector"})
                if query.get("watch", "").lower() == "true":
                    return self._watch(query)
                api.lists += 1
                self._json(200, {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                                 "metadata": {"resourceVersion": str(api.version)},
                                 "items": list(api.slices.values())})

            def _json(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _watch(self, query):
                # Chunked, like a real API server: the client reads one chunk at a time, while a
                # close-delimited body would only be read once the connection closed.
                api.watch_versions.append(query.get("resourceVersion"))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                end = time.monotonic() + int(query.get("timeoutSeconds", "30"))
                while not api.closed.is_set() and time.monotonic() < end:
                    try:
                        event = api.events.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    if event is None:
                        break
                    self._chunk(json.dumps(event).encode() + b"\n")
                self._chunk(b"")  # the last chunk ends the response
                self.close_connection = True

            def _chunk(self, data: bytes):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

        return Handler


@pytest.fixture
def kube():
    """A fake API server with two slices of SERVICE, and a real ApiClient pointed at it."""
    api = FakeKubeApi()
    api.put(endpoint_slice("policy-a", [("10.0.0.2", True, None), ("10.0.0.1", None, None),
                                        ("10.0.0.3", False, None), ("10.0.0.4", True, True)]), event=False)
    api.put(endpoint_slice("policy-b", [("10.0.1.1", True, False)],
                           ports=[("metrics", 9090), ("grpc", 50052)]), event=False)
    cfg = kubernetes.client.Configuration()
    cfg.host = api.host
    client = kubernetes.client.ApiClient(cfg)
    yield api, client
    client.close()
    api.close()


def run_kubernetes(client, target: str, body):
    """start() a Kubernetes discovery, run the synchronous `body(d)` off the loop, then close()."""

    async def run():
        d = parse_target(target, api_client=client)
        await d.start()
        try:
            return await asyncio.to_thread(body, d)
        finally:
            await d.close()

    return asyncio.run(run())


def test_kubernetes_initial_list_has_ready_endpoints_with_named_port(kube):
    """Not-ready and terminating endpoints are left out; the named port resolves per slice."""
    api, client = kube
    addresses = run_kubernetes(client, f"kubernetes:///{SERVICE}.{NAMESPACE}:grpc", lambda d: d.addresses())
    assert addresses == ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.1.1:50052"]
    assert api.lists == 1


def test_kubernetes_numeric_port_is_used_as_is(kube):
    """A numeric port ignores the slices' port names."""
    _, client = kube
    addresses = run_kubernetes(client, f"kubernetes:///{SERVICE}.{NAMESPACE}:7000", lambda d: d.addresses())
    assert addresses == ["10.0.0.1:7000", "10.0.0.2:7000", "10.0.1.1:7000"]


def test_kubernetes_watch_events_update_addresses(kube):
    """MODIFIED, ADDED and DELETED events reach addresses() within a couple of seconds."""
    api, client = kube

    def body(d):
        assert wait_for(lambda: api.watch_versions == [str(api.version)])  # watch from the list's version
        api.put(endpoint_slice("policy-a", [("10.0.0.2", True, None)]))
        assert wait_for(lambda: d.addresses() == ["10.0.0.2:50051", "10.0.1.1:50052"])
        api.put(endpoint_slice("policy-c", [("10.0.2.1", True, None)]))
        assert wait_for(lambda: d.addresses() == ["10.0.0.2:50051", "10.0.1.1:50052", "10.0.2.1:50051"])
        api.delete("policy-b")
        assert wait_for(lambda: d.addresses() == ["10.0.0.2:50051", "10.0.2.1:50051"])

    run_kubernetes(client, f"kubernetes:///{SERVICE}.{NAMESPACE}:grpc", body)
    assert api.lists == 1  # events alone, no re-list


def test_kubernetes_watch_end_rewatches_from_last_version(kube):
    """When a watch response ends, the next watch resumes from the last event's version."""
    api, client = kube

    def body(d):
        api.put(endpoint_slice("policy-c", [("10.0.2.1", True, None)]))
        assert wait_for(lambda: "10.0.2.1:50051" in d.addresses())
        seen = str(api.version)
        api.end_watch()
        assert wait_for(lambda: len(api.watch_versions) == 2)
        return seen

    seen = run_kubernetes(client, f"kubernetes:///{SERVICE}.{NAMESPACE}:grpc", body)
    assert api.watch_versions[1] == seen
    assert api.lists == 1


def test_kubernetes_410_gone_relists(kube, caplog):
    """A 410 Gone on the watch makes the client list again, picking up changes it missed."""
    api, client = kube

    def body(d):
        assert wait_for(lambda: len(api.watch_versions) == 1)
        api.put(endpoint_slice("policy-b", [("10.0.1.9", True, None)]), event=False)  # missed change
        api.expire()
        assert wait_for(lambda: api.lists == 2, deadline=5.0)  # after a 1 s backoff
        assert wait_for(lambda: d.addresses() == ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.1.9:50051"])
        assert wait_for(lambda: len(api.watch_versions) == 2)

    with caplog.at_level(logging.WARNING, logger="controller.discovery"):
        run_kubernetes(client, f"kubernetes:///{SERVICE}.{NAMESPACE}:grpc", body)
    assert api.watch_versions[1] == str(api.version)
    assert "410" in caplog.text


def test_kubernetes_close_stops_the_watch_thread_quickly(kube):
    """close() returns within seconds even while the watch is blocked waiting for events."""
    api, client = kube
    d = parse_target(f"kubernetes:///{SERVICE}.{NAMESPACE}:grpc", api_client=client)

    async def run():
        await d.start()
        await asyncio.to_thread(wait_for, lambda: len(api.watch_versions) == 1)
        started = time.monotonic()
        await d.close()
        return time.monotonic() - started

    elapsed = asyncio.run(run())
    assert elapsed < 1.0
    assert not d._thread.is_alive()


def test_kubernetes_close_right_after_start_stops_the_thread(kube):
    """close() straight after start(), before the watch request is open, still ends the thread."""
    _, client = kube
    d = parse_target(f"kubernetes:///{SERVICE}.{NAMESPACE}:grpc", api_client=client)

    async def run():
        await d.start()
        started = time.monotonic()
        await d.close()
        return time.monotonic() - started

    elapsed = asyncio.run(run())
    assert elapsed < 1.0
    assert not d._thread.is_alive()


def test_kubernetes_bad_label_selector_would_fail(kube):
    """The fake server rejects any other label selector, so the selector checks above are real."""
    api, client = kube
    with pytest.raises(kubernetes.client.ApiException) as info:
        kubernetes.client.DiscoveryV1Api(client).list_namespaced_endpoint_slice(
            NAMESPACE, label_selector="app=policy")
    assert info.value.status == 400


def test_kubernetes_unreachable_api_raises_discovery_error():
    """A failed first list is a DiscoveryError naming the service."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before use: nothing listens there
    cfg = kubernetes.client.Configuration()
    cfg.host = f"http://127.0.0.1:{port}"
    client = kubernetes.client.ApiClient(cfg)
    d = parse_target(f"kubernetes:///{SERVICE}.{NAMESPACE}:grpc", api_client=client)
    try:
        with pytest.raises(DiscoveryError, match=SERVICE):
            asyncio.run(d.start())
    finally:
        client.close()


def test_kubernetes_without_any_config_raises_discovery_error(monkeypatch, tmp_path):
    """Outside a cluster and without kubeconfig, start() says so and suggests the alternatives."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    d = parse_target("kubernetes:///policy:grpc")
    with pytest.raises(DiscoveryError) as info:
        asyncio.run(d.start())
    message = str(info.value)
    assert "no in-cluster service account" in message and "kubeconfig" in message
    assert "dns:///" in message and "\n" not in message
