"""Discovery of service replicas from Kubernetes: EndpointSlice list+watch against a fake Kubernetes API
server (HTTP on loopback) driven by the real `kubernetes` client."""

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

from bench.standin import send_json
from controller.discovery import DiscoveryError, parse_target

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
                    return send_json(self, 404, {"kind": "Status", "code": 404, "message": url.path})
                if query.get("labelSelector") != f"kubernetes.io/service-name={SERVICE}":
                    return send_json(self, 400, {"kind": "Status", "code": 400, "message": "bad labelSelector"})
                if query.get("watch", "").lower() == "true":
                    return self._watch(query)
                api.lists += 1
                send_json(self, 200, {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                                 "metadata": {"resourceVersion": str(api.version)},
                                 "items": list(api.slices.values())})

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


def seconds_to_close(d, ready=None) -> float:
    """Start `d`, wait (off the event loop) until `ready()` holds if given, then time `d.close()`."""

    async def run():
        await d.start()
        if ready is not None:
            await asyncio.to_thread(wait_for, ready)
        started = time.monotonic()
        await d.close()
        return time.monotonic() - started

    return asyncio.run(run())


def test_kubernetes_close_stops_the_watch_thread_quickly(kube):
    """close() returns within seconds even while the watch is blocked waiting for events."""
    api, client = kube
    d = parse_target(f"kubernetes:///{SERVICE}.{NAMESPACE}:grpc", api_client=client)
    assert seconds_to_close(d, ready=lambda: len(api.watch_versions) == 1) < 1.0
    assert not d._thread.is_alive()


def test_kubernetes_close_right_after_start_stops_the_thread(kube):
    """close() straight after start(), before the watch request is open, still ends the thread."""
    _, client = kube
    d = parse_target(f"kubernetes:///{SERVICE}.{NAMESPACE}:grpc", api_client=client)
    assert seconds_to_close(d) < 1.0
    assert not d._thread.is_alive()


def test_kubernetes_bad_label_selector_would_fail(kube):
    """The fake server rejects any other label selector, so the selector checks above are real."""
    _, client = kube
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
