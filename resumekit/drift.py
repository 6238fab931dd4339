"""What changed between the run that saved a checkpoint and the run restoring it.

A checkpoint records the environment (:func:`resumekit.engine.environment.collect_environment`) and the user's
``config=`` mapping. On restore, :func:`compare` turns the differences into a :class:`DriftReport` of
:class:`DriftItem` s, each with a severity chosen by a :class:`DriftPolicy`. Everything here is pure:
no I/O, no global state, so the same comparison backs ``Checkpointer.restore`` and ``resumekit drift``.

Drift keys:

* ``format``: the checkpoint's on-storage format version against the one this resumekit writes.
* ``env.python``, ``env.torch``, ``env.cuda``, ``env.cudnn``, ``env.numpy``, ``env.resumekit``:
  versions, compared with ``packaging.version``.
* ``env.platform``, ``env.device`` (device type, count and names together), ``env.world_size``,
  ``env.mesh`` (the device mesh of each sharded entry; recorded only by sharded checkpoints),
  ``env.amp_dtype``.
* ``config.<name>``: one key per leaf of the user's config; nested mappings are joined with dots
  (``{"optim": {"lr": 1e-3}}`` is ``config.optim.lr``).
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from resumekit.engine.drift_rules import (
    BATCH_SIZE_KEYS,
    GRAD_ACCUMULATION_KEYS,
    MISSING,
    _batch,
    _batch_message,
    _config_message,
    _device_changed,
    _device_summary,
    _env_message,
    _flatten,
    _mesh_changed,
    _mesh_message,
    _normalise,
    _same,
    _version_level,
)
from resumekit.engine.environment import VERSION_KEYS
from resumekit.errors import DriftError

__all__ = [
    "BATCH_SIZE_KEYS",
    "GRAD_ACCUMULATION_KEYS",
    "MISSING",
    "POLICY_ENV_KEYS",
    "DriftItem",
    "DriftPolicy",
    "DriftReport",
    "DriftWarning",
    "Severity",
    "compare",
]

Severity = Literal["error", "warn", "ignore"]
_SEVERITIES: tuple[str, ...] = ("error", "warn", "ignore")

#: The environment keys a policy may name (as ``env.<key>``), in report order.
#: The versions first, then what they run on: ``device`` stands for the recorded device type, count
#: and names together; ``mesh`` is recorded only for sharded state.
POLICY_ENV_KEYS: tuple[str, ...] = (*VERSION_KEYS, "platform", "device", "world_size", "mesh", "amp_dtype")
_FORMAT_KEY = "format"

# Severities that differ from the policy's ``default``. They apply unless the user overrides the key.
_BUILTIN_SEVERITIES: dict[str, Severity] = {_FORMAT_KEY: "error"}


class DriftWarning(UserWarning):
    """Category of the warnings :meth:`DriftReport.emit` issues, so they can be filtered as a group."""


def _is_pattern(key: str) -> bool:
    return any(ch in key for ch in "*?[")


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key:
        raise TypeError(f"DriftPolicy keys must be non-empty strings, got {key!r}.")
    if _is_pattern(key) or key == _FORMAT_KEY:
        return
    head, _, rest = key.partition(".")
    if head == "config" and rest:
        return
    if head == "env" and rest in POLICY_ENV_KEYS:
        return
    known = ", ".join(f"env.{k}" for k in POLICY_ENV_KEYS)
    if head == "config":
        hint = "a config key needs a name after 'config.', e.g. 'config.lr'"
    elif head == "env" and rest.startswith("device"):
        hint = "did you mean 'env.device'? It covers device type, count and names together"
    elif head == "env":
        hint = f"environment keys are {known}"
    elif key in POLICY_ENV_KEYS:
        hint = f"did you mean 'env.{key}'?"
    else:
        hint = f"did you mean 'config.{key}'? Config keys are prefixed with 'config.'"
    raise ValueError(
        f"DriftPolicy got unknown drift key {key!r}: {hint}. Valid keys are 'format', {known}, "
        "'config.<name>' (nested config joined with dots), or a glob pattern such as 'config.*'."
    )


def _check_severity(what: str, severity: object) -> Severity:
    if severity not in _SEVERITIES:
        raise ValueError(
            f"DriftPolicy: severity for {what} must be one of 'error', 'warn', 'ignore', got {severity!r}."
        )
    return severity  # type: ignore[return-value]


@dataclass(frozen=True, init=False)
class DriftPolicy:
    """How serious each kind of drift is: ``"error"``, ``"warn"`` or ``"ignore"``.

    The severity of a change to ``key`` is, first match wins:

    1. ``overrides[key]``; then the longest glob pattern in ``overrides`` that matches ``key``
       (``"config.*"``, ``"env.*"``). An override applies to every change of its key.
    2. ``patch`` for a patch-level or build-only version change (``2.13.0`` -> ``2.13.1``,
       ``2.13.0+cpu`` -> ``2.13.0+cu121``) and for a checkpoint in an older format that this
       resumekit still reads.
    3. The built-in default: ``"error"`` for ``format`` (a checkpoint written in a newer format).
    4. ``default`` for everything else: minor and major version changes, platform, device, world size,
       device mesh, AMP dtype, batch size, gradient accumulation and every other config key.

    Example:
        ``DriftPolicy({"env.torch": "error", "config.lr": "ignore"}, default="warn")``

    Args:
        overrides: Severity per drift key or glob pattern. Keys are ``"format"``, ``"env.<name>"``
            (see :data:`POLICY_ENV_KEYS`) or ``"config.<name>"``.
        default: Severity of a change no override or built-in default covers.
        patch: Severity of patch-level version changes and older checkpoint formats.

    Raises:
        ValueError: A key is not a drift key (the message suggests the right spelling) or a severity
            is not one of ``"error"``, ``"warn"``, ``"ignore"``.
    """

    overrides: Mapping[str, Severity] = field(default_factory=dict)
    default: Severity = "warn"
    patch: Severity = "ignore"

    def __init__(
        self,
        overrides: Optional[Mapping[str, Severity]] = None,
        *,
        default: Severity = "warn",
        patch: Severity = "ignore",
    ) -> None:
        checked: dict[str, Severity] = {}
        for key, severity in (overrides or {}).items():
            _check_key(key)
            checked[key] = _check_severity(repr(key), severity)
        object.__setattr__(self, "overrides", checked)
        object.__setattr__(self, "default", _check_severity("default", default))
        object.__setattr__(self, "patch", _check_severity("patch", patch))

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.overrides.items())), self.default, self.patch))

    def severity(self, key: str, *, patch_level: bool = False) -> Severity:
        """Return the severity of a change to ``key``.

        Args:
            key: A drift key such as ``"env.torch"`` or ``"config.batch_size"``.
            patch_level: The change is a patch-level version change or an older, still readable format.

        Returns:
            ``"error"``, ``"warn"`` or ``"ignore"``, by the rules in the class docstring.
        """
        if key in self.overrides:
            return self.overrides[key]
        patterns = sorted((p for p in self.overrides if _is_pattern(p)), key=len, reverse=True)
        for pattern in patterns:
            if fnmatch.fnmatchcase(key, pattern):
                return self.overrides[pattern]
        if patch_level:
            return self.patch
        return _BUILTIN_SEVERITIES.get(key, self.default)


@dataclass(frozen=True)
class DriftItem:
    """One difference between the saved and the current run.

    Attributes:
        key: The drift key, e.g. ``"env.torch"`` or ``"config.batch_size"``.
        saved: The value recorded in the checkpoint (:data:`MISSING` for a config key added since).
        current: The value now (:data:`MISSING` for a config key removed since).
        severity: ``"error"``, ``"warn"`` or ``"ignore"``, from the policy.
        message: A sentence naming both values, the consequence and the fix.
    """

    key: str
    saved: Any
    current: Any
    severity: Severity
    message: str

    def to_dict(self) -> dict[str, Any]:
        """Return the item as JSON-ready data; :data:`MISSING` becomes ``None``."""
        return {
            "key": self.key,
            "saved": None if self.saved is MISSING else self.saved,
            "current": None if self.current is MISSING else self.current,
            "severity": self.severity,
            "message": self.message,
        }


@dataclass(frozen=True)
class DriftReport:
    """Every difference :func:`compare` found, in a stable order.

    ``bool(report)`` is true when something drifted that the policy does not ignore.

    Attributes:
        items: All differences, ignored ones included (``format``, then ``env.*`` in
            :data:`POLICY_ENV_KEYS` order, then ``config.*`` in the saved config's order).
    """

    items: tuple[DriftItem, ...] = ()

    @property
    def errors(self) -> tuple[DriftItem, ...]:
        """Items whose severity is ``"error"``."""
        return tuple(i for i in self.items if i.severity == "error")

    @property
    def warnings(self) -> tuple[DriftItem, ...]:
        """Items whose severity is ``"warn"``."""
        return tuple(i for i in self.items if i.severity == "warn")

    @property
    def ignored(self) -> tuple[DriftItem, ...]:
        """Items the policy ignores (still listed, e.g. for ``resumekit drift``)."""
        return tuple(i for i in self.items if i.severity == "ignore")

    def __bool__(self) -> bool:
        return any(i.severity != "ignore" for i in self.items)

    def raise_for_errors(self) -> None:
        """Raise if any item is an error; do nothing otherwise.

        Raises:
            DriftError: Listing every error-level item, one message a line.
        """
        errors = self.errors
        if not errors:
            return
        lines = "\n".join(f"  - {i.message}" for i in errors)
        noun = "change" if len(errors) == 1 else "changes"
        raise DriftError(
            f"The checkpoint was saved in a different environment or config: {len(errors)} {noun} the "
            f"drift policy treats as errors:\n{lines}\n"
            "Restore in the saved environment, or relax these keys in the DriftPolicy."
        )

    def emit(self, logger: Optional[logging.Logger] = None, *, stacklevel: int = 1) -> None:
        """Report the items: warnings through :mod:`warnings` and logging, the rest through logging.

        Errors are logged at ERROR, warnings are issued as :class:`DriftWarning` and logged at WARNING,
        ignored items are logged at INFO (patch-level changes stay visible to whoever wants them).

        Args:
            logger: Where to log; ``logging.getLogger("resumekit.drift")`` by default.
            stacklevel: Which frame the warnings point at: 1 is the code calling ``emit``, 2 its caller
                (what a wrapper such as ``Checkpointer.restore`` passes so users see their own line).
        """
        log = logger if logger is not None else logging.getLogger("resumekit.drift")
        for item in self.items:
            if item.severity == "error":
                log.error(item.message)
            elif item.severity == "warn":
                warnings.warn(item.message, DriftWarning, stacklevel=stacklevel + 1)
                log.warning(item.message)
            else:
                log.info(item.message)

    def to_dict(self) -> dict[str, Any]:
        """Return ``{"items": [...], "errors": n, "warnings": n}`` as JSON-ready data."""
        return {
            "items": [i.to_dict() for i in self.items],
            "errors": len(self.errors),
            "warnings": len(self.warnings),
        }


# ---------------------------------------------------------------------------------------------- values


def _format_item(saved: int, current: int, policy: DriftPolicy) -> Optional[DriftItem]:
    if saved == current:
        return None
    if saved > current:
        message = (
            f"format changed: {saved} at save, {current} now; this checkpoint was written by a newer "
            f"resumekit and needs one that reads format {saved} (this one reads up to {current}). "
            "Upgrade resumekit: pip install -U resumekit."
        )
        return DriftItem(_FORMAT_KEY, saved, current, policy.severity(_FORMAT_KEY), message)
    message = (
        f"format changed: {saved} at save, {current} now; this resumekit reads the older format, "
        "nothing to do."
    )
    return DriftItem(_FORMAT_KEY, saved, current, policy.severity(_FORMAT_KEY, patch_level=True), message)


# -------------------------------------------------------------------------------------------- compare


def compare(
    saved_env: Optional[Mapping[str, Any]],
    saved_config: Optional[Mapping[str, Any]],
    current_env: Optional[Mapping[str, Any]],
    current_config: Optional[Mapping[str, Any]],
    policy: Optional[DriftPolicy] = None,
    *,
    saved_format: Optional[int] = None,
    current_format: Optional[int] = None,
) -> DriftReport:
    """Compare a checkpoint's environment and config with the current ones.

    Pure: reads only its arguments. An environment key missing on either side (a checkpoint from an
    older resumekit) is not compared; a config that is ``None`` on either side (not recorded) is not
    compared, while ``{}`` is a recorded, empty config. Configs are compared in their JSON form, so a
    tuple equals the list it becomes in ``manifest.json``.

    When ``env.world_size`` or the config's per-device batch size or gradient accumulation (see
    :data:`BATCH_SIZE_KEYS`, :data:`GRAD_ACCUMULATION_KEYS`) changes, the message gives the effective
    global batch (per-device batch x accumulation x world size) before and after. A missing
    accumulation key counts as 1.

    Args:
        saved_env: The environment recorded at save (``manifest["environment"]``).
        saved_config: The config recorded at save.
        current_env: This process's environment (:func:`resumekit.engine.environment.collect_environment`).
        current_config: The config passed to the current ``Checkpointer``.
        policy: Severities; ``DriftPolicy()`` by default.
        saved_format: The checkpoint's ``format_version``; compared only when both formats are given.
        current_format: The newest format this resumekit reads.

    Returns:
        The report; empty (and false) when nothing changed.
    """
    policy = policy if policy is not None else DriftPolicy()
    s_env: Mapping[str, Any] = _normalise(saved_env or {})
    c_env: Mapping[str, Any] = _normalise(current_env or {})
    compare_config = saved_config is not None and current_config is not None
    s_flat = _flatten(_normalise(saved_config)) if compare_config and saved_config is not None else {}
    c_flat = _flatten(_normalise(current_config)) if compare_config and current_config is not None else {}
    s_batch, s_accum_key = _batch(s_flat, s_env)
    c_batch, c_accum_key = _batch(c_flat, c_env)
    batch_keys = {k for k in (s_batch.batch_key, c_batch.batch_key, s_accum_key, c_accum_key) if k}

    items: list[DriftItem] = []
    if saved_format is not None and current_format is not None:
        item = _format_item(saved_format, current_format, policy)
        if item is not None:
            items.append(item)

    for name in POLICY_ENV_KEYS:
        key = f"env.{name}"
        if name == "device":
            if "device_type" in s_env and "device_type" in c_env and _device_changed(s_env, c_env):
                saved, current = _device_summary(s_env), _device_summary(c_env)
                message = _env_message(key, saved, current, None)
                items.append(DriftItem(key, saved, current, policy.severity(key), message))
            continue
        if name not in s_env or name not in c_env or _same(s_env[name], c_env[name]):
            continue
        saved, current = s_env[name], c_env[name]
        if name == "mesh":
            if _mesh_changed(saved, current):
                message = _mesh_message(key, saved, current)
                items.append(DriftItem(key, saved, current, policy.severity(key), message))
            continue
        if name == "world_size":
            message = _batch_message(key, saved, current, s_batch, c_batch)
            items.append(DriftItem(key, saved, current, policy.severity(key), message))
            continue
        level = _version_level(saved, current) if name in VERSION_KEYS else None
        message = _env_message(key, saved, current, level)
        severity = policy.severity(key, patch_level=level in ("patch", "build"))
        items.append(DriftItem(key, saved, current, severity, message))

    for name in [*s_flat, *(k for k in c_flat if k not in s_flat)]:
        saved = s_flat.get(name, MISSING)
        current = c_flat.get(name, MISSING)
        if saved is not MISSING and current is not MISSING and _same(saved, current):
            continue
        key = f"config.{name}"
        if name in batch_keys:
            message = _batch_message(key, saved, current, s_batch, c_batch)
        else:
            message = _config_message(key, saved, current)
        items.append(DriftItem(key, saved, current, policy.severity(key), message))
    return DriftReport(tuple(items))
