"""Discovery of service replicas without a server: target parsing, static lists, DNS (re-)resolution
with a stand-in resolver, and Kubernetes discovery outside a cluster."""

import asyncio
import logging
import socket
import threading

import pytest

from controller.discovery import (
    DiscoveryError,
    DnsDiscovery,
    KubernetesDiscovery,
    StaticDiscovery,
    parse_target,
)

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


# --- Kubernetes without a cluster ----------------------------------------------------------


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
