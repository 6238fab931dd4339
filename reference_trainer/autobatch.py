"""``--auto-batch-size``: grow the per-device batch while a training step fits in GPU memory.

Field lesson: a feature silently switched off. On CPU there is no device memory to probe, so the flag is
skipped **with a warning** naming the batch size actually used. The size found on a GPU is recorded in
the output dir and reused by every resubmission, so a resumed run never changes its batch size.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from reference_trainer.data import TargetDistance
from reference_trainer.devices import Placement
from reference_trainer.loss import pairwise_loss
from reference_trainer.outputs import OutputDir

__all__ = ["RECORD", "choose_batch_size"]

log = logging.getLogger("reference_trainer")

RECORD = "auto_batch_size.json"


def choose_batch_size(
    requested: int,
    *,
    enabled: bool,
    placement: Placement,
    model: nn.Module,
    profiles: torch.Tensor,
    target: TargetDistance,
    out: OutputDir,
) -> int:
    """The per-device batch size to train with.

    Args:
        requested: ``--batch-size`` (per device); also the probe's starting point.
        enabled: ``--auto-batch-size`` was given.
        placement: Where training runs.
        model: The bare model (copied for the probe; the original and every RNG are left untouched).
        profiles: Training profiles to probe with (at most this many per device are tried).
        target: The target distance.
        out: The output dir (where the chosen size is recorded).

    Returns:
        ``requested`` unless probing on CUDA found a larger size that fits.
    """
    if not enabled:
        return requested
    if placement.device.type != "cuda":
        log.warning(
            "--auto-batch-size is SKIPPED on %s: it probes GPU memory and there is none here. Training with "
            "--batch-size %d per device.",
            placement.device.type.upper(),
            requested,
        )
        return requested
    recorded = out.read_bytes(RECORD)
    if recorded is not None:
        size = int(json.loads(recorded)["batch_size"])
        log.info("--auto-batch-size: reusing the batch size %d per device chosen by the first run", size)
        return size
    size = _probe(requested, model, profiles, target, placement)
    if placement.multiprocess:
        t = torch.tensor([size], device=placement.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        size = int(t.item())
    if placement.is_main:
        out.write_bytes(RECORD, json.dumps({"batch_size": size}).encode())
    log.info("--auto-batch-size: %d per device (requested %d)", size, requested)
    return size


def _probe(
    start: int, model: nn.Module, profiles: torch.Tensor, target: TargetDistance, placement: Placement
) -> int:
    limit = max(start, len(profiles) // max(1, placement.world_size))
    probe = copy.deepcopy(model).to(placement.device)
    best = start
    size: Optional[int] = start
    with torch.random.fork_rng(devices=[placement.device]):
        while size is not None and size <= limit:
            try:
                x = profiles[: size * placement.gpus_per_process].to(placement.device)
                net = nn.DataParallel(probe) if placement.mode == "dp" else probe
                pairwise_loss(net(x), x, target, gather=False).loss.backward()
                best = size
                size = size * 2 if size * 2 <= limit else None
            except torch.cuda.OutOfMemoryError:
                size = None
            finally:
                probe.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
    del probe
    return best
