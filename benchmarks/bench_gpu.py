"""GPU save, restore and async figures in one short run (called by ``benchmarks/gpu_check.sh``).

The state is a stack of ``nn.Linear`` layers on ``cuda:0`` with AdamW moments (``--state-gib``, default
1 GiB in all). One process, repetitions interleaved. Measured (wall time of the training thread, with
``torch.cuda.synchronize()`` before each timer starts):

- ``save``: ``Checkpointer.save`` (device-to-host one tensor at a time, fsync, commit);
- ``restore``: ``Checkpointer.restore`` into the live CUDA model and optimizer;
- ``save_async`` call time for ``staging="overlap"`` and ``"copy"``, as a share of ``save``;
- the first training step after each call against a step without a save (what the overlap costs);
- whole-loop overhead per checkpoint against a run without checkpoints;
- whether each checkpoint read back holds the values of its call.

Prints one markdown table on stdout (and writes it to ``--out`` when given). No figure is produced without
a CUDA device: the script exits with status 2.

Usage::

    .venv/bin/python benchmarks/bench_gpu.py --state-gib 1 --reps 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

import resumekit


def build(state_gib: float, width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layer = (width * width + width) * 4 * 3  # parameters + two AdamW moments
    n = max(1, round(state_gib * 2**30 / layer))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(n)]).cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def step(model: nn.Module, opt: torch.optim.Optimizer, width: int) -> None:
    x = torch.randn(256, width, device="cuda")
    loss = model(x).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def sums(model: nn.Module, opt: torch.optim.Optimizer) -> list[float]:
    ts = list(model.state_dict().values()) + [
        v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    ]
    return [float(torch.sum(t, dtype=torch.float64)) for t in ts]


def timed(fn: object) -> float:
    torch.cuda.synchronize()
    s = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-gib", type=float, default=1.0)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--dir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing measured", file=sys.stderr)
        return 2
    model, opt = build(args.state_gib, args.width)
    step(model, opt, args.width)
    live = {"model": model, "optimizer": opt}
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    )
    root = tempfile.mkdtemp(prefix="rk-gpu-", dir=args.dir)
    r: dict[str, list[float]] = {
        k: []
        for k in (
            "save",
            "restore",
            "overlap",
            "copy",
            "step",
            "after-overlap",
            "after-copy",
            "run-none",
            "run-overlap",
            "run-copy",
        )
    }
    preserved = True
    try:
        for rep in range(args.reps):
            ck = resumekit.Checkpointer(os.path.join(root, f"sync-{rep}"))
            r["save"].append(timed(lambda ck=ck: ck.save(live, step=1)))
            r["restore"].append(timed(lambda ck=ck: ck.restore(live)))
            for mode in ("none", "overlap", "copy"):
                ck = resumekit.Checkpointer(os.path.join(root, f"{mode}-{rep}"))
                expected: dict[int, list[float]] = {}
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                excluded = 0.0
                for i in range(args.steps):
                    dt = timed(lambda: step(model, opt, args.width))
                    if mode == "none":
                        r["step"].append(dt)
                    elif i % args.every == 1:
                        r[f"after-{mode}"].append(dt)  # the step right after a call
                    if mode != "none" and i % args.every == 0:
                        f0 = time.perf_counter()
                        expected[i] = sums(model, opt)
                        excluded += time.perf_counter() - f0
                        ck.wait()
                        r[mode].append(
                            timed(lambda ck=ck, i=i, mode=mode: ck.save_async(live, step=i, staging=mode))
                        )
                ck.close()
                torch.cuda.synchronize()
                r[f"run-{mode}"].append(time.perf_counter() - t0 - excluded)
                for s, want in expected.items():
                    ck.restore(live, step=s)
                    preserved = preserved and sums(model, opt) == want
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in r.items() if v}
    nckpt = len(range(0, args.steps, args.every))
    gb = state_bytes / 1e9
    rows = [
        ("sync save (device->host, fsync, commit)", med["save"], f"{gb / med['save']:.2f} GB/s"),
        ("restore into CUDA tensors", med["restore"], f"{gb / med['restore']:.2f} GB/s"),
        (
            "save_async call, staging=overlap",
            med["overlap"],
            f"{100 * med['overlap'] / med['save']:.2f}% of save",
        ),
        ("save_async call, staging=copy", med["copy"], f"{100 * med['copy'] / med['save']:.2f}% of save"),
        ("training step, no save", med["step"], "1.00x"),
        (
            "step right after an overlap call",
            med["after-overlap"],
            f"{med['after-overlap'] / med['step']:.2f}x",
        ),
        ("step right after a copy call", med["after-copy"], f"{med['after-copy'] / med['step']:.2f}x"),
        ("loop overhead per ckpt, overlap", (med["run-overlap"] - med["run-none"]) / nckpt, ""),
        ("loop overhead per ckpt, copy", (med["run-copy"] - med["run-none"]) / nckpt, ""),
    ]
    lines = [
        f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; state {gb:.3f} GB; "
        f"{args.reps} reps; values of the call preserved: {'yes' if preserved else 'NO'}",
        "",
        "| measurement | seconds (median) | note |",
        "|---|---:|---|",
        *[f"| {a} | {b:.4f} | {c} |" for a, b, c in rows],
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if preserved else 1


if __name__ == "__main__":
    raise SystemExit(main())
