"""Where the model runs: one device, DDP or FSDP2 (one process per device) or DataParallel (one process,
all GPUs).

Every impossible request is refused with a message instead of silently becoming something else:
``--data-parallel`` without a GPU does not quietly train on the CPU, ``--distributed`` outside torchrun
(or ``--fsdp``) does not quietly train one process, and torchrun without either does not start N
independent runs writing into the same folder.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from reference_trainer.config import PretrainConfig, UsageError

__all__ = [
    "Placement",
    "agree",
    "barrier",
    "left_process_group",
    "resolve_placement",
    "shutdown",
    "wrap_model",
]

_left_group = False

log = logging.getLogger("reference_trainer")

Mode = Literal["single", "ddp", "fsdp", "dp"]


@dataclass(frozen=True)
class Placement:
    """The resolved parallel layout of this process.

    Attributes:
        mode: ``"single"``, ``"ddp"``, ``"fsdp"`` or ``"dp"``.
        device: This process's (first) device.
        rank: This process's rank (0 unless DDP or FSDP).
        world_size: Number of processes.
        gpus_per_process: Devices one process drives (DataParallel: every visible GPU; else 1).
    """

    mode: Mode
    device: torch.device
    rank: int = 0
    world_size: int = 1
    gpus_per_process: int = 1

    @property
    def devices(self) -> int:
        """Devices training in total: processes x devices per process."""
        return self.world_size * self.gpus_per_process

    @property
    def multiprocess(self) -> bool:
        """Whether this process is one rank of a process group (DDP or FSDP): ranks must act together."""
        return self.mode in ("ddp", "fsdp")

    @property
    def is_main(self) -> bool:
        """Whether this process writes the shared outputs (history, plot, final weights)."""
        return self.rank == 0


def _torchrun_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_placement(cfg: PretrainConfig) -> Placement:
    """Check the device flags against the machine and, for DDP, join the process group.

    Raises:
        UsageError: The flags cannot be honoured here (no GPU, not under torchrun, ...).
    """
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise UsageError(
            "--device cuda was requested but torch sees no CUDA device (torch.cuda.is_available() is False); "
            "use --device cpu or --device auto, or check the driver / CUDA_VISIBLE_DEVICES."
        )
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and cuda)
    if cfg.data_parallel:
        return _data_parallel(cfg, cuda)
    if cfg.distributed or cfg.fsdp:
        return _join_group(use_cuda, "fsdp" if cfg.fsdp else "ddp")
    if _torchrun_world() > 1:
        raise UsageError(
            f"this process was started by torchrun with WORLD_SIZE={_torchrun_world()} but without "
            "--distributed or --fsdp: every process would train the same run on its own and write into "
            "the same output dir. Add --distributed (DDP) or --fsdp (FSDP2), or launch without torchrun."
        )
    return Placement(
        "single", torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    )


def _data_parallel(cfg: PretrainConfig, cuda: bool) -> Placement:
    if cfg.device == "cpu" or not cuda:
        why = "--device cpu was given" if cfg.device == "cpu" else "no CUDA GPU is visible"
        raise UsageError(
            f"--data-parallel needs CUDA GPUs, but {why}. nn.DataParallel only splits work across GPUs; "
            "on CPU, drop --data-parallel (one process) or use --distributed under torchrun (several "
            "gloo processes)."
        )
    if _torchrun_world() > 1:
        raise UsageError(
            "--data-parallel runs one process over every visible GPU; it was started by torchrun with "
            f"WORLD_SIZE={_torchrun_world()}. Use --distributed under torchrun, or run --data-parallel "
            "without torchrun."
        )
    count = torch.cuda.device_count()
    if count == 1:
        log.warning("--data-parallel with a single visible GPU: nn.DataParallel adds nothing but overhead.")
    return Placement("dp", torch.device("cuda", 0), gpus_per_process=count)


def _join_group(use_cuda: bool, mode: Mode) -> Placement:
    flag = "--fsdp" if mode == "fsdp" else "--distributed"
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise UsageError(
            f"{flag} needs the environment torchrun sets up ({', '.join(missing)} missing). Launch "
            f"with: torchrun --nproc_per_node N -m reference_trainer {flag} ... (or python -m "
            "torch.distributed.run ...)."
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                "start at most one process per GPU (--nproc_per_node)."
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    return Placement(mode, device, rank=dist.get_rank(), world_size=dist.get_world_size())


def wrap_model(model: nn.Module, placement: Placement) -> nn.Module:
    """Wrap the (already placed) model for the placement; the bare model stays what is checkpointed.

    Under FSDP2 there is no wrapper: the model itself is sharded in place and returned.
    """
    if placement.mode == "fsdp":
        from reference_trainer.fsdp import shard_model

        return shard_model(model, placement)
    if placement.mode == "ddp":
        ids = [placement.device.index] if placement.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if placement.mode == "dp":
        return nn.DataParallel(model)
    return model


def agree(flag: bool, placement: Placement) -> bool:
    """True on every rank if ``flag`` is true on any rank (so all ranks stop at the same step)."""
    if not placement.multiprocess:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=placement.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(placement: Placement) -> None:
    """Wait until every rank got here (so no rank exits while rank 0 still writes the outputs)."""
    if placement.multiprocess and dist.is_initialized():
        dist.barrier()


def shutdown(placement: Placement) -> None:
    """Leave the process group, if this process joined one."""
    global _left_group
    if placement.multiprocess and dist.is_initialized():
        dist.destroy_process_group()
        _left_group = True


def left_process_group() -> bool:
    """True once :func:`shutdown` left a process group in this process."""
    return _left_group
