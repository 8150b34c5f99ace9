"""Where the replicas of one service are: a target string turned into a live list of `host:port`.

Target syntax (one string per service in the controller config):

- `host:port`: one static address; `h1:p1, h2:p2, ...`: a static list (whitespace around
  commas is allowed). IPv6 literals are bracketed: `[::1]:50051`. The list is used as
  given (duplicates dropped, order kept) and never changes.
- `dns:///host:port` (or `dns:host:port`): every A/AAAA record of `host`, e.g. a Kubernetes
  headless Service, re-resolved every `interval` seconds. Addresses are `ip:port`
  (`[ip]:port` for IPv6), sorted and deduplicated. A failed re-resolution keeps the last
  good list; a failed first resolution makes `start()` raise `DiscoveryError`.
- `kubernetes:///service:port` or `kubernetes:///service.namespace:port`: the ready
  endpoints of the Service's EndpointSlices (discovery.k8s.io/v1), listed then watched.
  `port` is a port name matched against the slice's `ports[].name` (e.g. `grpc`) or a
  number used as is. The namespace defaults to `$POD_NAMESPACE`, then the service account's
  namespace file, then `default`.

Every source is a `Discovery`: `await start()` does the first resolution, `addresses()` reads
the current list without blocking, `await close()` stops any background refresh.
"""

import asyncio
import ipaddress
import logging
import os
import re
import socket
import threading
import time

log = logging.getLogger(__name__)

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # RFC 1123 label: names, namespaces, port names
HOST_NAME = re.compile(r"^[A-Za-z0-9_]([-A-Za-z0-9_.]*[A-Za-z0-9_.])?$")
NO_KUBECONFIG = (
    "kubernetes discovery: no in-cluster service account and no kubeconfig found; "
    "outside a cluster use a static list (host:port,host:port) or dns:///host:port"
)


class DiscoveryError(RuntimeError):
    """The addresses of a service could not be found (first resolution failed, no cluster access)."""


class Discovery:
    """Base of all sources: a target string and a lock-protected current address list."""

    def __init__(self, target: str):
        self.target = target
        self._lock = threading.Lock()  # the Kubernetes watch publishes from its own thread
        self._addresses: list[str] = []

    def addresses(self) -> list[str]:
        """The current addresses as `host:port` strings; cheap, never blocks on I/O."""
        with self._lock:
            return list(self._addresses)

    def _publish(self, addresses: list[str]) -> None:
        with self._lock:
            self._addresses = list(addresses)

    async def start(self) -> None:
        """Do the first resolution; raises DiscoveryError when it fails."""

    async def close(self) -> None:
        """Stop any background refresh; `addresses()` keeps returning the last list."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"


class StaticDiscovery(Discovery):
    """A fixed list of addresses, in the order given."""

    def __init__(self, target: str, addresses: list[str]):
        super().__init__(target)
        self._publish(list(dict.fromkeys(addresses)))


class DnsDiscovery(Discovery):
    """Every A/AAAA record of one host name, re-resolved every `interval` seconds."""

    def __init__(self, target: str, host: str, port: int, interval: float = 5.0):
        super().__init__(target)
        self.host = host
        self.port = port
        self.interval = interval  # seconds between re-resolutions
        self._task: asyncio.Task | None = None

    async def _resolve(self) -> list[str]:
        # getaddrinfo blocks (it may wait on a DNS server), so it runs in a worker thread.
        infos = await asyncio.to_thread(socket.getaddrinfo, self.host, self.port, type=socket.SOCK_STREAM)
        return sorted({join_host_port(info[4][0], self.port) for info in infos})

    async def start(self) -> None:
        """Resolve once, then re-resolve in the background.

        A first failure raises DiscoveryError naming the host, but the background
        re-resolution runs anyway: a headless Service has no records until its
        first pod exists, and the caller may choose to wait for them.
        """
        self._task = asyncio.create_task(self._refresh_forever(), name=f"discovery {self.target}")
        try:
            self._publish(await self._resolve())
        except OSError as error:
            raise DiscoveryError(f"dns discovery: cannot resolve {self.host!r} ({self.target}): {error}") from error

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self._publish(await self._resolve())
            except OSError as error:
                # A DNS hiccup must not empty the replica set: keep serving the last good list.
                log.warning("dns discovery: re-resolving %r failed (%s); keeping %d addresses",
                            self.host, error, len(self.addresses()))

    async def close(self) -> None:
        """Cancel the re-resolution task."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


