"""Canonical parameter names, independent of DDP, DataParallel and ``torch.compile`` wrappers.

Wrappers change a model's ``state_dict`` keys: ``DistributedDataParallel`` and ``DataParallel`` put
their inner model under ``module.``, ``torch.compile`` puts it under ``_orig_mod.``, in any nesting
(``_orig_mod.module.`` for a compiled DDP model) and at any depth (``encoder._orig_mod.`` when only a
submodule is compiled). Checkpoints store *canonical* keys, the names the unwrapped model uses, so state
saved under one wrapper loads into any other.

Invariant: with a model at hand, only segments that a wrapper object in that model actually inserted
are removed, so a user's own submodule named ``module`` keeps its name. Without a model (a foreign
state dict), ``_orig_mod`` segments are removed wherever they appear (torch reserves the name) and
``module.`` only while *every* key starts with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

from torch import nn

from resumekit.errors import StateMismatchError

__all__ = [
    "ModuleKeys",
    "canonical_key_map",
    "canonical_state_dict",
    "load_canonical",
    "to_model_keys",
    "unwrap_model",
]

_V = TypeVar("_V")
_COMPILED_CHILD = "_orig_mod"  # the attribute torch.compile's OptimizedModule keeps the model under
_PARALLEL_CHILD = "module"


def _wrapped_child(module: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """The (attribute, inner module) a wrapper holds, or ``None`` when ``module`` is not a wrapper."""
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return _PARALLEL_CHILD, module.module
    # Detected structurally so that torch._dynamo is never imported just to check a type.
    inner = module._modules.get(_COMPILED_CHILD)
    if inner is not None and any(c.__name__ == "OptimizedModule" for c in type(module).__mro__):
        return _COMPILED_CHILD, inner
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the model inside any stack of DDP, DataParallel and ``torch.compile`` wrappers.

    Args:
        model: A plain or wrapped module.

    Returns:
        The innermost module (``model`` itself when it is not wrapped). Wrappers nested deeper inside
        the model (a compiled submodule) are left in place; :func:`canonical_state_dict` handles those.
    """
    found = _wrapped_child(model)
    while found is not None:
        model = found[1]
        found = _wrapped_child(model)
    return model


def _wrapper_paths(model: nn.Module) -> frozenset[str]:
    """Dotted key paths of the segments wrappers insert, e.g. ``{"module", "encoder._orig_mod"}``."""
    paths = set()
    for name, module in model.named_modules(remove_duplicate=False):
        found = _wrapped_child(module)
        if found is not None:
            paths.add(f"{name}.{found[0]}" if name else found[0])
    return frozenset(paths)


def _canonical_key(key: str, wrapper_paths: frozenset[str]) -> str:
    if not wrapper_paths:
        return key
    kept: list[str] = []
    path = ""
    for segment in key.split("."):
        path = f"{path}.{segment}" if path else segment
        if path not in wrapper_paths:
            kept.append(segment)
    return ".".join(kept)


def _heuristic_keys(keys: Iterable[str]) -> list[str]:
    stripped = [".".join(s for s in key.split(".") if s != _COMPILED_CHILD) for key in keys]
    prefix = _PARALLEL_CHILD + "."
    while stripped and all(k.startswith(prefix) and len(k) > len(prefix) for k in stripped):
        stripped = [k[len(prefix) :] for k in stripped]
    return stripped


def _rekey(state: Mapping[str, _V], new_keys: list[str], what: str) -> dict[str, _V]:
    out: dict[str, _V] = {}
    for (old, value), new in zip(state.items(), new_keys):
        if new in out:
            raise StateMismatchError(
                f"Two {what} keys map to the same canonical name {new!r} (one is {old!r}). The model holds "
                "both a wrapped and an unwrapped copy of the same submodule; give one of them another name."
            )
        out[new] = value
    return out


