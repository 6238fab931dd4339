"""A complete plain-PyTorch training loop made killable with resumekit.

Everything a real loop has that can break a resume: dropout, random augmentation inside two DataLoader
workers, shuffling, AdamW, a warmup + cosine schedule counted in optimizer steps, gradient accumulation
with checkpoints taken inside an accumulation window, and optionally DDP (launch with torchrun).

    python examples/train_plain.py --out runs/plain            # run (or continue) to the end
    python examples/train_plain.py --out runs/plain --kill-at 40  # SIGKILL itself after micro-batch 40

Run it again after a kill and it continues from the newest checkpoint. Every micro-batch's loss is
appended to ``losses-rank<R>.jsonl`` (as float.hex, so comparisons are bitwise) and the final weights go
to ``final.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

import resumekit as rk


class AugmentedData(Dataset):
    """A fixed synthetic regression set whose samples get random augmentation on every read."""

    def __init__(self, n: int = 384, dim: int = 16, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.tanh(self.x @ torch.randn(dim, 1, generator=g))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i] + 0.05 * torch.randn(self.x.shape[1])  # torch RNG in the worker
        if random.random() < 0.5:  # Python RNG in the worker
            x = x.flip(0)
        x = x * float(np.random.uniform(0.9, 1.1))  # NumPy RNG in the worker
        return x, self.y[i]


def lr_lambda(total_steps: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--accum", type=int, default=3, help="gradient accumulation (micro-batches per step)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--save-every", type=int, default=5, help="checkpoint every N micro-batches")
    p.add_argument("--kill-at", type=int, default=0, help="SIGKILL this process after micro-batch N")
    args = p.parse_args()

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    data = AugmentedData()
    model: torch.nn.Module = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(64, 1)
    )
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    sampler = rk.ResumableSampler(data, shuffle=True, seed=0)  # DistributedSampler semantics under DDP
    loader = rk.ResumableLoader(
        DataLoader(data, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers)
    )
    # The schedule counts optimizer steps, not micro-batches (a field lesson).
    steps_per_epoch = math.ceil(len(loader) / args.accum)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.epochs * steps_per_epoch, warmup=5))

    progress = {"micro": 0}
    state = {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "sampler": sampler,
        "progress": progress,
        "grads": rk.AccumulatedGradients(model),
        "rng": rk.RNGState(),
    }
    config = {"batch_size": args.batch_size, "grad_accumulation": args.accum}
    ckpt = rk.Checkpointer(out / "checkpoints", keep_last=2, config=config)
    restored = ckpt.restore(state)
    if rank == 0:
        print(f"resumed from step {restored.step}" if restored else "fresh start", flush=True)

    with open(out / f"losses-rank{rank}.jsonl", "a") as log:
        for epoch in range(sampler.epoch, args.epochs):
            sampler.set_epoch(epoch)
            for x, y in loader:
                loss = F.mse_loss(model(x), y) / args.accum
                loss.backward()
                progress["micro"] += 1
                log.write(json.dumps({"micro": progress["micro"], "loss": loss.item().hex()}) + "\n")
                log.flush()
                if progress["micro"] % args.accum == 0:
                    opt.step()
                    sched.step()
                    opt.zero_grad()
                if progress["micro"] % args.save_every == 0:
                    ckpt.save(state, step=progress["micro"])
                if progress["micro"] == args.kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        net = model.module if distributed else model
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "final.safetensors"))
        print(f"done after {progress['micro']} micro-batches", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
