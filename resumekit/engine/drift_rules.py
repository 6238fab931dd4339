"""The rules behind drift messages: normalising values, version levels, devices and effective batch size.

Pure functions of the saved and current environment/config, used by :func:`resumekit.drift.compare`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from packaging.version import InvalidVersion, Version

#: Config names read as the per-device (micro) batch size, in order of preference.
BATCH_SIZE_KEYS: tuple[str, ...] = (
    "batch_size",
    "per_device_batch_size",
    "per_device_train_batch_size",
    "micro_batch_size",
)
#: Config names read as the number of gradient-accumulation steps, in order of preference.
GRAD_ACCUMULATION_KEYS: tuple[str, ...] = (
    "grad_accumulation",
    "gradient_accumulation_steps",
    "accumulate_grad_batches",
)


class _Missing:
    """Marks a config key that exists on one side only (a single instance, :data:`MISSING`)."""

    def __repr__(self) -> str:
        return "absent"

    def __bool__(self) -> bool:
        return False


#: The ``saved`` or ``current`` value of a :class:`DriftItem` for a config key present on one side only.
MISSING: Any = _Missing()


def _normalise(value: Any) -> Any:
    """Bring a value to the form it has after a JSON round trip (tuples are lists, keys are strings)."""
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # exotic __eq__ (arrays): fall back to the textual form
        return repr(a) == repr(b)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _is_count(value: Any) -> bool:
    # Bounded: the values come from a manifest (untrusted), and a product of three huge ints would not
    # even convert to a string for the message.
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value < 1 << 63


def _pick(flat: Mapping[str, Any], names: tuple[str, ...]) -> Optional[str]:
    """The config key read for one of ``names``: top level first, then the shallowest nested key."""
    candidates = [k for k in flat if k.rsplit(".", 1)[-1] in names]
    if not candidates:
        return None
    return min(candidates, key=lambda k: (k.count("."), names.index(k.rsplit(".", 1)[-1])))


# ------------------------------------------------------------------------------------------- messages


def _tail(key: str) -> str:
    return f"set DriftPolicy({{{key!r}: 'ignore'}})"


def _version_level(saved: Any, current: Any) -> Optional[str]:
    """``"major"``, ``"minor"``, ``"patch"`` or ``"build"``; ``None`` when either is not a version."""
    try:
        a, b = Version(str(saved)), Version(str(current))
    except InvalidVersion:
        return None
    ra, rb = (*a.release, 0, 0, 0)[:3], (*b.release, 0, 0, 0)[:3]
    if ra[0] != rb[0]:
        return "major"
    if ra[1] != rb[1]:
        return "minor"
    if ra[2] != rb[2] or a.release != b.release:
        return "patch"
    return "build"


def _device_summary(env: Mapping[str, Any]) -> str:
    kind = env.get("device_type")
    count = env.get("device_count")
    names = env.get("device_names")
    if kind == "cpu":
        return "cpu"
    if isinstance(names, list) and names:
        if len(set(names)) == 1:
            return f"{len(names)}x {names[0]}"
        return ", ".join(str(n) for n in names)
    return f"{count}x {kind}"


def _device_changed(saved: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    if saved.get("device_type") != current.get("device_type"):
        return True
    if saved.get("device_count") != current.get("device_count"):
        return True
    a, b = saved.get("device_names"), current.get("device_names")
    # Names are None when CUDA was not initialised at collection time: type and count decide then.
    return a is not None and b is not None and a != b


@dataclass(frozen=True)
class _Batch:
    batch_key: Optional[str]
    batch: Any
    accum: Any
    world: Any

    def formula(self) -> Optional[str]:
        if not (_is_count(self.batch) and _is_count(self.accum) and _is_count(self.world)):
            return None
        return f"{self.batch}x{self.accum}x{self.world}={self.batch * self.accum * self.world}"


def _batch(flat: Mapping[str, Any], env: Mapping[str, Any]) -> tuple[_Batch, Optional[str]]:
    batch_key = _pick(flat, BATCH_SIZE_KEYS)
    accum_key = _pick(flat, GRAD_ACCUMULATION_KEYS)
    return (
        _Batch(
            batch_key=batch_key,
            batch=flat[batch_key] if batch_key is not None else None,
            accum=flat[accum_key] if accum_key is not None else 1,
            world=env.get("world_size", 1),
        ),
        accum_key,
    )


def _batch_message(key: str, saved: Any, current: Any, before: _Batch, after: _Batch) -> str:
    a, b = before.formula(), after.formula()
    if a is not None and b is not None:
        same = " (unchanged)" if a.rsplit("=", 1)[1] == b.rsplit("=", 1)[1] else ""
        effect = f"effective global batch {a} -> {b}{same}"
    else:
        effect = (
            "effective global batch unknown (the config needs a positive integer per-device batch size "
            f"under one of {', '.join(BATCH_SIZE_KEYS)})"
        )
    return (
        f"{key} changed: {saved!r} at save, {current!r} now; {effect}. "
        f"Check that the learning rate and schedule still fit, or {_tail(key)}."
    )


_SAME_RUN = "results may differ slightly from an uninterrupted run"
_ENV_ADVICE: dict[str, tuple[str, str]] = {
    "platform": (_SAME_RUN.capitalize(), "resume on the saved platform to reproduce it exactly"),
    "device": (
        f"Tensors load onto the devices your objects live on, and {_SAME_RUN}",
        "resume on the saved hardware to reproduce it exactly",
    ),
    "amp_dtype": (
        "Mixed-precision numerics differ between dtypes, and float16 needs a GradScaler while bfloat16 "
        "does not",
        "train with the saved dtype to reproduce the run exactly",
    ),
}
_VERSION_ADVICE = (_SAME_RUN.capitalize(), "pin the saved version to reproduce it exactly")
_LEVEL_DETAIL = {
    "major": " (major version change)",
    "minor": " (minor version change)",
    "patch": " (patch version change)",
    "build": " (same release, different build)",
}


def _env_message(key: str, saved: Any, current: Any, level: Optional[str]) -> str:
    consequence, fix = _ENV_ADVICE.get(key.removeprefix("env."), _VERSION_ADVICE)
    detail = _LEVEL_DETAIL.get(level or "", "")
    return f"{key} changed: {saved} at save, {current} now{detail}. {consequence}; {fix}, or {_tail(key)}."


def _config_message(key: str, saved: Any, current: Any) -> str:
    if saved is MISSING:
        head = f"{key} added: absent at save, {current!r} now."
    elif current is MISSING:
        head = f"{key} removed: {saved!r} at save, absent now."
    else:
        head = f"{key} changed: {saved!r} at save, {current!r} now."
    return f"{head} Check that this is intended, or {_tail(key)}."


# ----------------------------------------------------------------------------------------------- mesh


def _one_mesh(mesh: Any) -> str:
    """``{"shape": [2, 2], "dim_names": ["dp", "tp"]}`` -> ``"dp=2 x tp=2"``; ``[2]`` -> ``"2"``."""
    if not isinstance(mesh, Mapping):
        return repr(mesh)
    raw_shape, raw_names = mesh.get("shape"), mesh.get("dim_names")
    shape: list[Any] = raw_shape if isinstance(raw_shape, list) else []
    names: list[Any] = raw_names if isinstance(raw_names, list) else []
    if names and len(names) == len(shape):
        return " x ".join(f"{n}={s}" for n, s in zip(names, shape))
    return "x".join(str(s) for s in shape) or "?"


def _mesh_summary(meshes: Any) -> str:
    """Every sharded entry's mesh in a few words: one mesh when all entries share it, else each
    entry's; ``"none (unsharded)"`` when there is no sharded entry."""
    if not isinstance(meshes, Mapping) or not meshes:
        return "none (unsharded)"
    texts = {name: _one_mesh(m) for name, m in meshes.items()}
    if len(set(texts.values())) == 1:
        return f"{next(iter(texts.values()))} ({', '.join(texts)})"
    return "; ".join(f"{name}: {text}" for name, text in texts.items())


def _mesh_changed(saved: Any, current: Any) -> bool:
    """Whether the entries both sides shard use different meshes; with no entry in common (a restore
    into a plain model, or renamed entries), whether the two records differ at all."""
    if not isinstance(saved, Mapping) or not isinstance(current, Mapping):
        return not _same(saved, current)
    common = [k for k in saved if k in current]
    if common:
        return any(not _same(saved[k], current[k]) for k in common)
    return not _same(dict(saved), dict(current))


def _mesh_message(key: str, saved: Any, current: Any) -> str:
    return (
        f"{key} changed: {_mesh_summary(saved)} at save, {_mesh_summary(current)} now. Restore reshards "
        "every sharded entry onto the current layout, so every value loads unchanged; the parallel "
        f"layout (and with it the reduction order) differs, so {_SAME_RUN}. Resume on the saved mesh to "
        f"reproduce it exactly, or {_tail(key)}."
    )
