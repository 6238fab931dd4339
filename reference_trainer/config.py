"""The pretrainer's command line: every flag, parsed into one frozen :class:`PretrainConfig`.

Units are stated once, here, and mean the same everywhere (field lessons):

* ``--batch-size`` is always **per device**: per process under DDP and FSDP, per GPU under DataParallel, the
  whole micro-batch on one device. The global batch is ``batch size x devices x accumulation``.
* ``--warmup-steps`` and ``--save-every-steps`` count **optimizer steps**, not micro-batches.
* Checkpoint folders are numbered by **micro-batches** trained (the exact resume position, which may
  lie inside an accumulation window).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

__all__ = ["PretrainConfig", "UsageError", "build_parser", "parse_config"]


class UsageError(ValueError):
    """A flag or a combination of flags cannot work; the message names the flags and the fix."""


@dataclass(frozen=True)
class PretrainConfig:
    """Everything one pretrainer invocation was asked to do (see ``--help`` for each field)."""

    output_dir: str
    resume_from: str = "auto"
    epochs: int = 10
    batch_size: int = 64
    grad_accumulation: int = 1
    lr: float = 1e-3
    warmup_steps: int = 20
    seed: int = 0
    device: str = "auto"
    distributed: bool = False
    fsdp: bool = False
    data_parallel: bool = False
    save_every_steps: int = 50
    keep_last: int = 3
    max_epochs_per_run: Optional[float] = None
    time_budget: Optional[float] = None
    early_stopping_patience: int = 0
    num_workers: int = 0
    num_samples: int = 2048
    num_features: int = 128
    val_fraction: float = 0.1
    target: str = "unifrac"
    auto_batch_size: bool = False
    log_every: int = 10

    def training_config(self) -> dict[str, Any]:
        """The keys that define the training run, saved with every checkpoint and compared on resume.

        Operational flags (where to write, when to stop or save, how many workers) are left out: changing
        them between submissions is normal and is not drift.
        """
        keys = (
            "batch_size",
            "grad_accumulation",
            "lr",
            "warmup_steps",
            "epochs",
            "seed",
            "num_samples",
            "num_features",
            "val_fraction",
            "target",
            "early_stopping_patience",
        )
        full = asdict(self)
        return {k: full[k] for k in keys}


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``resumekit-pretrain`` / ``python -m reference_trainer``."""
    p = argparse.ArgumentParser(
        prog="resumekit-pretrain",
        description=(
            "Pretrain a profile encoder with a pairwise distance loss, killable at any instant. "
            "Exit 0: training complete. Exit 75: stopped early (time budget, --max-epochs-per-run or a "
            "signal) with a checkpoint; run the same command again to continue."
        ),
    )
    d = PretrainConfig(output_dir="")
    a = p.add_argument
    a(
        "--output-dir",
        required=True,
        metavar="URL",
        help="local path or fsspec URL (s3://..., gs://..., memory://...): checkpoints/, history.json, "
        "final/model.safetensors and loss_curves.png go here",
    )
    a(
        "--resume-from",
        default=d.resume_from,
        metavar="{auto,none,PATH}",
        help="auto: continue from the newest valid checkpoint in the output dir, if any (default); "
        "none: start fresh (refused if the output dir already holds checkpoints); PATH: a checkpoint "
        "folder (.../step-000000000120) or a checkpoints root to start from",
    )
    a("--epochs", type=int, default=d.epochs, help="epochs to train (default %(default)s)")
    a(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="samples per micro-batch PER DEVICE, in every mode (default %(default)s)",
    )
    a(
        "--grad-accumulation",
        type=int,
        default=d.grad_accumulation,
        help="micro-batches per optimizer step (default %(default)s)",
    )
    a("--lr", type=float, default=d.lr, help="peak learning rate of AdamW (default %(default)s)")
    a(
        "--warmup-steps",
        type=int,
        default=d.warmup_steps,
        help="linear warmup length in OPTIMIZER steps, then cosine decay (default %(default)s)",
    )
    a("--seed", type=int, default=d.seed, help="seeds the data, the split, the model and the order")
    a(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=d.device,
        help="auto: CUDA when available, else CPU (default %(default)s)",
    )
    a(
        "--distributed",
        action="store_true",
        help="DistributedDataParallel, one process per device; launch with torchrun (gloo on CPU, nccl on GPU)",
    )
    a(
        "--fsdp",
        action="store_true",
        help="FSDP2 (fully_shard per layer block + root), one process per device: parameters, gradients and "
        "optimizer state sharded over the ranks; launch with torchrun (gloo on CPU, nccl on GPU)",
    )
    a(
        "--data-parallel",
        action="store_true",
        help="nn.DataParallel over the visible GPUs in one process (needs CUDA)",
    )
    a(
        "--save-every-steps",
        type=int,
        default=d.save_every_steps,
        help="checkpoint every N OPTIMIZER steps, besides every epoch end and every stop; 0: only those "
        "(default %(default)s)",
    )
    a("--keep-last", type=int, default=d.keep_last, help="checkpoints kept (default %(default)s)")
    a(
        "--max-epochs-per-run",
        type=float,
        default=None,
        metavar="EPOCHS",
        help="stop (checkpoint, exit 75) after training this many epochs in this invocation; a float: "
        "0.5 is half an epoch",
    )
    a(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="checkpoint and exit 75 before this many seconds have passed since start",
    )
    a(
        "--early-stopping-patience",
        type=int,
        default=d.early_stopping_patience,
        help="stop when the validation loss has not improved for this many epochs; 0: off",
    )
    a("--num-workers", type=int, default=d.num_workers, help="DataLoader worker processes")
    a("--num-samples", type=int, default=d.num_samples, help="size of the synthetic dataset")
    a("--num-features", type=int, default=d.num_features, help="features (tree leaves) per profile")
    a("--val-fraction", type=float, default=d.val_fraction, help="share held out for validation (seeded)")
    a("--target", choices=("unifrac", "braycurtis"), default=d.target, help="target pairwise distance")
    a(
        "--auto-batch-size",
        action="store_true",
        help="on CUDA, grow the per-device batch size while a step fits in memory; skipped (with a "
        "warning) on CPU",
    )
    a(
        "--log-every",
        type=int,
        default=d.log_every,
        help="optimizer steps between plain log lines when stderr is not a terminal",
    )
    return p


