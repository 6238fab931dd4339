"""The environment fingerprint recorded with every checkpoint and compared on restore.

The fingerprint is plain JSON data (strings, ints, lists, ``None``) so it can live in ``manifest.json``
and be compared by :mod:`resumekit.drift` without any I/O.

Invariant: collecting the fingerprint never initialises CUDA. A process that has not touched CUDA yet
may still fork DataLoader workers or choose its device later; reading device names requires a CUDA
context, so names are recorded only when the process already has one (``device_names`` is ``None``
otherwise, and drift comparison then falls back to the device type and count).
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any, Union

import numpy as np
import torch

__all__ = ["ENV_KEYS", "VERSION_KEYS", "collect_environment", "format_cudnn_version", "resumekit_version"]

#: Every key :func:`collect_environment` returns, in a stable order.
ENV_KEYS: tuple[str, ...] = (
    "python",
    "torch",
    "cuda",
    "cudnn",
    "numpy",
    "resumekit",
    "platform",
    "device_type",
    "device_count",
    "device_names",
    "world_size",
    "amp_dtype",
)

#: Keys whose values are version strings (compared with ``packaging.version``).
VERSION_KEYS: tuple[str, ...] = ("python", "torch", "cuda", "cudnn", "numpy", "resumekit")


def resumekit_version() -> str:
    """Return the installed resumekit version.

    Returns:
        The distribution version from the installed metadata; when resumekit runs from a source tree
        that was never installed, ``resumekit.__version__`` if defined, else ``"0+unknown"`` (a valid
        PEP 440 version, so comparisons still work).
    """
    try:
        return metadata.version("resumekit")
    except metadata.PackageNotFoundError:
        import resumekit  # imported lazily: this module is imported by the package itself

        version = getattr(resumekit, "__version__", None)
        return str(version) if version else "0+unknown"


def format_cudnn_version(raw: int) -> str:
    """Turn cuDNN's integer version into ``"major.minor.patch"``.

    cuDNN changed its encoding at 9.0: 8.9.7 is ``8907`` (major x 1000) while 9.1.0 is ``90100``
    (major x 10000).

    Args:
        raw: The value of ``torch.backends.cudnn.version()``.

    Returns:
        The dotted version string, e.g. ``"9.1.0"``.
    """
    if raw >= 90000:
        major, rest = divmod(raw, 10000)
    else:
        major, rest = divmod(raw, 1000)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


def _cudnn_version() -> str | None:
    if not torch.backends.cudnn.is_available():
        return None
    raw = torch.backends.cudnn.version()
    return format_cudnn_version(int(raw)) if raw is not None else None


def _devices() -> tuple[str, int, list[str] | None]:
    # device_count() and is_available() do not create a CUDA context; get_device_name() does, so it is
    # only called when the context already exists.
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names = [torch.cuda.get_device_name(i) for i in range(count)] if torch.cuda.is_initialized() else None
        return "cuda", count, names
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps", 1, ["mps"]
    return "cpu", 1, ["cpu"]


def _world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def _dtype_name(amp_dtype: Union[str, torch.dtype, None]) -> str | None:
    if amp_dtype is None:
        return None
    if isinstance(amp_dtype, torch.dtype):
        return str(amp_dtype).removeprefix("torch.")
    if isinstance(amp_dtype, str):
        return amp_dtype.removeprefix("torch.")
    raise TypeError(
        f"amp_dtype must be a string such as 'bfloat16', a torch.dtype or None, got "
        f"{type(amp_dtype).__name__} ({amp_dtype!r}); pass e.g. amp_dtype=torch.bfloat16."
    )


def collect_environment(
    *, world_size: int | None = None, amp_dtype: Union[str, torch.dtype, None] = None
) -> dict[str, Any]:
    """Fingerprint the software and hardware this process runs on.

    Only versions and device facts are read; nothing is written and CUDA is not initialised.

    Args:
        world_size: Number of processes in the job. ``None`` reads it from ``torch.distributed`` when
            a process group is initialised, else 1.
        amp_dtype: The autocast dtype the run trains with (``"bfloat16"``, ``torch.float16``, ...),
            or ``None`` for full precision. Recorded as a name without the ``torch.`` prefix.

    Returns:
        A JSON-serialisable dict with exactly the keys in :data:`ENV_KEYS`: ``python``, ``torch``,
        ``cuda`` (``torch.version.cuda``, ``None`` on CPU builds), ``cudnn`` (``None`` without cuDNN),
        ``numpy``, ``resumekit``, ``platform`` (``"<system>-<machine>"``, e.g. ``"Linux-x86_64"``),
        ``device_type`` (``"cuda"``, ``"mps"`` or ``"cpu"``), ``device_count``, ``device_names``
        (CUDA device names, ``["cpu"]`` on CPU, ``None`` when CUDA exists but is not initialised yet),
        ``world_size`` and ``amp_dtype``.

    Raises:
        TypeError: ``amp_dtype`` is neither a string, a ``torch.dtype`` nor ``None``.
        ValueError: ``world_size`` is not a positive integer.
    """
    if world_size is not None and (
        isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1
    ):
        raise ValueError(f"world_size must be a positive int or None, got {world_size!r}.")
    device_type, device_count, device_names = _devices()
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "cudnn": _cudnn_version(),
        "numpy": str(np.__version__),
        "resumekit": resumekit_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "device_type": device_type,
        "device_count": device_count,
        "device_names": device_names,
        "world_size": world_size if world_size is not None else _world_size(),
        "amp_dtype": _dtype_name(amp_dtype),
    }