def join_host_port(host: str, port: int) -> str:
    """`host:port`, with IPv6 literals bracketed (`[::1]:50051`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(address: str, target: str) -> tuple[str, str]:
    """Split `host:port` or `[v6]:port` into (host, port text); ValueError naming the target."""
    if not address:
        raise ValueError(f"bad target {target!r}: empty address in the list")
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad target {target!r}: {address!r} needs the form [ipv6]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad target {target!r}: {host!r} is not an IPv6 address") from None
        return host, port
    host, sep, port = address.rpartition(":")
    if not sep:
        raise ValueError(f"bad target {target!r}: {address!r} has no port")
    if not host:
        raise ValueError(f"bad target {target!r}: {address!r} has an empty host")
    if not HOST_NAME.match(host):
        raise ValueError(f"bad target {target!r}: invalid host {host!r} (bracket IPv6 literals: [::1]:port)")
    return host, port


def port_number(port: str, target: str) -> int:
    """A TCP port 1..65535 from its text; ValueError naming the target."""
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"bad target {target!r}: port {port!r} is not a number in 1..65535")
    return int(port)


def parse_target(target: str, *, interval: float = 5.0, api_client=None) -> Discovery:
    """The Discovery for a target string (syntax in the module docstring).

    `interval` is the DNS re-resolution period in seconds; `api_client` is a
    `kubernetes.client.ApiClient` for `kubernetes:///` targets (default: in-cluster, then kubeconfig).
    """
    text = target.strip()
    if not text:
        raise ValueError(f"bad target {target!r}: empty")
    if text.startswith("kubernetes:"):
        return parse_kubernetes(target, text.removeprefix("kubernetes:"), api_client)
    if text.startswith("dns:"):
        return parse_dns(target, text.removeprefix("dns:"), interval)
    if "://" in text:
        raise ValueError(f"bad target {target!r}: unknown scheme (use host:port, dns:///, kubernetes:///)")
    addresses = []
    for item in text.split(","):
        host, port = split_host_port(item.strip(), target)
        addresses.append(join_host_port(host, port_number(port, target)))
    return StaticDiscovery(target, addresses)


def parse_dns(target: str, rest: str, interval: float) -> DnsDiscovery:
    """`dns:///host:port` or `dns:host:port` (rest is what follows `dns:`)."""
    if rest.startswith("//"):
        if not rest.startswith("///"):
            raise ValueError(f"bad target {target!r}: a DNS server authority is not supported, use dns:///host:port")
        rest = rest[3:]
    if interval <= 0:
        raise ValueError(f"bad target {target!r}: re-resolution interval must be > 0 s, got {interval}")
    host, port = split_host_port(rest, target)
    return DnsDiscovery(target, host, port_number(port, target), interval)


def parse_kubernetes(target: str, rest: str, api_client) -> "KubernetesDiscovery":
    """`kubernetes:///service[.namespace]:port` (rest is what follows `kubernetes:`)."""
    if not rest.startswith("///"):
        raise ValueError(f"bad target {target!r}: use kubernetes:///service[.namespace]:port")
    name, sep, port = rest[3:].rpartition(":")
    if not sep or not port:
        raise ValueError(f"bad target {target!r}: no port (a name like grpc, or a number)")
    service, _, namespace = name.partition(".")
    if not DNS_LABEL.match(service):
        raise ValueError(f"bad target {target!r}: {service!r} is not a valid Service name")
    if namespace and not DNS_LABEL.match(namespace):
        raise ValueError(f"bad target {target!r}: {namespace!r} is not a valid namespace")
    if port.isdigit():
        port_value: int | str = port_number(port, target)
    elif DNS_LABEL.match(port):
        port_value = port
    else:
        raise ValueError(f"bad target {target!r}: {port!r} is neither a port number nor a port name")
    return KubernetesDiscovery(target, service, namespace or default_namespace(), port_value, api_client)


def default_namespace() -> str:
    """The pod's namespace: $POD_NAMESPACE, else the service account's namespace file, else `default`."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(NAMESPACE_FILE) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def load_api_client():
    """An ApiClient from the in-cluster service account, else the kubeconfig; DiscoveryError if neither."""
    from kubernetes import (  # imported here: static and DNS targets do not need it
        client,
        config,
    )

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        # KUBECONFIG is read now rather than at kubernetes import time, so a changed env is honoured.
        path = os.environ.get("KUBECONFIG") or "~/.kube/config"
        try:
            config.load_kube_config(config_file=path, client_configuration=cfg)
        except (config.ConfigException, OSError) as error:
            raise DiscoveryError(NO_KUBECONFIG) from error
    return client.ApiClient(cfg)


def endpoint_ready(endpoint) -> bool:
    """An endpoint serves when `ready` is true or unset and it is not terminating."""
    conditions = endpoint.conditions
    if conditions is None:
        return True
    return conditions.ready is not False and conditions.terminating is not True


