"""``AcceleratorCheckpointer``: what to use instead of ``accelerator.save_state`` / ``load_state``."""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from resumekit import AccumulatedGradients, Checkpointer, CheckpointInfo, DriftPolicy, RestoreResult
from resumekit.errors import ResumeKitError
from resumekit.rng import RNGState

from ._data import DataLoaderPosition, UnsupportedDataLoaderError, adopt
from ._entries import CounterEntry, unwrapped

__all__ = ["AcceleratorCheckpointer", "UnsupportedSetupError"]

log = logging.getLogger("resumekit.accelerate")

# Sharded or engine-managed state (FSDP, DeepSpeed, Megatron) and XLA need their own save paths.
_SUPPORTED = {"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_XPU",
              "MULTI_HPU", "MULTI_NEURON"}  # fmt: skip
# Entry names this adapter writes; user extras may not reuse them.
_RESERVED = re.compile(
    r"^(?:(?:model|grads|optimizer|scheduler|dataloader)(?:_\d+)?|custom_\d+|rng|accelerator|scaler)$"
)


class UnsupportedSetupError(ResumeKitError, ValueError):
    """The Accelerator uses a feature this adapter cannot checkpoint (FSDP, DeepSpeed, Megatron-LM, XLA)."""


def _name(base: str, index: int) -> str:
    # Accelerate's own naming: model, model_1, model_2, ...
    return base if index == 0 else f"{base}_{index}"


