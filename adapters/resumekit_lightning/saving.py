"""``LightningModule.load_from_checkpoint`` for resumekit checkpoint folders.

Lightning's ``load_from_checkpoint`` reads the file itself with ``torch.load`` (``pl_load``); it does not
go through the Trainer's CheckpointIO, and no hook lets a plugin replace that read, so it cannot open a
checkpoint folder. :func:`load_from_checkpoint` reads the folder with
:class:`~resumekit_lightning.ResumeKitCheckpointIO` and then builds the object exactly as Lightning does:
it applies Lightning's version migrations and hands the dict to Lightning's own instantiation (the
hyper-parameter merge, ``configure_model``, ``on_load_checkpoint`` and ``load_state_dict``, strict or not),
so only the read differs.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.saving import _load_state
from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint

from .checkpoint_io import load_checkpoint

__all__ = ["load_from_checkpoint"]

T = TypeVar("T", "pl.LightningModule", "pl.LightningDataModule")


def load_from_checkpoint(
    cls: type[T],
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device | None = None,
    strict: bool | None = None,
    storage_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> T:
    """``cls.load_from_checkpoint(path, ...)`` for a checkpoint folder written by resumekit.

    Example::

        model = load_from_checkpoint(LitModel, "checkpoints/last.ckpt", width=32)

    Args:
        cls: The LightningModule (or LightningDataModule) subclass to build.
        path: A checkpoint folder (local path or fsspec URL); a plain :class:`resumekit.Checkpointer` root
            loads too (its ``model`` entry becomes the weights).
        map_location: Device for the weights (they are read on the CPU); ``None`` keeps the CPU.
        strict: As Lightning's: whether the checkpoint's keys must match the module's exactly
            (``None``: the module's ``strict_loading``, default True).
        storage_options: fsspec options for remote paths.
        **kwargs: Override the hyper-parameters saved in the checkpoint, as in Lightning.

    Returns:
        The built object, weights loaded, on ``map_location`` (or the CPU).

    Raises:
        TypeError: ``cls`` is not a LightningModule or LightningDataModule subclass, or ``map_location``
            is a mapping or callable (give a device).
        CheckpointNotFoundError: ``path`` holds no committed checkpoint.
        UnsafeCheckpointError: ``path`` is a file (a ``torch.save`` pickle): use Lightning's own method.
    """
    if not (isinstance(cls, type) and issubclass(cls, (pl.LightningModule, pl.LightningDataModule))):
        raise TypeError(
            f"load_from_checkpoint: cls must be a LightningModule or LightningDataModule subclass, got {cls!r}"
        )
    if map_location is not None and not isinstance(map_location, (str, torch.device)):
        raise TypeError(
            "load_from_checkpoint: map_location must be a device (str or torch.device) or None, got "
            f"{type(map_location).__name__}; remapping storages by mapping or callable is a torch.load feature"
        )
    checkpoint = _pl_migrate_checkpoint(load_checkpoint(path, storage_options=storage_options))
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {})
    checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY].update(kwargs)
    if issubclass(cls, pl.LightningDataModule):
        return _load_state(cls, checkpoint, **kwargs)  # type: ignore[return-value]
    # The weights are read on the CPU and copied into the new module's parameters; then it moves once.
    model = _load_state(cls, checkpoint, strict=strict, **kwargs)
    if not isinstance(model, pl.LightningModule):  # _load_state builds an instance of cls
        raise TypeError(f"load_from_checkpoint: {cls.__name__} did not build a LightningModule")
    return model.to(torch.device(map_location) if map_location is not None else "cpu")