def parse_config(argv: Optional[Sequence[str]] = None) -> PretrainConfig:
    """Parse and validate the command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The validated configuration.

    Raises:
        UsageError: A value is out of range, or flags contradict each other.
        SystemExit: ``--help``, or an argument argparse itself rejects (exit status 2).
    """
    ns = build_parser().parse_args(argv)
    cfg = PretrainConfig(**vars(ns))
    validate(cfg)
    return cfg


def validate(cfg: PretrainConfig) -> None:
    """Reject impossible values and contradictory flags before anything runs.

    Raises:
        UsageError: Naming the flag(s), the value and the fix.
    """
    if cfg.distributed and cfg.data_parallel:
        raise UsageError(
            "--distributed and --data-parallel cannot be combined: --distributed runs one process per "
            "device under torchrun (DDP), --data-parallel runs one process over all GPUs (nn.DataParallel). "
            "Pick one; see docs/pretrainer.md, 'DataParallel, DDP or FSDP'."
        )
    if cfg.fsdp and cfg.data_parallel:
        raise UsageError(
            "--fsdp and --data-parallel cannot be combined: --fsdp shards the model over one process per "
            "device under torchrun (FSDP2), --data-parallel replicates it over all GPUs of one process "
            "(nn.DataParallel). Pick one; see docs/pretrainer.md, 'DataParallel, DDP or FSDP'."
        )
    if cfg.fsdp and cfg.distributed:
        raise UsageError(
            "--fsdp and --distributed cannot be combined: both run one process per device under torchrun, "
            "--distributed with a full model copy on each (DDP), --fsdp with the model sharded (FSDP2). "
            "Pick one; see docs/pretrainer.md, 'DataParallel, DDP or FSDP'."
        )
    positive = {
        "--epochs": cfg.epochs,
        "--batch-size": cfg.batch_size,
        "--grad-accumulation": cfg.grad_accumulation,
        "--keep-last": cfg.keep_last,
        "--log-every": cfg.log_every,
        "--num-features": cfg.num_features,
    }
    for flag, value in positive.items():
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}.")
    non_negative = {
        "--warmup-steps": cfg.warmup_steps,
        "--seed": cfg.seed,
        "--save-every-steps": cfg.save_every_steps,
        "--early-stopping-patience": cfg.early_stopping_patience,
        "--num-workers": cfg.num_workers,
    }
    for flag, value in non_negative.items():
        if value < 0:
            raise UsageError(f"{flag} must be 0 or more, got {value}.")
    if cfg.num_samples < 4:
        raise UsageError(
            f"--num-samples must be at least 4 (train and validation pairs), got {cfg.num_samples}."
        )
    if not 0.0 < cfg.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be strictly between 0 and 1, got {cfg.val_fraction}.")
    if not (math.isfinite(cfg.lr) and cfg.lr >= 0):
        raise UsageError(f"--lr must be a finite number >= 0, got {cfg.lr}.")
    limits: dict[str, Optional[float]] = {
        "--max-epochs-per-run": cfg.max_epochs_per_run,
        "--time-budget": cfg.time_budget,
    }
    for flag, limit in limits.items():
        if limit is not None and not (math.isfinite(limit) and limit > 0):
            raise UsageError(f"{flag} must be a positive number, got {limit}.")
    if not cfg.output_dir:
        raise UsageError("--output-dir must not be empty.")
