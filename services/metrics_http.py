"""A bounded HTTP server for /metrics: a fixed pool of worker threads, a deadline per connection, a cap.

prometheus_client.start_http_server starts a thread per connection and waits
on a silent client forever, so 300 idle connections cost 300 threads. Here
one thread accepts connections and watches them until they send something;
only then does one of `workers` threads read the request (all of it within
`timeout` seconds), answer it with prometheus_client's WSGI app and close
the connection (HTTP/1.0: one request each). A connection silent for
`timeout` seconds is closed. At most `max_connections` are held: a new one
beyond that closes the longest-silent one, or itself when none is silent, so
that a scraper sending its request at once always gets in.
"""

import contextlib
import io
import logging
import queue
import selectors
import socket
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler

log = logging.getLogger(__name__)

TICK_SECONDS = 0.1  # how often the accepting thread looks for silent connections and for close()


class _DeadlineReader(io.RawIOBase):
    """A socket's input that raises TimeoutError once `deadline` (time.monotonic) has passed."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class _Handler(WSGIRequestHandler):
    """One request: read within the server's timeout, answered by its WSGI app; no access log."""

    def setup(self) -> None:
        super().setup()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, time.monotonic() + self.server.timeout))

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        self.connection.settimeout(self.server.timeout)  # the whole reply gets `timeout` seconds (sendall)
        return parsed

    def log_message(self, format, *args) -> None:  # BaseHTTPRequestHandler's signature
        pass


class BoundedHTTPServer:
    """Serves a WSGI app on (host, port) from `workers` threads; port 0 picks a free one (see `port`)."""

    def __init__(self, app, host: str, port: int, workers: int = 4, timeout: float = 5.0,
                 max_connections: int = 64):
        self.app, self.timeout, self.max_connections = app, timeout, max_connections
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self._listener = socket.create_server((host, port), family=family, backlog=socket.SOMAXCONN)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self.base_environ = {"SERVER_NAME": host or "localhost", "GATEWAY_INTERFACE": "CGI/1.1",
                             "SERVER_PORT": str(self.port), "REMOTE_HOST": "", "CONTENT_LENGTH": "",
                             "SCRIPT_NAME": ""}  # what wsgiref's WSGIServer gives every request
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._silent: dict[socket.socket, tuple] = {}  # oldest first: connection -> (address, accepted at)
        self._ready: queue.SimpleQueue = queue.SimpleQueue()  # (connection, address) with a request arriving
        self._closing = threading.Event()
        self._threads = [threading.Thread(target=self._accept_loop, name="metrics-accept", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"metrics-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def get_app(self):
        """The WSGI app (wsgiref's handler asks the server for it)."""
        return self.app

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            for key, _ in self._selector.select(TICK_SECONDS):
                if key.fileobj is self._listener:
                    while self._accept():  # every connection waiting, so that the listen queue never fills
                        pass
                else:
                    self._hand_over(key.fileobj)
            self._close_silent(time.monotonic() - self.timeout)

    def _accept(self) -> bool:
        """Take one waiting connection, within the cap; False when none was waiting."""
        try:
            conn, address = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionAbortedError:
            return True
        if len(self._silent) + self._ready.qsize() >= self.max_connections:
            if not self._silent:
                conn.close()
                return True
            self._drop(next(iter(self._silent)))
        self._silent[conn] = (address, time.monotonic())
        self._selector.register(conn, selectors.EVENT_READ)
        return True

    def _hand_over(self, conn: socket.socket) -> None:
        """Give a connection whose request has begun to arrive to the workers."""
        address, _ = self._silent.pop(conn)
        self._selector.unregister(conn)
        self._ready.put((conn, address))

    def _drop(self, conn: socket.socket) -> None:
        self._silent.pop(conn)
        self._selector.unregister(conn)
        conn.close()

    def _close_silent(self, accepted_before: float) -> None:
        for conn in [c for c, (_, accepted) in self._silent.items() if accepted < accepted_before]:
            self._drop(conn)

    def _work(self) -> None:
        while (item := self._ready.get()) is not None:
            conn, address = item
            try:
                _Handler(conn, address, self)
            except OSError:  # timed out, or the client went away
                pass
            except Exception:  # one bad request must not end the worker
                log.exception("metrics request from %s failed", address[0])
            finally:
                conn.close()

    def close(self) -> None:
        """Stop accepting, let the workers finish the requests they hold, close everything and free the port."""
        self._closing.set()
        self._threads[0].join()
        with contextlib.suppress(queue.Empty):
            while True:  # connections no worker has begun: closed, not answered
                self._ready.get_nowait()[0].close()
        for _ in self._threads[1:]:
            self._ready.put(None)
        for thread in self._threads[1:]:
            thread.join(self.timeout + 1)
        for conn in list(self._silent):
            self._drop(conn)
        self._selector.close()
        self._listener.close()
