"""A small fault-injecting HTTP/1.1 proxy for object-store tests (standard library only).

The proxy sits between a client (s3fs, gcsfs) and a real server on loopback and forwards every
request unchanged (including the ``Host`` header, so signed requests and ``Location`` headers keep
pointing at the proxy). Rules pick requests by method and a regex on the path (query string
included) and apply one fault to the first ``count`` matching requests:

=================  ===========================================================================
``status``         answer ``status`` (default 503) without forwarding; the server sees nothing
``reset_before``   reset the client connection (TCP RST) without forwarding
``reset_after``    forward, let the server act on it, then reset: the client never hears back
``delay``          sleep ``delay`` seconds, then forward normally
``truncate``       forward; send the full ``Content-Length`` but only half the body, then close
``flip_byte``      forward; flip one bit pattern (xor 0xFF) of the middle byte of a 2xx body
=================  ===========================================================================

Only loopback addresses are accepted, for both the listening side and the upstream.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal, Optional
from urllib.parse import urlsplit

__all__ = ["Fault", "FaultProxy", "RequestRecord"]

Action = Literal["status", "reset_before", "reset_after", "delay", "truncate", "flip_byte"]
_ACTIONS = ("status", "reset_before", "reset_after", "delay", "truncate", "flip_byte")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Hop-by-hop headers are about one connection, never forwarded (RFC 9110 section 7.6.1).
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",  # the proxy answers 100-continue itself and forwards the whole body at once
}


@dataclass
class Fault:
    """One fault rule: apply ``action`` to the first ``count`` requests that match.

    Attributes:
        action: What to do to a matching request (see the module docstring).
        method: HTTP method to match (``"PUT"``, ``"GET"``...); ``None`` matches every method.
        path: Regular expression searched (``re.search``) in the request target, query included,
            e.g. ``r"/manifest\\.json$"`` or ``r"uploadId="``.
        count: How many matching requests get the fault; ``None`` means every one (persistent).
        status: The status code answered by the ``status`` action.
        body: The body answered by the ``status`` action; ``None`` gives an S3-style XML error.
        delay: Seconds slept by the ``delay`` action before forwarding.
        hits: How many requests this rule has been applied to so far (updated by the proxy).
    """

    action: Action
    method: Optional[str] = None
    path: str = ""
    count: Optional[int] = 1
    status: int = 503
    body: Optional[bytes] = None
    delay: float = 0.0
    hits: int = 0

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}; expected one of {_ACTIONS}")
        if self.count is not None and self.count < 0:
            raise ValueError(f"Fault.count must be >= 0 or None, got {self.count}")
        self._regex = re.compile(self.path)

    def matches(self, method: str, target: str) -> bool:
        """Return True if this rule still applies to a request with ``method`` and ``target``."""
        if self.count is not None and self.hits >= self.count:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self._regex.search(target) is not None


@dataclass(frozen=True)
class RequestRecord:
    """One request seen by the proxy.

    Attributes:
        method: The HTTP method.
        target: The request target (path and query string).
        action: The fault applied, or ``None`` if the request was forwarded untouched.
        status: The status sent to the client (``None`` when the connection was reset).
        started: ``time.monotonic()`` when the request had been read.
        finished: ``time.monotonic()`` when the answer (or reset) was sent.
    """

    method: str
    target: str
    action: Optional[str]
    status: Optional[int]
    started: float = 0.0
    finished: float = 0.0


def _error_body(status: int) -> bytes:
    code = {500: "InternalError", 503: "SlowDown", 429: "SlowDown", 412: "PreconditionFailed"}.get(
        status, "InjectedFault"
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>injected by the test fault proxy</Message></Error>"
    ).encode()


def _check_loopback(host: str, what: str) -> None:
    if host not in _LOOPBACK:
        raise ValueError(f"fault proxy {what} must be a loopback address, got {host!r}")


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 that forwards to ``upstream`` and injects faults.

    Use as a context manager, or call :meth:`start` and :meth:`stop` (always, even on failure).

    Args:
        upstream: Base URL of the real server, e.g. ``"http://127.0.0.1:5000"`` (loopback only).
        upstream_timeout: Seconds to wait for the upstream server on each request.
    """

    def __init__(self, upstream: str, *, upstream_timeout: float = 30.0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must look like http://127.0.0.1:PORT, got {upstream!r}")
        _check_loopback(parts.hostname, "upstream")
        self.upstream_host: str = parts.hostname
        self.upstream_port: int = parts.port
        self.upstream_timeout = upstream_timeout
        self._lock = threading.Lock()
        self._rules: list[Fault] = []
        self._log: list[RequestRecord] = []
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread. Returns ``self``."""
        if self._server is not None:
            raise RuntimeError("FaultProxy already started")
        server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The proxy's base URL, e.g. ``http://127.0.0.1:41234``."""
        if self._server is None:
            raise RuntimeError("FaultProxy is not running; call start() first")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- rules and log ---------------------------------------------------------------------------
    def add(self, fault: Fault) -> Fault:
        """Install ``fault`` (rules are checked in the order they were added). Returns it."""
        with self._lock:
            self._rules.append(fault)
        return fault

    def clear(self) -> None:
        """Remove every rule and forget the request log."""
        with self._lock:
            self._rules.clear()
            self._log.clear()

    @property
    def log(self) -> list[RequestRecord]:
        """A copy of the requests seen so far, oldest first."""
        with self._lock:
            return list(self._log)

    def count(self, method: Optional[str] = None, path: str = "") -> int:
        """Number of logged requests matching ``method`` (None: any) and regex ``path``."""
        regex = re.compile(path)
        return sum(
            1 for r in self.log if (method is None or r.method == method.upper()) and regex.search(r.target)
        )

    def _pick(self, method: str, target: str) -> Optional[Fault]:
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, target):
                    rule.hits += 1
                    return rule
        return None

    def max_concurrency(self, method: Optional[str] = None, path: str = "") -> int:
        """Most matching requests the proxy was handling at the same moment."""
        regex = re.compile(path)
        events = []
        for r in self.log:
            if (method is None or r.method == method.upper()) and regex.search(r.target):
                events += [(r.started, 1), (r.finished, -1)]
        level = peak = 0
        for _, delta in sorted(events):
            level += delta
            peak = max(peak, level)
        return peak

    def _record(
        self, method: str, target: str, action: Optional[str], status: Optional[int], started: float
    ) -> None:
        with self._lock:
            self._log.append(RequestRecord(method, target, action, status, started, time.monotonic()))


