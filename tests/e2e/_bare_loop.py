"""A training loop as a new user writes it: a bare DataLoader over a ResumableSampler, no ResumableLoader.

Run by tests/e2e/test_kill_resume_bare_loader.py: ``--kill-at N`` SIGKILLs the process in step N (after the
optimizer step, before that step's checkpoint); the same command without it resumes from the newest
checkpoint. Every step appends the sample indices it trained on and its loss to ``steps.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

import resumekit as rk

EPOCHS, EVERY = 3, 3


class Noisy(Dataset):
    """Random augmentation with torch, random and NumPy inside __getitem__."""

    def __len__(self) -> int:
        return 48

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x = (
            torch.tensor([i / 48.0])
            + 0.05 * torch.randn(1)
            + 0.01 * random.random()
            + 0.01 * np.random.rand()
        )
        return x.float(), torch.sin(3 * x).float(), i


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--kill-at", type=int, default=None)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    dataset = Noisy()
    sampler = rk.ResumableSampler(dataset, seed=7)
    model = torch.nn.Sequential(
        torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state: dict[str, Any] = {"model": model, "optimizer": opt, "sampler": sampler, "rng": rk.RNGState()}
    ckpt = rk.Checkpointer(str(out / "ckpt"), keep_last=2)
    restored = ckpt.restore(state)
    step = restored.step if restored else 0
    print(f"resumed from step {step}" if restored else "fresh start", flush=True)
    log = (out / "steps.jsonl").open("a")
    for epoch in range(sampler.epoch, EPOCHS):
        sampler.set_epoch(epoch)
        for x, y, index in DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=args.workers):
            x = x + 0.01 * torch.randn_like(x)  # random noise in the loop
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            log.write(json.dumps({"step": step, "indices": index.tolist(), "loss": loss.item().hex()}) + "\n")
            log.flush()
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if step % EVERY == 0:
                ckpt.save(state, step=step)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "final.safetensors"))


if __name__ == "__main__":
    main()