def slice_addresses(endpoint_slice, port: int | str) -> list[str]:
    """`ip:port` of the ready endpoints of one V1EndpointSlice; a named port is looked up in its ports."""
    if isinstance(port, str):
        numbers = [p.port for p in endpoint_slice.ports or [] if p.name == port and p.port]
        if not numbers:
            return []  # this slice carries other ports of the Service
        port = numbers[0]
    return [
        join_host_port(ip, port)
        for endpoint in endpoint_slice.endpoints or []
        if endpoint_ready(endpoint)
        for ip in endpoint.addresses or []
    ]



class KubernetesDiscovery(Discovery):
    """Ready endpoints of one Service's EndpointSlices, listed once then followed by a watch.

    The kubernetes client is synchronous, so the watch runs in a daemon thread and publishes
    each new list through the lock in `Discovery`.
    """

    def __init__(self, target: str, service: str, namespace: str, port: int | str, api_client=None,
                 watch_timeout: int = 30, backoff: tuple[float, float] = (1.0, 30.0)):
        super().__init__(target)
        self.service = service
        self.namespace = namespace
        self.port = port  # a port name (str) looked up in each slice, or a number used as is
        self.selector = f"kubernetes.io/service-name={service}"
        self.watch_timeout = watch_timeout  # seconds per watch request; bounds how long close() can lag
        self.backoff = backoff  # (first, cap) seconds between re-lists after an error
        self._api_client = api_client
        self._owns_client = api_client is None
        self._api = None
        self._slices: dict[str, list[str]] = {}  # slice name -> its ready addresses
        self._stop = threading.Event()
        self._watch = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        """List the slices (DiscoveryError on failure), then follow changes in a daemon thread."""
        from kubernetes import client

        if self._api_client is None:
            self._api_client = await asyncio.to_thread(load_api_client)
        self._api = client.DiscoveryV1Api(self._api_client)
        try:
            version = await asyncio.to_thread(self._list)
        except Exception as error:  # the client raises ApiException, urllib3 and socket errors alike
            raise DiscoveryError(f"kubernetes discovery: listing EndpointSlices of {self.service!r} "
                                 f"in namespace {self.namespace!r} failed: {error}") from error
        self._thread = threading.Thread(target=self._run, args=(version,), daemon=True,
                                        name=f"discovery {self.target}")
        self._thread.start()

    def _list(self) -> str:
        """Replace the slice map with a fresh list; returns the list's resourceVersion."""
        result = self._api.list_namespaced_endpoint_slice(
            self.namespace, label_selector=self.selector, _request_timeout=self.watch_timeout)
        self._slices = {s.metadata.name: slice_addresses(s, self.port) for s in result.items or []}
        self._publish_slices()
        return result.metadata.resource_version

    def _publish_slices(self) -> None:
        self._publish(sorted({a for addresses in self._slices.values() for a in addresses}))

    def _run(self, version: str | None) -> None:
        """Watch thread: follow the watch, re-watching on expiry and re-listing with backoff on errors."""
        delay = self.backoff[0]
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._list()
                version = self._follow(version)
                delay = self.backoff[0]
            except Exception as error:  # any failure (410 Gone included) means the view may be stale
                if self._stop.is_set():
                    break
                gone = getattr(error, "status", None) == 410
                log.warning("kubernetes discovery %s: %s; re-listing in %.1fs", self.target,
                            "watch resourceVersion expired (410 Gone)" if gone else error, delay)
                version = None
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff[1])

    def _follow(self, version: str) -> str:
        """Apply watch events from `version` until the watch request ends; returns the last version."""
        from kubernetes import watch

        self._watch = watch.Watch()
        stream = self._watch.stream(
            self._api.list_namespaced_endpoint_slice, self.namespace, label_selector=self.selector,
            resource_version=version, timeout_seconds=self.watch_timeout,
            _request_timeout=(10, self.watch_timeout + 10))  # read timeout catches a silently dead connection
        for event in stream:
            if self._stop.is_set():
                break
            self._apply(event["type"], event["object"])
        return self._watch.resource_version or version

    def _apply(self, kind: str, endpoint_slice) -> None:
        if kind == "DELETED":
            self._slices.pop(endpoint_slice.metadata.name, None)
        elif kind in ("ADDED", "MODIFIED"):
            self._slices[endpoint_slice.metadata.name] = slice_addresses(endpoint_slice, self.port)
        else:
            return  # BOOKMARK: only moves the resourceVersion, which Watch tracks
        self._publish_slices()

    async def close(self) -> None:
        """Stop the watch thread, waiting at most about two seconds for it."""
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._join, 2.0)
        if self._owns_client and self._api_client is not None:
            self._api_client.close()
            self._api_client = None

    def _join(self, timeout: float) -> None:
        # Watch.stop() shuts the socket down so a blocked read returns now. It is repeated because
        # a stop() that lands before the watch request is open is undone when stream() begins.
        end = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < end:
            if self._watch is not None:
                self._watch.stop()
            self._thread.join(0.05)
