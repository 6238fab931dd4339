"""The fault proxy itself, against a tiny in-memory key/value HTTP server (no S3 involved)."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

try:
    from .fault_proxy import Fault, FaultProxy
except ImportError:
    from fault_proxy import Fault, FaultProxy  # type: ignore[no-redef]


class _Store:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.requests = 0
        self.lock = threading.Lock()


def _kv_handler(store: _Store) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _reply(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_PUT(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with store.lock:
                store.requests += 1
                store.data[self.path] = body
            self._reply(200, b"stored")

        def do_GET(self) -> None:
            with store.lock:
                store.requests += 1
                body = store.data.get(self.path)
            self._reply(404, b"missing") if body is None else self._reply(200, body)

        do_HEAD = do_GET

    return Handler


@pytest.fixture
def upstream() -> Iterator[tuple[str, _Store]]:
    store = _Store()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _kv_handler(store))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", store
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def proxy(upstream: tuple[str, _Store]) -> Iterator[FaultProxy]:
    with FaultProxy(upstream[0]) as p:
        yield p


def _request(proxy: FaultProxy, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    port = int(proxy.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


PAYLOAD = bytes(range(256)) * 40


def test_forwards_untouched_and_logs(proxy: FaultProxy, upstream: tuple[str, _Store]) -> None:
    assert _request(proxy, "PUT", "/b/k", PAYLOAD) == (200, b"stored")
    assert _request(proxy, "GET", "/b/k") == (200, PAYLOAD)
    assert upstream[1].data["/b/k"] == PAYLOAD
    assert [(r.method, r.target, r.action, r.status) for r in proxy.log] == [
        ("PUT", "/b/k", None, 200),
        ("GET", "/b/k", None, 200),
    ]


def test_status_fault_answers_without_forwarding_then_expires(
    proxy: FaultProxy, upstream: tuple[str, _Store]
) -> None:
    rule = proxy.add(Fault("status", method="PUT", path=r"/k$", count=2, status=500))
    assert _request(proxy, "PUT", "/b/k", b"1")[0] == 500
    assert _request(proxy, "PUT", "/b/k", b"2")[0] == 500
    assert upstream[1].requests == 0
    assert _request(proxy, "PUT", "/b/k", b"3")[0] == 200
    assert rule.hits == 2 and upstream[1].data["/b/k"] == b"3"


def test_rules_filter_by_method_and_path(proxy: FaultProxy) -> None:
    proxy.add(Fault("status", method="PUT", path=r"/only-this$", count=None, status=503))
    assert _request(proxy, "PUT", "/b/other", b"x")[0] == 200
    assert _request(proxy, "GET", "/b/only-this")[0] == 404  # GET is not matched: forwarded
    assert _request(proxy, "PUT", "/b/only-this", b"x")[0] == 503
    assert _request(proxy, "PUT", "/b/only-this", b"x")[0] == 503  # count=None: persistent
    assert proxy.count("PUT", r"only-this") == 2


def test_reset_before_forwarding_never_reaches_server(
    proxy: FaultProxy, upstream: tuple[str, _Store]
) -> None:
    proxy.add(Fault("reset_before", method="PUT"))
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        _request(proxy, "PUT", "/b/k", PAYLOAD)
    assert "/b/k" not in upstream[1].data


def test_reset_after_forwarding_stores_but_client_never_hears(
    proxy: FaultProxy, upstream: tuple[str, _Store]
) -> None:
    proxy.add(Fault("reset_after", method="PUT"))
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        _request(proxy, "PUT", "/b/k", PAYLOAD)
    assert upstream[1].data["/b/k"] == PAYLOAD


def test_truncated_body_is_detected_by_the_client(proxy: FaultProxy) -> None:
    _request(proxy, "PUT", "/b/k", PAYLOAD)
    proxy.add(Fault("truncate", method="GET"))
    with pytest.raises(http.client.IncompleteRead) as info:
        _request(proxy, "GET", "/b/k")
    assert len(info.value.partial) == len(PAYLOAD) // 2


def test_flip_byte_changes_exactly_one_byte(proxy: FaultProxy) -> None:
    _request(proxy, "PUT", "/b/k", PAYLOAD)
    proxy.add(Fault("flip_byte", method="GET"))
    status, body = _request(proxy, "GET", "/b/k")
    assert status == 200 and len(body) == len(PAYLOAD)
    diffs = [i for i, (a, b) in enumerate(zip(body, PAYLOAD)) if a != b]
    assert len(diffs) == 1
    assert _request(proxy, "GET", "/b/k") == (200, PAYLOAD)  # count=1: the next read is clean


def test_delay_then_forward_and_concurrency_is_measured(proxy: FaultProxy) -> None:
    proxy.add(Fault("delay", method="PUT", delay=0.3, count=None))
    start = time.monotonic()
    assert _request(proxy, "PUT", "/b/k", b"x")[0] == 200
    assert time.monotonic() - start >= 0.3
    assert proxy.max_concurrency("PUT") == 1
    threads = [threading.Thread(target=_request, args=(proxy, "PUT", f"/b/{i}", b"x")) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert proxy.max_concurrency("PUT") >= 2  # three requests each held 0.3 s, sent together


def test_only_loopback_upstreams() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("http://10.0.0.1:80")
    with pytest.raises(ValueError, match="unknown fault action"):
        Fault("explode")  # type: ignore[arg-type]