def _make_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_ProxyHandler):
        owner = proxy

    return Handler


class _ProxyHandler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, like real S3; every response has a length

    def log_message(self, format: str, *args: object) -> None:
        """Silence the per-request stderr log (the proxy keeps its own structured log)."""

    def do_GET(self) -> None:
        """Handle GET."""
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_GET

    # -- helpers ---------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            # Re-framed with a Content-Length when forwarded; trailers are dropped.
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length", "0") or 0)
        return self.rfile.read(length) if length else b""

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        owner = self.owner
        conn = http.client.HTTPConnection(
            owner.upstream_host, owner.upstream_port, timeout=owner.upstream_timeout
        )
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("PUT", "POST", "PATCH"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            return resp.status, resp.reason, out_headers, data
        finally:
            conn.close()

    def _send(
        self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes, *, send_len: int
    ) -> None:
        self.send_response_only(status, reason)
        upstream_len = "0"
        for k, v in headers:
            if k.lower() == "content-length":
                upstream_len = v
            elif k.lower() not in ("date", "server"):
                self.send_header(k, v)
        # A HEAD answer announces the length of the body a GET would have had.
        self.send_header("Content-Length", upstream_len if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body[:send_len])
        self.wfile.flush()

    def _handle(self) -> None:
        owner = self.owner
        method, target = self.command, self.path
        body = self._read_body()
        started = time.monotonic()
        fault = owner._pick(method, target)
        action = fault.action if fault is not None else None

        if fault is not None and fault.action == "reset_before":
            owner._record(method, target, action, None, started)
            self._reset()
            return
        if fault is not None and fault.action == "status":
            err = fault.body if fault.body is not None else _error_body(fault.status)
            owner._record(method, target, action, fault.status, started)
            self._send(
                fault.status, "Injected", [("Content-Type", "application/xml")], err, send_len=len(err)
            )
            return
        if fault is not None and fault.action == "delay":
            time.sleep(fault.delay)

        status, reason, headers, data = self._forward(body)

        if fault is not None and fault.action == "reset_after":
            owner._record(method, target, action, None, started)
            self._reset()
            return
        if fault is not None and fault.action == "flip_byte" and 200 <= status < 300 and data:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        send_len = len(data)
        if fault is not None and fault.action == "truncate":
            send_len = len(data) // 2
        owner._record(method, target, action, status, started)
        self._send(status, reason, headers, data, send_len=send_len)
        if send_len < len(data):
            self.close_connection = True
