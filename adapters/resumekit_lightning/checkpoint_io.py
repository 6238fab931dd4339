"""A Lightning ``CheckpointIO`` that writes resumekit checkpoints: atomic, checksummed, pickle-free, fsspec.

Every checkpoint path Lightning names (``epoch=3-step=400.ckpt``, ``last.ckpt``) becomes a resumekit
checkpoint *root*: a folder holding one committed step. Saving to a path again (``last.ckpt`` is saved
over and over) commits a new step in that folder and only then deletes the previous one, so the path
always holds a complete checkpoint, even if the process is killed mid-write. ``ModelCheckpoint``,
``save_top_k``, ``ckpt_path="last"`` / ``"best"`` and ``remove_checkpoint`` keep working because Lightning
only ever handles these paths as opaque names that exist, have a modification time, and can be removed.

Lightning calls ``save_checkpoint`` / ``remove_checkpoint`` on global rank 0 only and
``load_checkpoint`` on every rank. Each call therefore runs on the calling process alone: the
:class:`~resumekit.Checkpointer` gets a one-process group, so it never waits for the other ranks.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import lightning
import torch.distributed as dist
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

import resumekit
from resumekit import Checkpointer, DriftPolicy, RestoreResult
from resumekit.errors import CheckpointNotFoundError, StepExistsError, UnsafeCheckpointError
from resumekit.storage.local import publish_folder

from ._layout import ENTRY_NAMES, Holder, UnsupportedHparams, from_entries, to_entries

__all__ = ["ResumeKitCheckpointIO", "load_checkpoint"]


class ResumeKitCheckpointIO(CheckpointIO):
    """Lightning checkpoints in resumekit's format. Pass it as ``Trainer(plugins=[ResumeKitCheckpointIO()])``.

    The :class:`~resumekit_lightning.ResumeKit` callback installs one by itself; use this class directly
    only to change Lightning's checkpoint format without the callback's RNG and drift additions.

    Args:
        config: The run's configuration (JSON-serialisable). Saved in every checkpoint and compared on
            load: a change is reported or refused according to ``drift_policy``.
        drift_policy: Severity per drift key; defaults to :class:`resumekit.DriftPolicy`'s.
        storage_options: fsspec options (credentials, endpoint, ...) for remote checkpoint paths.
        unsupported_hparams: What to do with a hyper-parameter resumekit cannot store without pickle:
            ``"error"`` (default) raises naming it; ``"repr"`` stores its ``repr()`` string.

    Attributes:
        last_restore: The :class:`resumekit.RestoreResult` of the most recent load (step, drift report).
    """

    def __init__(
        self,
        *,
        config: Mapping[str, Any] | None = None,
        drift_policy: DriftPolicy | None = None,
        storage_options: dict[str, Any] | None = None,
        unsupported_hparams: UnsupportedHparams = "error",
    ) -> None:
        if unsupported_hparams not in ("error", "repr"):
            raise ValueError(f"unsupported_hparams must be 'error' or 'repr', got {unsupported_hparams!r}")
        self.config: dict[str, Any] | None = dict(config) if config is not None else None
        self.drift_policy = drift_policy
        self.storage_options = dict(storage_options) if storage_options else None
        self.unsupported_hparams: UnsupportedHparams = unsupported_hparams
        self.last_restore: RestoreResult | None = None
        self._solo: dict[tuple[int, int], Any] = {}

    # ------------------------------------------------------------------------------------------ CheckpointIO

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Commit ``checkpoint`` as a new step of the checkpoint folder ``path``; then drop older steps.

        Args:
            checkpoint: Lightning's checkpoint dict.
            path: The checkpoint path Lightning chose; it becomes (or already is) a folder.
            storage_options: fsspec options for this call (merged over the constructor's).

        Raises:
            StepExistsError: ``path`` is a regular file (a checkpoint written by another CheckpointIO).
            UnsupportedValueError: A value (often a hyper-parameter) cannot be stored without pickle.
            TypeError: ``storage_options`` is not a dict.
        """
        url = _url(path)
        self._refuse_file(url, storage_options, "save to")
        entries = to_entries(checkpoint, unsupported_hparams=self.unsupported_hparams)
        fs, local = url_to_fs(url, **self._options(storage_options))
        if isinstance(fs, LocalFileSystem) and not fs.exists(local):
            self._save_new_local(entries, checkpoint, local, storage_options)
            return
        ckpt = self._checkpointer(url, storage_options, keep_last=1)
        latest = ckpt.latest_step()
        global_step = checkpoint.get("global_step", 0)
        step = global_step if type(global_step) is int and global_step >= 0 else 0
        # A path saved again at the same global step (or after a rollback) still needs a newer step, so
        # "newest step" keeps meaning "most recent save".
        if latest is not None and step <= latest:
            step = latest + 1
        ckpt.save(entries, step=step)
        if isinstance(fs, LocalFileSystem):
            _remove_partials(local)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read the newest step of ``path`` that verifies and return it as Lightning's checkpoint dict.

        A folder written by a plain :class:`resumekit.Checkpointer` loads too: its ``model``,
        ``optimizer`` and ``scheduler`` entries become ``state_dict``, ``optimizer_states`` and
        ``lr_schedulers``; loop progress starts at zero.

        Args:
            path: A checkpoint folder.
            map_location: Ignored; tensors load on the CPU and Lightning moves them to the module's device.
            weights_only: Ignored; nothing is unpickled, whatever its value.

        Returns:
            The checkpoint dict.

        Raises:
            CheckpointNotFoundError: ``path`` holds no committed checkpoint.
            UnsafeCheckpointError: ``path`` is a file (a pickle written by ``torch.save``), not a folder.
            CheckpointCorruptError: No step of ``path`` verifies.
            DriftError: The drift policy rates a config or environment change as an error.
        """
        url = _url(path)
        self._refuse_file(url, None, "load")
        ckpt = self._checkpointer(url, None)
        holders = {name: Holder() for name in ENTRY_NAMES}
        result = ckpt.restore(holders, strict=False)
        if result is None:
            # Starts with Lightning's own wording (TorchCheckpointIO), which user code matches on.
            raise CheckpointNotFoundError(
                f"Checkpoint file not found: {url} (no committed resumekit checkpoint there: the folder is "
                "missing or empty, or every save to it was interrupted before its commit). Check the path, "
                "or start without ckpt_path."
            )
        self.last_restore = result
        values = {name: h.value for name, h in holders.items() if name not in result.not_restored}
        return from_entries(values, lightning_version=lightning.__version__)

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint folder ``path`` so that no partial checkpoint is ever visible under it.

        Locally the folder is first renamed to a hidden sibling, then deleted. On object stores every
        step's manifest (its commit marker) is deleted before the data.

        Args:
            path: A checkpoint folder (a file left by another CheckpointIO is removed as well).
        """
        fs, p = url_to_fs(_url(path), **(self.storage_options or {}))
        if isinstance(fs, LocalFileSystem) and os.path.islink(p):
            # A ``save_last="link"`` link (dangling or not): remove the link alone, never the checkpoint it
            # points to, which Lightning tracks and removes under its own name.
            os.unlink(p)
            return
        fs.invalidate_cache(p)  # listings cached by an earlier call must not hide or invent files
        if not fs.exists(p):
            return
        if not fs.isdir(p):
            fs.rm(p)
            return
        if isinstance(fs, LocalFileSystem):
            doomed = os.path.join(
                os.path.dirname(p), f".{os.path.basename(p)}.deleting-{uuid.uuid4().hex[:8]}"
            )
            os.rename(p, doomed)
            _remove_path(doomed)
            return
        for manifest in fs.glob(f"{p.rstrip('/')}/*/manifest.json"):
            fs.rm(manifest)
        fs.rm(p, recursive=True)

    # ------------------------------------------------------------------------------------------ helpers

    def _save_new_local(
        self, entries: dict[str, Any], checkpoint: Mapping[str, Any], path: str, storage_options: Any
    ) -> None:
        """First save to a local path: build the folder under a hidden name, then rename it into place.

        Invariant: a checkpoint path that exists holds a committed checkpoint. Without this, a kill during
        the first save to ``last.ckpt`` would leave a folder with no committed step, which
        ``ckpt_path="last"`` would then pick and fail to load on every restart.
        """
        parent, name = os.path.split(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        staging = os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex[:12]}")
        global_step = checkpoint.get("global_step", 0)
        step = global_step if type(global_step) is int and global_step >= 0 else 0
        try:
            # Both steps are the core's: the step's commit inside the hidden root, then the root's rename.
            self._checkpointer(staging, storage_options).save(entries, step=step)
            publish_folder(staging, path)  # refuses a path that appeared meanwhile: never merge two folders
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _remove_partials(path)

    def _options(self, storage_options: Any) -> dict[str, Any]:
        options = dict(self.storage_options or {})
        if storage_options is not None:
            if not isinstance(storage_options, dict):
                raise TypeError(
                    "Trainer.save_checkpoint(storage_options=...) must be a dict of fsspec options for "
                    f"ResumeKitCheckpointIO, got {type(storage_options).__name__}"
                )
            options.update(storage_options)
        return options

    def _checkpointer(self, url: str, storage_options: Any, keep_last: int | None = None) -> Checkpointer:
        options = self._options(storage_options)
        return Checkpointer(
            url,
            keep_last=keep_last,
            config=self.config,
            drift_policy=self.drift_policy,
            storage_options=options or None,
            process_group=self._solo_group(),
        )

    def _solo_group(self) -> Any:
        """A process group holding only this process (None when torch.distributed is not in use).

        Created with local synchronisation, so this rank alone creates it, at any time.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        key = (id(dist.group.WORLD), dist.get_rank())
        group = self._solo.get(key)
        if group is None:
            group = dist.new_group([dist.get_rank()], backend="gloo", use_local_synchronization=True)
            self._solo[key] = group
        return group

    def _refuse_file(self, url: str, storage_options: Any, action: str) -> None:
        options = dict(self.storage_options or {})
        if isinstance(storage_options, dict):
            options.update(storage_options)
        fs, p = url_to_fs(url, **options)
        if fs.isfile(p):
            cls = StepExistsError if action == "save to" else UnsafeCheckpointError
            raise cls(
                f"cannot {action} '{url}': it is a file, not a resumekit checkpoint folder (probably a torch.save "
                "pickle written by Lightning's default TorchCheckpointIO). resumekit never reads pickles. "
                "Use a fresh checkpoint directory, or move the file away; if you trust it, load it yourself "
                "with torch.load(path, weights_only=True) and save the weights through the plugin."
            )

    def __repr__(self) -> str:
        return f"ResumeKitCheckpointIO(config={self.config!r}, resumekit={resumekit.__version__})"


def load_checkpoint(
    path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Read a checkpoint written by :class:`ResumeKitCheckpointIO` as Lightning's checkpoint dict.

    Use it where Lightning code calls ``torch.load`` itself, which cannot read a checkpoint folder: for
    ``LitModel.load_from_checkpoint(path)`` write ``ckpt = load_checkpoint(path)``, then
    ``model = LitModel(**ckpt["hyper_parameters"])`` and ``model.load_state_dict(ckpt["state_dict"])``.

    Args:
        path: A checkpoint folder (local path or fsspec URL).
        storage_options: fsspec options for remote paths.

    Returns:
        The checkpoint dict (``state_dict``, ``optimizer_states``, ``hyper_parameters``, ``loops``, ...).
    """
    return ResumeKitCheckpointIO(storage_options=storage_options).load_checkpoint(path)


_DELETING = re.compile(r"^\..+\.deleting-[0-9a-f]{8}$")


def _remove_partials(path: str) -> None:
    """Delete debris a killed process left beside ``path``.

    That is hidden first-save folders of ``path`` (killed before their rename) and any folder of this
    directory that ``remove_checkpoint`` had already hidden but not finished deleting. Neither can be
    mistaken for a checkpoint by Lightning (their names do not end in ``.ckpt``).
    """
    parent, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}.partial-"
    for entry in os.listdir(parent):
        if entry.startswith(prefix) or _DELETING.match(entry):
            _remove_path(os.path.join(parent, entry))


def _remove_path(path: str) -> None:
    """Delete a folder, or a symlink itself (``rmtree`` refuses a link; a hidden link was a "last" link)."""
    if os.path.islink(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _url(path: Any) -> str:
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"checkpoint path must be a str or os.PathLike, got {type(path).__name__}")
    return path
