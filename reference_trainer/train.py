"""The reference pretrainer's training loop: killable at any instant, resumed bit for bit.

It follows ``examples/train_plain.py``: everything that determines the rest of the run is in the
checkpointed state (model, optimizer, scheduler, sampler position, accumulated gradients, RNG of every
rank, and the loop's own counters and history), so a run resumed from any checkpoint trains exactly
what an uninterrupted run would have trained from there.

Where checkpoints are taken: every ``--save-every-steps`` optimizer steps, at every epoch end (after
validation), and whenever the run stops early (budget or signal), at a micro-batch boundary, possibly
inside an accumulation window (the accumulated gradients travel with it). Checkpoint steps are numbered
by micro-batches trained.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Subset

import resumekit as rk
from reference_trainer import history as hist
from reference_trainer.autobatch import choose_batch_size
from reference_trainer.config import PretrainConfig
from reference_trainer.data import SyntheticProfiles, target_distance, train_val_split
from reference_trainer.devices import Placement, agree, wrap_model
from reference_trainer.evaluation import EvalBatches, validate
from reference_trainer.fsdp import export_state_dict
from reference_trainer.loss import pairwise_loss
from reference_trainer.model import ProfileEncoder
from reference_trainer.outputs import OutputDir, final_model_bytes, json_bytes
from reference_trainer.progress import Progress
from reference_trainer.resume import restore_state
from reference_trainer.schedule import StopBudget, optimizer_steps_per_epoch, warmup_cosine, window_size
from reference_trainer.signals import StopSignals

__all__ = ["CHECKPOINTS", "FINAL_MODEL", "HISTORY", "MODEL_SHAPE", "PLOT", "Run", "RunResult", "start_epoch"]

log = logging.getLogger("reference_trainer")

HISTORY = "history.json"
PLOT = "loss_curves.png"
FINAL_MODEL = "final/model.safetensors"
CHECKPOINTS = "checkpoints"
#: The encoder's architecture (fixed; recorded in the final model's metadata).
MODEL_SHAPE: dict[str, Any] = {
    "hidden_dims": [256, 256],
    "embedding_dim": 32,
    "dropout": 0.1,
    "input_transform": "sqrt",
}


@dataclass(frozen=True)
class RunResult:
    """How an invocation ended (exceptions aside).

    Attributes:
        complete: Training is complete (all epochs, or early stopping); ``final/model.safetensors`` exists.
        reason: ``"complete"``, ``"early stopping"``, ``"max-epochs-per-run"``, ``"time-budget"`` or
            ``"signal SIGTERM"`` (``SIGUSR1``, ``SIGINT``).
        step: Micro-batches trained in total (the newest checkpoint's step).
        last_completed_epoch: Epochs trained and validated.
    """

    complete: bool
    reason: str
    step: int
    last_completed_epoch: int


def start_epoch(train_sampler: rk.ResumableSampler, val_batches: EvalBatches, epoch: int) -> None:
    """Tell both samplers which epoch begins (field lesson: the validation sampler too).

    The train sampler keeps its position when ``epoch`` is the epoch in progress (just restored).
    """
    train_sampler.set_epoch(epoch)
    val_batches.set_epoch(epoch)


def _new_progress() -> dict[str, Any]:
    # The loop's counters, checkpointed with the rest so a resume continues them exactly.
    return {
        "epoch": 0,  # the epoch in progress (0-based); == epochs done
        "micro": 0,  # micro-batches trained, all epochs: the checkpoint step
        "opt_steps": 0,
        "micro_in_epoch": 0,
        "in_window": 0,  # micro-batches accumulated since the last optimizer step
        "loss_sum": 0.0,
        "loss_count": 0,
        "curve_sum": 0.0,
        "curve_count": 0,
        "best_val": math.inf,
        "bad_epochs": 0,
        "complete": False,
        "early_stopped": False,
    }


class Run:
    """One invocation of the pretrainer: set up, restore, train until complete or told to stop.

    Args:
        cfg: The parsed flags.
        placement: The resolved device layout (process group already joined for DDP and FSDP).
        signals: The active stop-signal recorder.
        started: ``time.monotonic()`` at the start of the command (the time budget counts from it).
    """

    def __init__(
        self, cfg: PretrainConfig, placement: Placement, signals: StopSignals, started: float
    ) -> None:
        self.cfg = cfg
        self.placement = placement
        self.signals = signals
        self.out = OutputDir(cfg.output_dir)
        self.history = hist.new_history(cfg.epochs)
        # False until the history is this run's (restored or fresh): before that, a failure must not
        # overwrite the history.json an earlier invocation wrote.
        self._history_live = False
        self._ready = False
        self.progress = _new_progress()
        self.last_saved: Optional[int] = None
        self.budget = StopBudget(None, cfg.time_budget, started)

    # -- setup -------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Build the data, model, optimizer, loaders and checkpointer (idempotent; no checkpoint is read)."""
        if self._ready:
            return
        self._ready = True
        cfg, pl = self.cfg, self.placement
        data = SyntheticProfiles(cfg.num_samples, cfg.num_features, seed=cfg.seed)
        # Field lesson: the split is a pure function of the seed, identical on every rank and resume.
        train_idx, val_idx = train_val_split(len(data), val_fraction=cfg.val_fraction, seed=cfg.seed)
        self.train_set, self.val_set = Subset(data, train_idx), Subset(data, val_idx)
        self.target = target_distance("unifrac" if cfg.target == "unifrac" else "braycurtis", tree=data.tree)
        torch.manual_seed(cfg.seed)
        self.model = ProfileEncoder(
            cfg.num_features,
            hidden_dims=MODEL_SHAPE["hidden_dims"],
            embedding_dim=MODEL_SHAPE["embedding_dim"],
            dropout=MODEL_SHAPE["dropout"],
            input_transform=MODEL_SHAPE["input_transform"],
        ).to(pl.device)
        # Dropout masks differ between ranks; each rank's stream is a pure function of (seed, rank).
        torch.manual_seed(cfg.seed + 1 + pl.rank)
        self.batch_size = choose_batch_size(
            cfg.batch_size,
            enabled=cfg.auto_batch_size,
            placement=pl,
            model=self.model,
            profiles=data.profiles[train_idx],
            target=self.target,
            out=self.out,
        )
        # Batch size is per device everywhere: DataParallel's one process loads one micro-batch per GPU.
        self.loader_batch = self.batch_size * pl.gpus_per_process
        self.net = wrap_model(self.model, pl)
        self.sampler = rk.ResumableSampler(
            self.train_set, pl.world_size, pl.rank, shuffle=True, seed=cfg.seed
        )
        self.loader = rk.ResumableLoader(
            DataLoader(
                self.train_set,
                batch_size=self.loader_batch,
                sampler=self.sampler,
                num_workers=cfg.num_workers,
                pin_memory=pl.device.type == "cuda",
            )
        )
        self.val_batches = EvalBatches(len(self.val_set), self.loader_batch, pl.world_size, pl.rank)
        self.micro_per_epoch = math.ceil(self.sampler.num_samples / self.loader_batch)
        # Field lesson: the schedule counts optimizer steps, not micro-batches.
        self.steps_per_epoch = optimizer_steps_per_epoch(self.micro_per_epoch, cfg.grad_accumulation)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.01)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, cfg.warmup_steps)
        )
        if cfg.max_epochs_per_run is not None:
            self.budget.max_micro = max(1, round(cfg.max_epochs_per_run * self.micro_per_epoch))
        self.state: dict[str, Any] = {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "sampler": self.sampler,
            "progress": self.progress,
            "history": self.history,
            "grads": rk.AccumulatedGradients(self.model),
            "rng": rk.RNGState(),
        }
        config = {**cfg.training_config(), "batch_size": self.batch_size, "devices": pl.devices}
        self.ckpt = rk.Checkpointer(self.out.join(CHECKPOINTS), keep_last=cfg.keep_last, config=config)

    def _announce(self) -> None:
        cfg, pl = self.cfg, self.placement
        mode = {
            "single": f"one process on {pl.device}",
            "ddp": f"DDP over {pl.world_size} processes ({'nccl' if pl.device.type == 'cuda' else 'gloo'}, {pl.device.type})",
            "fsdp": f"FSDP2 over {pl.world_size} processes ({'nccl' if pl.device.type == 'cuda' else 'gloo'}, {pl.device.type}; parameters, gradients and optimizer state sharded)",
            "dp": f"DataParallel over {pl.gpus_per_process} GPUs in one process",
        }[pl.mode]
        micro = self.batch_size * pl.devices
        log.info("mode: %s", mode)
        log.info(
            "global batch: %d per device x %d device(s) x %d accumulation = %d samples per optimizer step. "
            "Pairs are formed within each micro-batch of %d samples (gathered across devices); they never "
            "cross micro-batches.",
            self.batch_size, pl.devices, cfg.grad_accumulation, micro * cfg.grad_accumulation, micro,
        )  # fmt: skip
        log.info(
            "data: %d train / %d validation samples (seeded split); %d micro-batches = %d optimizer steps per "
            "epoch; %d optimizer steps in %d epochs (warmup %d)",
            len(self.train_set), len(self.val_set), self.micro_per_epoch, self.steps_per_epoch,
            self.total_steps, cfg.epochs, cfg.warmup_steps,
        )  # fmt: skip
        log.info("output: %s", self.out.url)

    # -- the loop ----------------------------------------------------------------------------------

    def execute(self) -> RunResult:
        """Set up, restore (``--resume-from``), and train until complete or told to stop.

        Raises:
            UsageError: ``--resume-from`` names nothing usable, or ``none`` with existing checkpoints.
            ResumeKitError: A checkpoint could not be restored (corrupt, drift error, mismatch).
        """
        self.setup()
        self._announce()
        restored = restore_state(self.cfg.resume_from, self.state, self.ckpt, self.cfg.training_config())
        p = self.progress
        if restored is not None:
            self.last_saved = restored.step if restored.url.startswith(self.ckpt.url) else None
            drift = restored.drift.warnings
            log.info(
                "resumed from checkpoint step %d (epoch %.2f, optimizer step %d): %s; drift: %s",
                restored.step, self._position(), p["opt_steps"], restored.url,
                f"{len(drift)} warning(s), listed above" if drift else "none",
            )  # fmt: skip
            if not p["complete"]:
                hist.record_resume(
                    self.history, step=restored.step, position=self._position(),
                    optimizer_steps=p["opt_steps"], source=restored.url,
                )  # fmt: skip
        else:
            log.info("fresh start: no checkpoint to resume from")
        hist.set_status(self.history, "running")
        self._history_live = True
        if p["complete"] and not p["early_stopped"] and p["epoch"] < self.cfg.epochs:
            # --epochs was raised after the run completed: train the extra epochs (drift warned above).
            log.warning("extending a completed run from %d to %d epochs", p["epoch"], self.cfg.epochs)
            p["complete"] = False
            if self.placement.is_main:
                self.out.remove(FINAL_MODEL)  # final/ holds the weights of a complete run only
        self.history["epochs_planned"] = self.cfg.epochs
        if p["complete"]:
            log.info("training was already complete (%d epochs); rewriting the final outputs", p["epoch"])
            return self._finish()
        progress = Progress(
            total=self.cfg.epochs * self.micro_per_epoch,
            initial=p["epoch"] * self.micro_per_epoch + p["micro_in_epoch"],
            enabled=self.placement.is_main,
            log_every=self.cfg.log_every,
        )
        try:
            reason = self._loop(progress)
        finally:
            progress.close()
        return self._finish() if reason is None else self._stop(reason)

    def _loop(self, progress: Progress) -> Optional[str]:
        """Train; return None when complete, else why it stopped (a checkpoint is then saved)."""
        p, cfg = self.progress, self.cfg
        reason = self._stop_reason(epoch_ends_next=False)
        while reason is None and p["epoch"] < cfg.epochs and not p["complete"]:
            epoch = p["epoch"]
            start_epoch(self.sampler, self.val_batches, epoch)
            left = len(self.loader)  # after a mid-epoch resume: what is left of the epoch
            self.net.train()
            for profiles, _index in self.loader:
                self._train_micro(profiles, left, progress)
                left -= 1
                if left == 0:
                    continue  # the epoch's end (validation, history) comes before any stop or save
                if (
                    cfg.save_every_steps
                    and p["in_window"] == 0
                    and p["opt_steps"] % cfg.save_every_steps == 0
                ):
                    self._save()
                reason = self._stop_reason(epoch_ends_next=left == 1)
                if reason is not None:
                    break
            if reason is None:
                self._end_epoch(epoch)
                if not p["complete"]:
                    reason = self._stop_reason(epoch_ends_next=self.micro_per_epoch == 1)
        if reason is not None:
            self._save()
        return reason

    def _train_micro(self, profiles: torch.Tensor, left: int, progress: Progress) -> None:
        p, cfg = self.progress, self.cfg
        t0 = time.perf_counter()
        x = profiles.to(self.placement.device, non_blocking=True)
        size = window_size(p["in_window"], left, cfg.grad_accumulation)
        out = pairwise_loss(self.net(x), x, self.target, gather=True)
        (out.loss / size).backward()
        loss = float(out.loss.item())
        p["in_window"] += 1
        p["micro"] += 1
        p["micro_in_epoch"] += 1
        p["loss_sum"] += loss
        p["loss_count"] += 1
        p["curve_sum"] += loss
        p["curve_count"] += 1
        if p["in_window"] == size:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            p["opt_steps"] += 1
            p["in_window"] = 0
        if p["curve_count"] >= max(1, self.micro_per_epoch // 10):
            self._curve_point()
        self.budget.trained += 1
        self.budget.slowest_micro = max(self.budget.slowest_micro, time.perf_counter() - t0)
        progress.update(
            micro=p["micro"], opt_steps=p["opt_steps"], epoch=self._position(), loss=loss,
            lr=self._lr(), samples=out.num_samples,
        )  # fmt: skip

    def _curve_point(self) -> None:
        p = self.progress
        if p["curve_count"]:
            hist.record_curve_point(self.history, self._position(), p["curve_sum"] / p["curve_count"])
        p["curve_sum"], p["curve_count"] = 0.0, 0

    def _end_epoch(self, epoch: int) -> None:
        p, cfg = self.progress, self.cfg
        self._curve_point()
        t0 = time.perf_counter()
        eval_model = self.net if self.placement.mode == "dp" else self.model
        val = validate(
            eval_model, self.val_set, self.val_batches, self.target, self.placement.device, cfg.num_features
        )
        self.budget.slowest_validation = max(self.budget.slowest_validation, time.perf_counter() - t0)
        record = {
            "epoch": epoch + 1,
            "train_loss": p["loss_sum"] / max(1, p["loss_count"]),
            "val_loss": val["loss"],
            "val_predicted_std": val["predicted_std"],
            "val_target_std": val["target_std"],
            "val_spread_ratio": val["spread_ratio"],
            "val_pearson": val["pearson"],
            "lr": self._lr(),
            "optimizer_steps": p["opt_steps"],
            "micro_batches": p["micro"],
        }
        hist.record_epoch(self.history, record)
        if val["loss"] < p["best_val"]:  # NaN never improves
            p["best_val"], p["bad_epochs"] = val["loss"], 0
        else:
            p["bad_epochs"] += 1
        p.update(epoch=epoch + 1, micro_in_epoch=0, loss_sum=0.0, loss_count=0)
        log.info(
            "epoch %d/%d: train loss %.5g, val loss %.5g, val distance spread %.3f (predicted std %.4g / target "
            "std %.4g), lr %.3g",
            epoch + 1, cfg.epochs, record["train_loss"], val["loss"], val["spread_ratio"],
            val["predicted_std"], val["target_std"], record["lr"],
        )  # fmt: skip
        patience = cfg.early_stopping_patience
        if p["epoch"] >= cfg.epochs:
            p["complete"] = True
        elif patience and p["bad_epochs"] >= patience:
            p["complete"] = p["early_stopped"] = True
            self.history["early_stopped"] = True
            log.info(
                "early stopping: no validation improvement for %d epoch(s); stopping after epoch %d of %d",
                patience, p["epoch"], cfg.epochs,
            )  # fmt: skip
        self._write_history()
        self._save()

    # -- stopping, saving, finishing ---------------------------------------------------------------

    def _stop_reason(self, *, epoch_ends_next: bool) -> Optional[str]:
        local = self.budget.reason(time.monotonic(), epoch_ends_next=epoch_ends_next)
        if local is None and self.signals.requested:
            local = f"signal {self.signals.received}"
        if not agree(local is not None, self.placement):
            return None
        # Another rank may have seen the signal first; every rank stops here, at the same step.
        return local or "signal (on another rank)"

    def _save(self) -> None:
        step = self.progress["micro"]
        if step == self.last_saved:
            return
        t0 = time.perf_counter()
        info = self.ckpt.save(self.state, step=step)
        self.last_saved = step
        self.budget.slowest_save = max(self.budget.slowest_save, time.perf_counter() - t0)
        log.debug("checkpoint step %d: %s (%d bytes, %.2fs)", step, info.url, info.nbytes, info.seconds)

    def _lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def _position(self) -> float:
        p = self.progress
        return hist.epoch_position(p["epoch"], p["micro_in_epoch"], self.micro_per_epoch)

    def _stop(self, reason: str) -> RunResult:
        p = self.progress
        hist.set_status(self.history, "incomplete", reason=reason)
        self._write_history()
        self._write_plot()
        log.warning(
            "stopped early (%s) at epoch %.2f of %d: checkpoint step %d in %s. Training is NOT complete; run "
            "the same command again to continue (exit 75).",
            reason, self._position(), self.cfg.epochs, p["micro"], self.ckpt.url,
        )  # fmt: skip
        return RunResult(False, reason, p["micro"], p["epoch"])

    def _finish(self) -> RunResult:
        p, cfg = self.progress, self.cfg
        self._save()
        reason = "early stopping" if p["early_stopped"] else "complete"
        # Under --fsdp a collective (every rank gathers, rank 0 receives the full weights).
        weights = export_state_dict(self.model, self.placement)
        if self.placement.is_main:
            metadata = {
                "format": "reference_trainer.ProfileEncoder",
                "last_epoch": p["epoch"],
                "epochs_planned": cfg.epochs,
                "early_stopped": p["early_stopped"],
                "optimizer_steps": p["opt_steps"],
                "micro_batches": p["micro"],
                "num_features": cfg.num_features,
                "model": MODEL_SHAPE,
                "target": cfg.target,
                "seed": cfg.seed,
            }
            url = self.out.write_bytes(FINAL_MODEL, final_model_bytes(weights, metadata))
            log.info("final weights (epoch %d of %d): %s", p["epoch"], cfg.epochs, url)
        # Only now, with the final weights written, may the history say "complete".
        hist.set_status(self.history, "complete", reason=reason)
        self._write_history()
        self._write_plot()
        log.info(
            "training complete (%s) after %d epoch(s), %d optimizer steps", reason, p["epoch"], p["opt_steps"]
        )
        return RunResult(True, reason, p["micro"], p["epoch"])

    def _write_history(self) -> None:
        if self.placement.is_main:
            self.out.write_bytes(HISTORY, json_bytes(self.history))

    def _write_plot(self) -> None:
        if not self.placement.is_main:
            return
        try:
            from reference_trainer.plot import render_loss_plot

            url = self.out.write_bytes(PLOT, render_loss_plot(self.history))
            log.info("loss curves: %s", url)
        except Exception as exc:  # a missing plot must never cost a checkpoint or an exit code
            log.warning(
                "could not write the loss plot (%s: %s); history.json has the same data",
                type(exc).__name__,
                exc,
            )

    def record_failure(self, exc: BaseException) -> None:
        """Mark the run failed in ``history.json`` (best effort: never raises, never hides ``exc``)."""
        if not self.placement.is_main:
            return
        try:
            error = f"{type(exc).__name__}: {exc}"
            history = self.history
            if not self._history_live:
                saved = self.out.read_bytes(HISTORY)
                if saved is None:
                    return
                history = json.loads(saved)
            if history.get("status") != "complete":
                hist.set_status(history, "failed", reason="error", error=error)
            else:
                history["last_error"] = error
            self.out.write_bytes(HISTORY, json_bytes(history))
        except Exception as inner:
            log.error("could not record the failure in %s: %s", self.out.join(HISTORY), inner)