@dataclass(frozen=True)
class ModuleKeys:
    """A module's own ``state_dict`` (``keep_vars=True``) and the canonical name of each key, built
    once and shared by every check and load of one save or restore.

    Attributes:
        own: the module's own state, by its own keys (live tensors, not copies).
        canonical: ``{own_key: canonical_key}`` in ``state_dict`` order.
        wrapper_paths: the key paths wrappers insert (see :func:`canonical_state_dict`).
    """

    own: Mapping[str, Any]
    canonical: Mapping[str, str]
    wrapper_paths: frozenset[str]

    @classmethod
    def of(cls, model: nn.Module) -> ModuleKeys:
        """The keys of ``model`` as it is now (plain or wrapped, wrappers at any depth)."""
        paths = _wrapper_paths(model)
        own = model.state_dict(keep_vars=True)
        return cls(own, {key: _canonical_key(key, paths) for key in own}, paths)


def canonical_key_map(model: nn.Module) -> dict[str, str]:
    """Map each of the model's own ``state_dict`` keys to its canonical name.

    Args:
        model: A plain or wrapped module (wrappers may sit at any depth).

    Returns:
        ``{own_key: canonical_key}`` in ``state_dict`` order.
    """
    return dict(ModuleKeys.of(model).canonical)


def canonical_state_dict(state: Mapping[str, _V], model: Optional[nn.Module] = None) -> dict[str, _V]:
    """Return ``state`` with wrapper prefixes removed from its keys (values are not copied).

    Args:
        state: A module ``state_dict``.
        model: The module ``state`` came from. With it, exactly the segments its wrappers insert are
            removed; without it, ``_orig_mod`` segments anywhere and ``module.`` prefixes shared by every
            key (which would also strip a lone top-level submodule genuinely named ``module``).

    Returns:
        A new dict with canonical keys, in the original order.

    Raises:
        StateMismatchError: Two keys collapse onto one canonical name.
    """
    if model is None:
        return _rekey(state, _heuristic_keys(state), "state_dict")
    paths = _wrapper_paths(model)
    return _rekey(state, [_canonical_key(k, paths) for k in state], "state_dict")


def to_model_keys(
    state: Mapping[str, _V], model: nn.Module, keys: Optional[ModuleKeys] = None
) -> dict[str, _V]:
    """Rename canonical keys to the names ``model`` itself uses, so ``model.load_state_dict`` accepts them.

    A state dict from elsewhere that still carries wrapper prefixes (a plain ``torch.save`` of a DDP
    model) is canonicalised first when that matches more of the model's keys. Keys that match nothing
    are passed through unchanged, so ``load_state_dict`` reports them as unexpected.

    Args:
        state: Saved module state, normally with canonical keys.
        model: The target module, plain or wrapped.
        keys: ``model``'s keys when the caller built them already.

    Returns:
        A new dict keyed by the model's own names, in the original order.
    """
    keys = keys if keys is not None else ModuleKeys.of(model)
    own = {canonical: key for key, canonical in keys.canonical.items()}
    names = list(state)
    direct = sum(k in own for k in names)
    if direct < len(names):
        stripped = _heuristic_keys(names)
        if sum(k in own for k in stripped) > direct:
            state = _rekey(state, stripped, "state_dict")
    return _rekey(state, [own.get(k, k) for k in state], "state_dict")


def load_canonical(
    model: nn.Module, state: Mapping[str, Any], *, strict: bool = True, keys: Optional[ModuleKeys] = None
) -> Any:
    """Load a canonical state dict into a plain or wrapped model.

    Args:
        model: The target module.
        state: Module state with canonical (or wrapper-prefixed) keys.
        strict: Passed to ``load_state_dict``.
        keys: ``model``'s keys when the caller built them already.

    Returns:
        What ``model.load_state_dict`` returns (missing and unexpected keys, in the model's names).
    """
    return model.load_state_dict(to_model_keys(state, model, keys), strict=strict)
