"""Stress check of the exit hazard that tests/_dist.py works around (not collected by pytest).

Runs a bare 2-rank gloo job (init, a DistributedDataParallel module, all_reduce, destroy, normal exit)
N times, then the same work through :func:`tests._dist.launch`, and prints how often a rank aborted::

    .venv/bin/python tests/stress_gloo_exit.py 20

On the 2-core CI-like machine (torch 2.13.0, CPU): bare 4 aborts in 20; launch 0 in 30.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests._dist import free_port, launch


def _ddp_then_all_reduce(rank: int, world: int) -> None:
    module = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3))
    del module
    dist.all_reduce(torch.ones(3))


def _bare(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    _ddp_then_all_reduce(rank, 2)
    dist.destroy_process_group()  # then the interpreter's normal exit: where the abort happens


def main(n: int) -> None:
    bare = launched = 0
    for _ in range(n):
        try:
            mp.start_processes(_bare, args=(free_port(),), nprocs=2, start_method="spawn")
        except mp.ProcessExitedException:
            bare += 1
    for _ in range(n):
        try:
            launch(_ddp_then_all_reduce, 2, deadline=60)
        except mp.ProcessExitedException:
            launched += 1
    print(f"bare: {bare} of {n} runs aborted; tests._dist.launch: {launched} of {n}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
