"""`serve.metrics_bind`: the Prometheus text exposition over HTTP at `/metrics`, for a scraper.

A plain `http.server` in one daemon thread, requests handled one at a time (a scraper asks every few
seconds; one at a time bounds threads and memory), each connection limited to a few seconds. It renders
`ServeMetrics.prometheus()` from copies of the serving loop's numbers, so it never waits for the loop.
Binds loopback unless told otherwise, like the ZeroMQ socket; the page has no authentication.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer

__all__ = ["CONTENT_TYPE", "MetricsEndpoint", "parse_bind"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CONNECTION_TIMEOUT_S = 5.0


def parse_bind(bind: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:9400` for IPv6; port 0 picks a free one) -> (host, port), or ValueError."""
    host, sep, port = bind.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"serve.metrics_bind = {bind!r}: expected HOST:PORT, e.g. 127.0.0.1:9400")
    return host, int(port)


def is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


class _Handler(BaseHTTPRequestHandler):
    server_version = "moerun"
    timeout = CONNECTION_TIMEOUT_S  # a client that sends nothing is dropped

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._reply(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._reply(head=True)

    def _reply(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, ctype, code = self.server.render().encode(), CONTENT_TYPE, 200
        else:
            body, ctype, code = b"moerun: metrics are at /metrics\n", "text/plain; charset=utf-8", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: a scrape every few seconds
        pass


class _Server(HTTPServer):
    def __init__(self, host: str, port: int, render: Callable[[], str]) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.render = render
        super().__init__((host, port), _Handler)


class MetricsEndpoint:
    """`MetricsEndpoint("127.0.0.1:9400", render).start()`; `url` is the page's address; `close()`."""

    def __init__(self, bind: str, render: Callable[[], str]) -> None:
        host, port = parse_bind(bind)
        try:
            self._server = _Server(host, port, render)
        except OSError as exc:
            raise OSError(f"serve.metrics_bind = {bind!r}: cannot listen there: {exc.strerror or exc}") from None
        self.host, self.port = host, self._server.server_address[1]
        self._thread: threading.Thread | None = None
        if not is_loopback(host):
            print(f"moerun serve: WARNING: metrics on {bind} are not on loopback; the page has no "
                  "authentication", file=sys.stderr, flush=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> MetricsEndpoint:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="moerun-metrics-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
