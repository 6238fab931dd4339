"""Fixtures for object-store tests: moto S3, the GCS emulator and the fault proxy, all on loopback.

Servers are session-scoped (started on first use, stopped when the session ends, also after
failures); tests share one bucket and isolate themselves with a unique prefix (``s3_root``,
``gcs_root``). The fault proxy is per test, so rules never leak from one test to the next.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

try:  # tests/storage as a package (an __init__.py exists) or as a rootdir-inserted folder
    from .fault_proxy import FaultProxy
    from .servers import (
        GCSEndpoint,
        S3Endpoint,
        fast_retry_s3_options,
        gcs_emulator,
        moto_s3_server,
        unique_prefix,
    )
except ImportError:
    from fault_proxy import FaultProxy  # type: ignore[no-redef]
    from servers import (  # type: ignore[no-redef]
        GCSEndpoint,
        S3Endpoint,
        fast_retry_s3_options,
        gcs_emulator,
        moto_s3_server,
        unique_prefix,
    )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    """moto's S3 server on 127.0.0.1 with one bucket; ``.storage_options`` feed s3fs/fsspec."""
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GCSEndpoint]:
    """gcp-storage-emulator on 127.0.0.1 with one bucket; ``.storage_options`` feed gcsfs/fsspec."""
    with gcs_emulator() as endpoint:
        yield endpoint


@pytest.fixture
def s3_fs(s3_server: S3Endpoint) -> Any:
    """A fresh s3fs filesystem on the moto server."""
    return s3_server.filesystem()


@pytest.fixture
def s3_root(s3_server: S3Endpoint, request: pytest.FixtureRequest) -> str:
    """A bucket-relative prefix (``bucket/<test>-<random>``) no other test uses."""
    return f"{s3_server.bucket}/{unique_prefix(request.node.name[:40])}"


@pytest.fixture
def gcs_fs(gcs_server: GCSEndpoint) -> Any:
    """A fresh gcsfs filesystem on the emulator."""
    return gcs_server.filesystem()


@pytest.fixture
def gcs_root(gcs_server: GCSEndpoint, request: pytest.FixtureRequest) -> str:
    """A bucket-relative prefix (``bucket/<test>-<random>``) no other test uses."""
    return f"{gcs_server.bucket}/{unique_prefix(request.node.name[:40])}"


@pytest.fixture
def fault_proxy(s3_server: S3Endpoint) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the S3 server, stopped after the test."""
    with FaultProxy(s3_server.endpoint_url) as proxy:
        yield proxy


@pytest.fixture
def proxied_s3(s3_server: S3Endpoint, fault_proxy: FaultProxy) -> S3Endpoint:
    """The S3 server seen through ``fault_proxy``, with one fast retry layer (see servers.py)."""
    return S3Endpoint(fault_proxy.url, s3_server.bucket, fast_retry_s3_options(fault_proxy.url))
