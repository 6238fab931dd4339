"""Endpoints and credentials configured the way users already configure them.

No ``storage_options`` at all: ``AWS_ENDPOINT_URL`` and the ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` variables, or a named profile (``AWS_PROFILE`` or ``storage_options``'s
``profile``), are picked up by botocore under s3fs; ``STORAGE_EMULATOR_HOST`` by gcsfs. And
``storage_options=`` reaches fsspec unchanged, above resumekit's own defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import resumekit as rk
from resumekit.errors import StorageError

try:
    from ._backends import assert_restored, snapshot, step_dir
    from .fault_proxy import Fault, FaultProxy
    from .servers import GCSEndpoint, S3Endpoint, unique_prefix
except ImportError:
    from _backends import assert_restored, snapshot, step_dir  # type: ignore[no-redef]
    from fault_proxy import Fault, FaultProxy  # type: ignore[no-redef]
    from servers import GCSEndpoint, S3Endpoint, unique_prefix  # type: ignore[no-redef]

_AWS_VARS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


@pytest.fixture
def clean_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AWS variable set and empty config/credential files (never the machine's real ones)."""
    for name in _AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "aws-config"
    credentials = tmp_path / "aws-credentials"
    config.write_text("")
    credentials.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(32, generator=g)}}


def _round_trip(ckpt: rk.Checkpointer, seed: int) -> None:
    state = _state(seed)
    ckpt.save(state, step=seed)
    target = _state(0)
    result = ckpt.restore(target)
    assert result is not None and result.step == seed
    assert_restored(snapshot(state), target)


@pytest.mark.s3
def test_environment_variables_alone_configure_s3(
    clean_aws_env: Path, monkeypatch: pytest.MonkeyPatch, s3_server: S3Endpoint
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    prefix = unique_prefix("env")
    _round_trip(rk.Checkpointer(s3_server.url(prefix)), 3)
    # It really went to the loopback server (seen through explicit options, not the environment).
    assert s3_server.filesystem().exists(f"{s3_server.bucket}/{prefix}/{step_dir(3)}/manifest.json")


@pytest.mark.s3
@pytest.mark.parametrize("how", ["AWS_PROFILE", "storage_options"])
def test_a_named_profile_configures_s3(
    how: str, clean_aws_env: Path, monkeypatch: pytest.MonkeyPatch, s3_server: S3Endpoint
) -> None:
    (clean_aws_env / "aws-config").write_text(
        f"[profile rk-test]\nregion = us-east-1\nendpoint_url = {s3_server.endpoint_url}\n"
    )
    (clean_aws_env / "aws-credentials").write_text(
        "[rk-test]\naws_access_key_id = testing\naws_secret_access_key = testing\n"
    )
    prefix = unique_prefix("profile")
    if how == "AWS_PROFILE":
        monkeypatch.setenv("AWS_PROFILE", "rk-test")
        ckpt = rk.Checkpointer(s3_server.url(prefix))
    else:
        ckpt = rk.Checkpointer(s3_server.url(prefix), storage_options={"profile": "rk-test"})
    _round_trip(ckpt, 4)
    assert s3_server.filesystem().exists(f"{s3_server.bucket}/{prefix}/{step_dir(4)}/manifest.json")


@pytest.mark.s3
def test_storage_options_pass_through_and_win_over_resumekit_defaults(
    clean_aws_env: Path, s3_server: S3Endpoint, fault_proxy: FaultProxy
) -> None:
    options = {
        **s3_server.storage_options,
        "endpoint_url": fault_proxy.url,
        # resumekit's default is 5 attempts; the user's setting must be the one botocore uses.
        "config_kwargs": {
            **s3_server.storage_options["config_kwargs"],
            "retries": {"mode": "standard", "total_max_attempts": 2},
        },
    }
    ckpt = rk.Checkpointer(s3_server.url(unique_prefix("opts")), storage_options=options)
    fault = fault_proxy.add(Fault("status", method="PUT", path=r"manifest\.json$", status=503, count=None))
    with pytest.raises(StorageError):
        ckpt.save(_state(1), step=1)
    assert fault.hits == 2
    fault_proxy.clear()
    _round_trip(ckpt, 1)


@pytest.mark.gcs
def test_storage_emulator_host_configures_gcs(
    monkeypatch: pytest.MonkeyPatch, gcs_server: GCSEndpoint
) -> None:
    # gcsfs reads STORAGE_EMULATOR_HOST when it builds a request URL; the token must say "anon".
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.endpoint_url)
    prefix = unique_prefix("gcs-env")
    _round_trip(rk.Checkpointer(gcs_server.url(prefix), storage_options={"token": "anon"}), 5)
    assert gcs_server.filesystem().exists(f"{gcs_server.bucket}/{prefix}/{step_dir(5)}/manifest.json")
