"""Sharded save and restore: resumekit against torch.distributed.checkpoint on the same FSDP2 state.

    .venv/bin/python benchmarks/bench_sharded.py --world 2 --mib 256 [--world 4] [--repeat 3]

Each world size runs in gloo processes on the CPU: an FSDP2 model of ``--mib`` MiB of float32
parameters plus AdamW state (3x the parameters in all), then, per repeat, ``Checkpointer.save`` /
``dcp.save``, ``Checkpointer.save_async`` (blocking part and total) / ``dcp.async_save``, and
``Checkpointer.restore`` / ``dcp.load`` into fresh objects. resumekit fsyncs and checksums every byte;
DCP does neither. Times are the slowest rank's, median of the repeats; results are written to
``benchmarks/results/bench_sharded.json``.
"""

# ruff: noqa: B023  (each closure is called at once, inside the iteration that defines it)

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import resumekit as rk


def _build(mib: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    width = 1024
    layers = max(1, (mib << 20) // (4 * width * width))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return model, opt


def _timed(fn: Any) -> float:
    if os.environ.get("BENCH_TRACE"):
        print(f"rank {dist.get_rank()} {getattr(fn, '__name__', fn)}", file=sys.stderr, flush=True)
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    t = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _worker(rank: int, world: int, port: int, mib: int, repeat: int, tmp: str, out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, opt = _build(mib)
    # DCP's async save runs collectives in a background thread: on the default group they would
    # interleave with this benchmark's barriers (a hang), so it gets its own, as resumekit does.
    async_group = dist.new_group(backend="gloo")
    times: dict[str, list[float]] = {}
    for i in range(repeat):
        rk_dir, dcp_dir = f"{tmp}/rk-{i}", f"{tmp}/dcp-{i}"
        ckpt = rk.Checkpointer(rk_dir)
        state = {"model": model, "optimizer": opt}
        times.setdefault("resumekit save", []).append(_timed(lambda: ckpt.save(state, step=1)))

        def dcp_save() -> None:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=dcp_dir)

        times.setdefault("dcp save", []).append(_timed(dcp_save))
        blocking = _timed(lambda: ckpt.save_async(state, step=2))
        total = blocking + _timed(ckpt.wait)
        times.setdefault("resumekit save_async blocking", []).append(blocking)
        times.setdefault("resumekit save_async total", []).append(total)
        fut: list[Any] = []

        def dcp_async() -> None:
            msd, osd = get_state_dict(model, opt)
            fut.append(
                dcp.async_save(
                    {"model": msd, "optimizer": osd},
                    checkpoint_id=dcp_dir + "-async",
                    process_group=async_group,
                )
            )

        blocking = _timed(dcp_async)
        total = blocking + _timed(lambda: fut[0].result())
        times.setdefault("dcp async_save blocking", []).append(blocking)
        times.setdefault("dcp async_save total", []).append(total)
        fresh, fresh_opt = _build(mib)
        times.setdefault("resumekit restore", []).append(
            _timed(lambda: rk.Checkpointer(rk_dir).restore({"model": fresh, "optimizer": fresh_opt}, step=1))
        )
        fresh2, fresh_opt2 = _build(mib)

        def dcp_load() -> None:
            msd, osd = get_state_dict(fresh2, fresh_opt2)
            sd = {"model": msd, "optimizer": osd}
            dcp.load(sd, checkpoint_id=dcp_dir)
            set_state_dict(fresh2, fresh_opt2, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])

        times.setdefault("dcp load", []).append(_timed(dcp_load))
        dist.barrier()
        if rank == 0:
            shutil.rmtree(rk_dir, ignore_errors=True)
            for d in (dcp_dir, dcp_dir + "-async"):
                shutil.rmtree(d, ignore_errors=True)
        dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps({k: statistics.median(v) for k, v in times.items()}))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, action="append", help="world sizes (default: 2 and 4)")
    ap.add_argument("--mib", type=int, default=256, help="parameter MiB (the optimizer adds twice that)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, Any] = {"mib_parameters": args.mib, "repeat": args.repeat, "torch": torch.__version__}
    for world in args.world or [2, 4]:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = f"{tmp}/result.json"
            mp.start_processes(
                _worker,
                args=(world, port, args.mib, args.repeat, tmp, out),
                nprocs=world,
                start_method="spawn",
            )
            results[f"world {world}"] = json.loads(Path(out).read_text())
        print(f"world {world}:")
        for k, v in results[f"world {world}"].items():
            print(f"  {k:32s} {v:8.3f} s")
    dest = Path(__file__).resolve().parent / "results" / "bench_sharded.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
