"""The environment fingerprint: complete, JSON-ready, and free of side effects."""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest
import torch
from packaging.version import Version

from resumekit.engine.environment import (
    ENV_KEYS,
    collect_environment,
    format_cudnn_version,
    resumekit_version,
)


def test_keys_and_values_match_this_process() -> None:
    env = collect_environment()
    assert tuple(env) == ENV_KEYS
    assert env["python"] == platform.python_version()
    assert env["torch"] == torch.__version__
    assert env["cuda"] == torch.version.cuda
    assert env["numpy"] == np.__version__
    assert env["platform"] == f"{platform.system()}-{platform.machine()}"
    assert env["world_size"] == 1  # no process group in this process
    assert env["amp_dtype"] is None
    Version(env["resumekit"])  # a valid version even from an uninstalled source tree


def test_is_json_serialisable_round_trip() -> None:
    env = collect_environment(world_size=8, amp_dtype=torch.bfloat16)
    assert json.loads(json.dumps(env)) == env


@pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(), reason="checks the CPU-only fingerprint"
)
def test_cpu_only_devices() -> None:
    env = collect_environment()
    assert (env["device_type"], env["device_count"], env["device_names"]) == ("cpu", 1, ["cpu"])


def test_does_not_initialise_cuda() -> None:
    was_initialised = torch.cuda.is_initialized()
    env = collect_environment()
    assert torch.cuda.is_initialized() == was_initialised
    if torch.cuda.is_available() and not was_initialised:
        assert env["device_names"] is None and env["device_count"] == torch.cuda.device_count()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_names_once_initialised() -> None:
    torch.cuda.init()
    env = collect_environment()
    assert env["device_type"] == "cuda"
    assert env["device_names"] == [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    assert env["cudnn"] is None or Version(env["cudnn"]).major >= 7


@pytest.mark.parametrize(
    ("amp_dtype", "expected"),
    [
        (torch.bfloat16, "bfloat16"),
        (torch.float16, "float16"),
        ("torch.float16", "float16"),
        ("bfloat16", "bfloat16"),
        (None, None),
    ],
)
def test_amp_dtype_is_recorded_by_name(amp_dtype: object, expected: str | None) -> None:
    assert collect_environment(amp_dtype=amp_dtype)["amp_dtype"] == expected  # type: ignore[arg-type]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="amp_dtype must be"):
        collect_environment(amp_dtype=16)  # type: ignore[arg-type]
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ValueError, match="world_size must be a positive int"):
            collect_environment(world_size=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "expected"), [(8907, "8.9.7"), (8100, "8.1.0"), (90100, "9.1.0"), (90501, "9.5.1")]
)
def test_cudnn_version_decoding(raw: int, expected: str) -> None:
    assert format_cudnn_version(raw) == expected


def test_resumekit_version_matches_the_package() -> None:
    import resumekit

    assert resumekit_version() == resumekit.__version__
    assert collect_environment()["resumekit"] == resumekit.__version__