class AcceleratorCheckpointer:
    """Atomic, pickle-free checkpoints of everything an ``Accelerator`` prepared or registered.

    Create it right after ``accelerator.prepare(...)`` and before the training loop; call
    :meth:`load_state` once (``None`` on a fresh run) and :meth:`save_state` on every process together.

    Each checkpoint holds: every prepared model (unwrapped, canonical keys) and its current gradients (per
    process, so a checkpoint inside a gradient-accumulation window resumes the window), optimizers,
    schedulers, the gradient scaler, objects from ``register_for_checkpointing``, ``accelerator.step``,
    every process's random streams (:class:`~resumekit.rng.RNGState`), each prepared dataloader's exact
    position (epoch and samples consumed), and any ``extra_state``.

    Data order: each prepared map-style dataloader's ``RandomSampler``/``SequentialSampler`` is replaced by
    an :class:`~resumekit_accelerate.EpochSampler` whose order is a pure function of ``(seed, epoch)``; a
    resume recomputes the epoch's order and slices it, so no skipped batch is produced or read.

    Args:
        accelerator: The ``Accelerator``.
        url: Checkpoint root: a folder or any fsspec URL. Defaults to ``<project_dir>/checkpoints`` of the
            accelerator's ``ProjectConfiguration``.
        keep_last: Keep only this many newest checkpoints; defaults to the project configuration's
            ``total_limit``. Old checkpoints are deleted only after the new one is committed.
        keep_every: Also keep every step divisible by this.
        config: The run's configuration (JSON-serialisable), compared on restore. The accelerator's
            ``gradient_accumulation_steps``, ``mixed_precision`` and the first dataloader's
            ``per_device_batch_size`` are added unless given.
        drift_policy: How to treat each kind of drift (see :class:`~resumekit.DriftPolicy`).
        storage_options: Passed to fsspec.
        data_seed: Seed of the shuffled order of dataloaders whose sampler is replaced (defaults to the
            accelerator's ``DataLoaderConfiguration.data_seed``, else 0). Equal on every process.
        extra_state: More entries to save (name -> object with ``state_dict``/``load_state_dict``, or a
            dict restored in place), such as ``{"progress": {"epoch": 0}}``.
        exact_dataloaders: When False, a dataloader whose position cannot be saved exactly (iterable
            dataset, custom sampler) only draws a warning and restarts its epoch after a resume.

    Raises:
        UnsupportedSetupError: FSDP, DeepSpeed, Megatron-LM or XLA is in use.
        UnsupportedDataLoaderError: a prepared dataloader cannot be resumed exactly (``exact_dataloaders``).

    Example:
        >>> ckpt = AcceleratorCheckpointer(accelerator, "runs/demo", keep_last=3)  # doctest: +SKIP
        >>> restored = ckpt.load_state()                                           # doctest: +SKIP
        >>> ckpt.save_state(step=100)                                              # doctest: +SKIP
    """

    def __init__(
        self,
        accelerator: Any,
        url: str | os.PathLike[str] | None = None,
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        config: Mapping[str, Any] | None = None,
        drift_policy: DriftPolicy | None = None,
        storage_options: dict[str, Any] | None = None,
        data_seed: int | None = None,
        extra_state: Mapping[str, Any] | None = None,
        exact_dataloaders: bool = True,
    ) -> None:
        kind = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
        if kind not in _SUPPORTED:
            raise UnsupportedSetupError(
                f"resumekit_accelerate does not support distributed_type={kind}: sharded or engine-managed "
                "state (FSDP, DeepSpeed, Megatron-LM) and XLA need their own save paths. Use "
                "accelerator.save_state for this run, or DDP (MULTI_GPU / MULTI_CPU)."
            )
        project = accelerator.project_configuration
        if url is None:
            if not accelerator.project_dir:
                raise ValueError(
                    "AcceleratorCheckpointer needs a url (a folder or an fsspec URL such as s3://bucket/run), "
                    "or an Accelerator(project_dir=...) whose <project_dir>/checkpoints is used."
                )
            url = os.path.join(accelerator.project_dir, "checkpoints")
        if keep_last is None:
            keep_last = project.total_limit
        self.accelerator = accelerator
        self.exact_dataloaders = bool(exact_dataloaders)
        if data_seed is None:
            data_seed = getattr(getattr(accelerator, "dataloader_config", None), "data_seed", None)
        self.data_seed = int(data_seed) if data_seed is not None else 0
        self.extra_state: dict[str, Any] = dict(extra_state or {})
        for name in self.extra_state:
            if _RESERVED.match(name):
                raise ValueError(
                    f"extra_state entry {name!r} collides with a name resumekit_accelerate uses (rng, "
                    "accelerator, scaler, model, grads, optimizer, scheduler, dataloader, each optionally "
                    "with _<n>, and custom_<n>); rename it."
                )
        self.rng = RNGState()
        self._positions: dict[int, DataLoaderPosition | None] = {}
        self._adopt_dataloaders()
        rng_types = [str(getattr(t, "value", t)) for t in (accelerator.rng_types or [])]
        if accelerator.num_processes > 1 and any(t in ("torch", "cuda") for t in rng_types):
            warnings.warn(
                f"resumekit_accelerate: Accelerator(rng_types={rng_types}) copies process 0's global random "
                "stream to every process whenever a dataloader pass starts, also the pass a resume starts "
                "mid-epoch, so after a resume the other processes' streams differ from the original run. "
                "Keep the default rng_types for bitwise resume.",
                RuntimeWarning,
                stacklevel=2,
            )
        self.checkpointer = Checkpointer(
            url,
            keep_last=keep_last,
            keep_every=keep_every,
            config=self._full_config(config),
            drift_policy=drift_policy,
            storage_options=storage_options,
        )
        self.url = self.checkpointer.url

    # -- what is saved ----------------------------------------------------------------------------------

    def _full_config(self, config: Mapping[str, Any] | None) -> dict[str, Any]:
        acc = self.accelerator
        auto: dict[str, Any] = {
            "gradient_accumulation_steps": int(acc.gradient_accumulation_steps),
            "mixed_precision": str(acc.mixed_precision),
        }
        first = next((p for p in self._positions.values() if p is not None), None)
        if first is not None:
            auto["per_device_batch_size"] = first.total_batch_size // max(1, first.num_processes)
        return {**auto, **dict(config or {})}

    def _adopt_dataloaders(self) -> None:
        for dl in self.accelerator._dataloaders:
            if id(dl) in self._positions:
                continue
            try:
                self._positions[id(dl)] = adopt(
                    dl,
                    seed=self.data_seed,
                    process_index=self.accelerator.process_index,
                    num_processes=self.accelerator.num_processes,
                )
            except UnsupportedDataLoaderError as exc:
                if self.exact_dataloaders:
                    raise
                warnings.warn(f"{exc} It restarts its epoch after a resume.", RuntimeWarning, stacklevel=3)
                self._positions[id(dl)] = None

    def state(self) -> dict[str, Any]:
        """The entries a checkpoint holds, by name (built fresh: objects prepared later are included).

        Returns:
            Entry name -> object, as passed to :meth:`resumekit.Checkpointer.save`.
        """
        self._adopt_dataloaders()
        acc = self.accelerator
        state: dict[str, Any] = {"rng": self.rng, "accelerator": CounterEntry(acc)}
        for i, model in enumerate(acc._models):
            # The core stores modules under canonical keys (no DDP ``module.``, no ``_orig_mod.``).
            state[_name("model", i)] = model
            # Gradients travel with the checkpoint: a save inside an accumulation window resumes the window.
            state[_name("grads", i)] = AccumulatedGradients(unwrapped(acc, model))
        for i, opt in enumerate(acc._optimizers):
            state[_name("optimizer", i)] = opt
        for i, sched in enumerate(acc._schedulers):
            # The torch scheduler inside AcceleratedScheduler (same state_dict), so the core sees an
            # LRScheduler and restores or resets it together with the optimizer.
            state[_name("scheduler", i)] = getattr(sched, "scheduler", sched)
        if acc.scaler is not None:
            state["scaler"] = acc.scaler
        tracked = [p for p in (self._positions.get(id(dl)) for dl in acc._dataloaders) if p is not None]
        for i, position in enumerate(tracked):
            state[_name("dataloader", i)] = position
        for i, obj in enumerate(acc._custom_objects):
            state[f"custom_{i}"] = obj
        for name, obj in self.extra_state.items():
            if not isinstance(obj, MutableMapping) and not (
                hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")
            ):
                raise TypeError(
                    f"extra_state entry {name!r} is a {type(obj).__name__}; pass an object with "
                    "state_dict()/load_state_dict() or a dict (restored in place)."
                )
            state[name] = obj
        return state

    # -- save / restore ---------------------------------------------------------------------------------

    def save_state(self, *, step: int) -> CheckpointInfo:
        """Save everything as checkpoint ``step``, atomically; then apply retention.

        Every process must call it at the same point (like ``accelerator.save_state``).

        Args:
            step: A non-negative int, greater than every saved step; typically the optimizer step count.

        Returns:
            What was committed (step, URL, bytes, seconds).

        Raises:
            StepExistsError: ``step`` is already committed.
            StorageError: an I/O failure; nothing became visible and older checkpoints are intact.
        """
        return self.checkpointer.save(self.state(), step=step)

    def save_state_async(self, *, step: int) -> None:
        """Like :meth:`save_state`, but return once the state is copied to host memory; write in the background.

        The checkpoint holds the values at the call; training may go on at once. An error surfaces at the
        next save, :meth:`wait` or :meth:`close`. See :meth:`resumekit.Checkpointer.save_async`.

        Args:
            step: As for :meth:`save_state`.
        """
        self.checkpointer.save_async(self.state(), step=step)

    def wait(self) -> CheckpointInfo | None:
        """Wait for an asynchronous save in flight; return what it committed (None if there was none)."""
        return self.checkpointer.wait()

    def close(self) -> None:
        """Finish any save in flight. Idempotent."""
        self.checkpointer.close()

    def load_state(
        self,
        *,
        step: int | None = None,
        strict: bool = True,
        only: Iterable[str] | None = None,
        allow_shape_mismatch: bool = False,
    ) -> RestoreResult | None:
        """Restore the newest checkpoint that verifies (or ``step``) into the prepared objects, in place.

        After it returns, iterating a prepared dataloader continues its saved epoch at the saved sample
        (its ``iteration`` attribute is the epoch); ``accelerator.step`` and every random stream are as at
        the save. Call it on every process, before the training loop.

        Args:
            step: Restore exactly this step; None for the newest that verifies.
            strict: When False, entries the checkpoint lacks are left as they are (listed in
                ``RestoreResult.not_restored``): e.g. a checkpoint written by a plain
                :class:`resumekit.Checkpointer` with only ``"model"`` and ``"optimizer"``.
            only: Restore just these entries (e.g. ``["model"]``); the optimizer, scheduler and scaler are
                restored or reset together (see :meth:`resumekit.Checkpointer.restore`). Entry names
                are listed by :meth:`state`.
            allow_shape_mismatch: Load every model tensor whose shape fits and keep the rest (listed in
                ``RestoreResult.skipped_tensors``).

        Returns:
            None on a fresh run (no checkpoint), else a :class:`resumekit.RestoreResult`.

        Raises:
            DriftError: the drift policy rates a change as an error; nothing was loaded.
            StateMismatchError: the checkpoint lacks entries (``strict=True``) or they do not fit.
            CheckpointCorruptError: no checkpoint verifies.
        """
        result = self.checkpointer.restore(
            self.state(), step=step, strict=strict, only=only, allow_shape_mismatch=allow_shape_mismatch
        )
        if result is not None:
            log.info("resumekit_accelerate: restored step %d from %s", result.step, result.url)
        return result

    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        return self.checkpointer.steps()

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        return self.checkpointer.latest_step()

    def position(self, dataloader: Any) -> tuple[int, int]:
        """Where a prepared dataloader stands: ``(epoch, global samples of that epoch consumed)``.

        Args:
            dataloader: A dataloader ``accelerator.prepare`` returned.

        Raises:
            KeyError: the dataloader is not tracked (not prepared by this accelerator, or not exact).
        """
        self._adopt_dataloaders()
        tracked = self._positions.get(id(dataloader))
        if tracked is None:
            raise KeyError("this dataloader is not tracked; pass one that accelerator.prepare returned")
        return tracked.current()

    def __repr__(self) -> str:
        return f"AcceleratorCheckpointer(url={self.url!r}, keep_last={self.checkpointer.keep_last})"
