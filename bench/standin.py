"""The loopback JSON-over-HTTP server under the inference-server stand-ins (tgi_standin.py, tei_standin.py).

A subclass answers POSTs with `post(path, request) -> (status, body)`; GET
/health answers 200. The server runs in a background thread between
`__enter__` and `__exit__`, one request at a time through `lock`.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


class StandInServer:
    """A JSON server on a free loopback port; `url` is its base URL."""

    def __init__(self):
        self.lock = threading.Lock()  # one request at a time; the subclass's counters change under it
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def post(self, path: str, request) -> tuple[int, object]:
        """(HTTP status, JSON body) of a POST; called under `lock`."""
        raise NotImplementedError


def send_json(handler: BaseHTTPRequestHandler, code: int, body) -> None:
    """Answer `handler`'s request with status `code` and `body` as a JSON document of known length."""
    data = json.dumps(body).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _handler(stand_in: StandInServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            send_json(self, 200, {}) if self.path == "/health" else send_json(self, 404, {"error": "not found"})

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with stand_in.lock:
                send_json(self, *stand_in.post(self.path, request))

    return Handler
