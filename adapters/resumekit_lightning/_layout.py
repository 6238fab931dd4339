"""Map a Lightning checkpoint dict onto resumekit entries, and back. Pure: no I/O.

A Lightning checkpoint is one nested dict (``state_dict``, ``optimizer_states``, ``lr_schedulers``,
``loops``, ``callbacks``, ``hyper_parameters``, ...). It is stored as up to four entries of one resumekit
step so that the parts a plain training loop also has keep the names a plain loop uses:

* ``model``: ``checkpoint["state_dict"]`` (the LightningModule's ``state_dict()``);
* ``optimizer``: ``checkpoint["optimizer_states"][0]``;
* ``scheduler``: ``checkpoint["lr_schedulers"][0]``;
* ``lightning``: everything else, including further optimizers and schedulers, plus a small
  ``resumekit_layout`` record saying which keys were present and how many optimizers and schedulers
  there were, so that the dict comes back with the same keys and list lengths.

A checkpoint written by a plain :class:`resumekit.Checkpointer` has no ``lightning`` entry; it is read as
a Lightning checkpoint holding weights (and optimizer / scheduler state when present) and no loop
progress, so ``trainer.fit(ckpt_path=...)`` continues a plain run from step 0 with its weights.

Hyper-parameters are user values of any type. The codec stores a closed set of types; values outside it
are converted when the conversion is lossless in meaning (mappings become dicts, ``Namespace`` becomes a
dict, paths become strings) and otherwise rejected (or stored as their ``repr`` when asked to).
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch

from resumekit.errors import CheckpointCorruptError, UnsupportedValueError

__all__ = [
    "HPARAMS_KEYS",
    "LAYOUT_KEY",
    "ENTRY_NAMES",
    "UnsupportedHparams",
    "from_entries",
    "sanitize_hparams",
    "to_entries",
]

UnsupportedHparams = Literal["error", "repr"]

LAYOUT_KEY = "resumekit_layout"
_LAYOUT_FORMAT = 1
#: Entry names a Lightning checkpoint may use, in the order they are restored.
ENTRY_NAMES = ("model", "optimizer", "scheduler", "lightning")
#: Checkpoint keys holding hyper-parameters (LightningModule's and LightningDataModule's).
HPARAMS_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")
_HPARAMS_TYPE_KEYS = ("hparams_type", "datamodule_hparams_type")

_SCALARS = (type(None), bool, int, float, str, bytes)
_ATOMS = (torch.Tensor, np.ndarray, np.generic, torch.dtype, torch.device, torch.Size)


class Holder:
    """Carries one value through :meth:`resumekit.Checkpointer.save` / ``restore`` unchanged.

    A plain dict entry would be restored with ``dict.update``, dropping the ``OrderedDict`` type and the
    ``_metadata`` that ``nn.Module.load_state_dict`` reads; a holder returns the decoded object itself.

    Args:
        value: The value to save (``None`` for a holder that receives a restored value).
    """

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def state_dict(self) -> Any:
        """The held value."""
        return self.value

    def load_state_dict(self, state_dict: Any) -> None:
        """Hold ``state_dict``.

        Args:
            state_dict: The restored value.
        """
        self.value = state_dict


def to_entries(
    checkpoint: Mapping[str, Any], *, unsupported_hparams: UnsupportedHparams = "error"
) -> dict[str, Any]:
    """Split a Lightning checkpoint dict into resumekit entries (values wrapped in :class:`Holder`).

    Args:
        checkpoint: The dict Lightning hands to ``CheckpointIO.save_checkpoint``.
        unsupported_hparams: ``"error"`` raises on a hyper-parameter the codec cannot store; ``"repr"``
            stores its ``repr()`` string instead, with a warning.

    Returns:
        Entry name -> :class:`Holder`, for ``Checkpointer.save``.

    Raises:
        TypeError: ``checkpoint`` is not a mapping with string keys.
        UnsupportedValueError: A hyper-parameter cannot be stored without pickle (``"error"`` policy).
    """
    if not isinstance(checkpoint, Mapping) or not all(isinstance(k, str) for k in checkpoint):
        raise TypeError(
            "ResumeKitCheckpointIO.save_checkpoint: expected Lightning's checkpoint dict with string keys, "
            f"got {type(checkpoint).__name__}"
        )
    rest: dict[str, Any] = {}
    layout: dict[str, Any] = {"format": _LAYOUT_FORMAT, "state_dict": "state_dict" in checkpoint}
    entries: dict[str, Any] = {}
    for key, value in checkpoint.items():
        if key == "state_dict":
            entries["model"] = Holder(value)
        elif key in ("optimizer_states", "lr_schedulers"):
            items = list(value)
            layout[key] = len(items)
            if items:
                entries["optimizer" if key == "optimizer_states" else "scheduler"] = Holder(items[0])
            rest[key] = items[1:]
        elif key in _HPARAMS_TYPE_KEYS:
            # A class object (OmegaConf's container type): not storable. The hyper-parameters themselves
            # are stored as plain containers; record the type's name for the reader.
            layout[key] = f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
        elif key in HPARAMS_KEYS:
            rest[key] = sanitize_hparams(value, key, unsupported_hparams)
        elif key == LAYOUT_KEY:
            raise UnsupportedValueError(
                f"the Lightning checkpoint has a top-level key '{LAYOUT_KEY}', which resumekit reserves; "
                "rename it in your on_save_checkpoint hook"
            )
        else:
            rest[key] = value
    rest[LAYOUT_KEY] = layout
    entries["lightning"] = Holder(rest)
    return entries


def from_entries(values: Mapping[str, Any], *, lightning_version: str) -> dict[str, Any]:
    """Rebuild the Lightning checkpoint dict from restored entry values.

    Args:
        values: Entry name -> restored value, for the entries the checkpoint has.
        lightning_version: Written as ``pytorch-lightning_version`` for a plain-Checkpointer checkpoint, so
            Lightning does not try to migrate it as a legacy file.

    Returns:
        The checkpoint dict Lightning expects from ``CheckpointIO.load_checkpoint``.

    Raises:
        CheckpointCorruptError: The ``lightning`` entry's layout record is malformed, or an entry the
            layout names is missing.
    """
    if "lightning" not in values:
        return _from_plain(values, lightning_version)
    rest = values["lightning"]
    if not isinstance(rest, dict) or not isinstance(rest.get(LAYOUT_KEY), dict):
        raise CheckpointCorruptError(
            f"the 'lightning' entry has no '{LAYOUT_KEY}' record; it was not written by resumekit_lightning"
        )
    checkpoint = dict(rest)
    layout = checkpoint.pop(LAYOUT_KEY)
    if layout.get("state_dict"):
        if "model" not in values:
            raise CheckpointCorruptError("the checkpoint's layout lists a 'model' entry that is missing")
        checkpoint["state_dict"] = values["model"]
    for key, entry in (("optimizer_states", "optimizer"), ("lr_schedulers", "scheduler")):
        count = layout.get(key)
        if count is None:
            checkpoint.pop(key, None)
            continue
        tail = list(checkpoint.get(key, []))
        head = [values[entry]] if count > 0 and entry in values else []
        items = head + tail
        if type(count) is not int or len(items) != count:
            raise CheckpointCorruptError(
                f"the checkpoint's layout says {count!r} {key} but {len(items)} were stored"
            )
        checkpoint[key] = items
    for key in _HPARAMS_TYPE_KEYS:
        if key in layout:
            checkpoint.setdefault("resumekit_" + key, layout[key])
    return checkpoint


def _from_plain(values: Mapping[str, Any], lightning_version: str) -> dict[str, Any]:
    if "model" not in values:
        raise CheckpointCorruptError(
            "the checkpoint has neither a 'lightning' nor a 'model' entry, so it holds no weights Lightning "
            "can load. Save the plain run's state as {'model': module, 'optimizer': optimizer, ...}."
        )
    checkpoint: dict[str, Any] = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning_version,
        "state_dict": values["model"],
        "lr_schedulers": [values["scheduler"]] if "scheduler" in values else [],
    }
    if "optimizer" in values:
        checkpoint["optimizer_states"] = [values["optimizer"]]
    return checkpoint


def sanitize_hparams(value: Any, path: str, policy: UnsupportedHparams = "error") -> Any:
    """Turn hyper-parameters into values resumekit stores without pickle.

    Mappings (``AttributeDict``, OmegaConf containers, ...) become dicts with string keys,
    ``argparse.Namespace`` becomes a dict, ``os.PathLike`` becomes its string, tuples and lists keep their
    type. Tensors, arrays and plain scalars pass unchanged.

    Args:
        value: The hyper-parameters (or one value inside them).
        path: Where ``value`` sits, for messages (``"hyper_parameters.encoder"``).
        policy: ``"error"`` raises on anything else; ``"repr"`` stores its ``repr()`` with a warning.

    Returns:
        The converted value.

    Raises:
        UnsupportedValueError: ``value`` (or a part of it) cannot be stored and ``policy`` is ``"error"``.
    """
    if type(value) in _SCALARS or isinstance(value, _ATOMS):
        return value
    if _is_omegaconf(value):
        from omegaconf import OmegaConf  # only reached when omegaconf made the value

        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {str(k): sanitize_hparams(v, f"{path}.{k}", policy) for k, v in value.items()}
    if type(value) in (list, tuple) or (isinstance(value, (list, tuple)) and not hasattr(value, "_fields")):
        seq = [sanitize_hparams(v, f"{path}.{i}", policy) for i, v in enumerate(value)]
        return tuple(seq) if isinstance(value, tuple) else seq
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if policy == "repr":
        warnings.warn(
            f"resumekit_lightning: hyper-parameter '{path}' of type {type(value).__qualname__} is stored as "
            "its repr() string; it will load as a str.",
            RuntimeWarning,
            stacklevel=3,
        )
        return repr(value)
    key = path.split(".", 1)[1] if "." in path else path
    top = key.split(".")[0]
    raise UnsupportedValueError(
        f"hyper-parameter '{path}' has type {type(value).__module__}.{type(value).__qualname__}, which "
        "resumekit cannot store without pickle. Fix: leave it out with "
        f"self.save_hyperparameters(ignore=[{top!r}]) (typical for modules and callables passed to "
        "__init__), convert it to a str/number/list/dict, or pass "
        "ResumeKitCheckpointIO(unsupported_hparams='repr') to store its repr() string."
    )


def _is_omegaconf(value: Any) -> bool:
    return type(value).__module__.startswith("omegaconf")
