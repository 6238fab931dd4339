"""The ResumeKit callback: one line on ``Trainer(...)`` for atomic checkpoints and exact resume.

What it adds to Lightning:

* installs :class:`~resumekit_lightning.ResumeKitCheckpointIO`, so every checkpoint Lightning writes is
  atomic, checksummed, pickle-free and fsspec-backed;
* saves every random stream (Python, NumPy, torch CPU, CUDA, registered generators) of *every* rank:
  each rank's record travels to rank 0 inside the callback's state, and each rank restores its own;
* records Lightning's ``accumulate_grad_batches`` and world size next to the user's ``config`` so a
  changed value is reported (or refused) by the drift policy when the checkpoint is loaded.

Exact mid-epoch resume also needs a stateful train loader: return a
:class:`~resumekit_lightning.StatefulLoader` from ``train_dataloader()``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

from resumekit import DriftPolicy
from resumekit.errors import StateMismatchError
from resumekit.rng import Generator, RNGState

from ._gather import all_gather_records
from ._layout import UnsupportedHparams
from .checkpoint_io import ResumeKitCheckpointIO

__all__ = ["ResumeKit"]

_FORMAT = 1


class ResumeKit(Callback):
    """Make a Lightning run survive being killed: ``Trainer(callbacks=[ResumeKit()])``.

    Resume with Lightning's own ``trainer.fit(model, ckpt_path="last")`` (with
    ``ModelCheckpoint(save_last=True)``); on a fresh directory that starts from scratch.

    The callback installs its CheckpointIO at ``setup`` (or at a ``trainer.save_checkpoint`` before
    ``fit``). Where Lightning runs no callback hook (the main process of ``ddp_spawn``, a weights-only
    save before ``setup``) the Trainer needs it as a plugin as well:
    ``rk = ResumeKit(); Trainer(callbacks=[rk], plugins=[rk.checkpoint_io])``.

    Args:
        config: The run's configuration (JSON-serialisable), compared with the checkpoint's on load.
        drift_policy: Severity per drift key (``"config.batch_size"``, ``"env.torch"``, ...).
        generators: Extra random generators to save and restore by name (``torch.Generator``,
            ``numpy.random.Generator``, ...), on every rank.
        storage_options: fsspec options for remote checkpoint directories.
        unsupported_hparams: ``"error"`` (default) or ``"repr"``; see :class:`ResumeKitCheckpointIO`.

    Raises:
        ValueError: At ``setup``, when the Trainer already has a CheckpointIO other than Lightning's default
            (pass ``ResumeKitCheckpointIO`` in ``plugins=`` instead, or remove the other one).
    """

    def __init__(
        self,
        *,
        config: Mapping[str, Any] | None = None,
        drift_policy: DriftPolicy | None = None,
        generators: Mapping[str, Generator] | None = None,
        storage_options: dict[str, Any] | None = None,
        unsupported_hparams: UnsupportedHparams = "error",
    ) -> None:
        self.config = dict(config) if config is not None else None
        self.checkpoint_io = ResumeKitCheckpointIO(
            config=config,
            drift_policy=drift_policy,
            storage_options=storage_options,
            unsupported_hparams=unsupported_hparams,
        )
        self.rng = RNGState(generators)
        self._pending: dict[str, Any] | None = None
        self._warned_loader = False

    # ------------------------------------------------------------------------------------------ wiring

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Install the CheckpointIO (before Lightning restores anything) and record the run's facts.

        Raises:
            ValueError: The Trainer has another CheckpointIO; the strategy writes its checkpoints without
                the CheckpointIO (FSDP, DeepSpeed, ModelParallel); or a process-spawning strategy
                (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) runs without ``plugins=[rk.checkpoint_io]``.
        """
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher) and not isinstance(
            trainer.strategy.checkpoint_io, ResumeKitCheckpointIO
        ):
            # The worker saves the final weights with its CheckpointIO and the main process reads them
            # with its own, where no callback hook runs: only a plugin given to the Trainer is in both.
            raise ValueError(
                f"ResumeKit: strategy {type(trainer.strategy).__name__} with a process-spawning launcher "
                "(ddp_spawn, ddp_fork, ddp_notebook) hands the final weights from the worker to the main process "
                "through the Trainer's CheckpointIO, and the main process runs no callback hook to install "
                "resumekit's, so it would fail reading them at the end of fit. Give the callback's CheckpointIO "
                "to the Trainer too: rk = ResumeKit(...); Trainer(callbacks=[rk], plugins=[rk.checkpoint_io], "
                "...), or use strategy='ddp'."
            )
        self._install(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Install the CheckpointIO if ``setup`` has not run yet (a ``trainer.save_checkpoint`` before ``fit``).

        Lightning calls this hook while building the checkpoint dict, before it hands the dict to the
        strategy's CheckpointIO, so the save that follows is resumekit's and no pickle is written.

        Raises:
            ValueError: As :meth:`setup`, before Lightning writes anything.
        """
        if not isinstance(trainer.strategy.checkpoint_io, ResumeKitCheckpointIO):
            self._install(trainer)
        else:
            refusal = unsupported_strategy(trainer.strategy)
            if refusal is not None:
                raise ValueError(refusal)

    def _install(self, trainer: pl.Trainer) -> None:
        refusal = unsupported_strategy(trainer.strategy)
        if refusal is not None:
            raise ValueError(refusal)
        current = trainer.strategy.checkpoint_io
        if isinstance(current, ResumeKitCheckpointIO):
            self.checkpoint_io = current
        elif type(current) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = self.checkpoint_io
        else:
            raise ValueError(
                f"ResumeKit: the Trainer already uses the CheckpointIO {type(current).__name__}; ResumeKit "
                "needs ResumeKitCheckpointIO to write checkpoints. Remove the other plugin, or pass "
                "resumekit_lightning.ResumeKitCheckpointIO(...) in Trainer(plugins=[...]) yourself."
            )
        config = dict(self.config if self.config is not None else self.checkpoint_io.config or {})
        # Read by the drift policy as gradient accumulation and world size (config.lightning.*).
        config["lightning"] = {
            "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
            "world_size": int(trainer.world_size),
        }
        self.checkpoint_io.config = config

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Forget a restored record no training consumed (``validate``/``test`` with ``ckpt_path``)."""
        self._pending = None

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Every rank's random streams, gathered on rank 0 (collective: every rank calls it)."""
        record = self.rng.state_dict()
        records = all_gather_records(record, _collective_device())
        return {"format": _FORMAT, "world_size": len(records), "rng": records}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the record until training starts; the streams are restored just before the first batch.

        Raises:
            StateMismatchError: The record was not written by this callback.
        """
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("rng"), list):
            raise StateMismatchError(
                "ResumeKit.load_state_dict: the checkpoint's ResumeKit state has no per-rank 'rng' list; it "
                "was written by a different callback with the same state key"
            )
        self._pending = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore this rank's random streams, after everything Lightning does before the first batch.

        Between loading a checkpoint and the first batch Lightning builds dataloader iterators, runs the
        sanity check, and sets up the model; some of that draws random numbers. Restoring here, after all
        of it, makes the first batch see exactly the streams the interrupted run had after its save.
        """
        self._check_loader(trainer)
        pending, self._pending = self._pending, None
        if pending is None:
            return
        records = pending["rng"]
        rank = trainer.global_rank
        if rank < len(records):
            self.rng.load_state_dict(records[rank])
        else:
            warnings.warn(
                f"ResumeKit: the checkpoint holds random-number state for {len(records)} rank(s); rank {rank} "
                "has none and keeps its current streams, so its random numbers (dropout, augmentation) differ "
                "from any earlier run. This is expected after increasing the number of processes.",
                RuntimeWarning,
                stacklevel=2,
            )

    def _check_loader(self, trainer: pl.Trainer) -> None:
        if self._warned_loader or trainer.global_rank != 0:
            return
        loaders = trainer.train_dataloader
        flat = (
            list(loaders.values())
            if isinstance(loaders, dict)
            else list(loaders)
            if isinstance(loaders, (list, tuple))
            else [loaders]
        )
        # Lightning's own test for a resumable loader (its private _Stateful protocol), spelled out.
        stateless = [
            type(dl).__name__
            for dl in flat
            if dl is not None
            and not (
                callable(getattr(dl, "state_dict", None)) and callable(getattr(dl, "load_state_dict", None))
            )
        ]
        if stateless:
            self._warned_loader = True
            warnings.warn(
                f"ResumeKit: the train loader ({', '.join(stateless)}) is not stateful, so a run resumed from "
                "a mid-epoch checkpoint restarts that epoch from its first batch. Return "
                "resumekit_lightning.StatefulLoader(DataLoader(ds, batch_size=..., "
                "sampler=ResumableSampler(ds, seed=...))) from train_dataloader() for exact resume.",
                RuntimeWarning,
                stacklevel=2,
            )


def unsupported_strategy(strategy: Strategy) -> str | None:
    """Why resumekit cannot write ``strategy``'s checkpoints, or None when it can.

    These strategies save and load checkpoints themselves (torch.distributed.checkpoint shards, a
    ``torch.save`` of the metadata, DeepSpeed's engine) instead of handing one dict to the CheckpointIO,
    so a resumekit CheckpointIO is bypassed or meets a folder it did not expect.

    Args:
        strategy: The Trainer's strategy.
    """
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        return (
            f"ResumeKit: the strategy {type(strategy).__name__} writes and reads its checkpoints itself "
            "(torch.distributed.checkpoint shards with a torch.save pickle, or DeepSpeed's engine), not "
            "through the Trainer's CheckpointIO, so resumekit can make them neither atomic nor pickle-free. "
            "Remove ResumeKit from the callbacks for this strategy, or train with strategy='ddp'."
        )
    return None


def _collective_device() -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
