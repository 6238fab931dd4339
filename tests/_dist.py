"""Process launch for the multi-process tests: a deadline on every world, and an exit that cannot abort.

Why the exit is special: once a ``DistributedDataParallel`` module has existed in a process, gloo's
threads outlive ``destroy_process_group()`` (torch 2.13), and the interpreter's normal exit then aborts
now and then with ``terminate called without an active exception`` (SIGABRT): 4 runs in 20 of a bare
``init / DDP / all_reduce / destroy`` on 2 ranks here, and one CI failure of ``test_ddp_pairs``. A rank
that finished its work therefore meets the others at a barrier, leaves the group and ends with
``os._exit(0)`` (as :func:`tests.integration._sharded_helpers.fork_worlds` does for forked ranks):
nothing that matters runs in the interpreter's teardown, and a crash there can no longer fail a test
whose ranks all succeeded. A rank that raised still exits through ``torch.multiprocessing``, so its
traceback reaches the test.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int,
    fn: Callable[..., None],
    world: int,
    port: int,
    args: tuple[Any, ...],
    pg_timeout: float | None,
    backend: str = "gloo",
    meet: bool = True,
) -> None:
    """One rank: join the group, run ``fn``, meet the others at a barrier (unless ``meet`` is false:
    the kill tests' survivors finish alone), leave the group and exit at once."""
    faulthandler.enable(all_threads=True)  # a native crash prints every thread's Python stack
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if backend == "nccl":  # one GPU a rank, chosen before the group exists
        torch.cuda.set_device(rank)
    timeout = None if pg_timeout is None else timedelta(seconds=pg_timeout)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    try:
        fn(rank, world, *args)
        if meet:
            dist.barrier()  # no rank leaves while another still talks to it
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(
    fn: Callable[..., None],
    world: int,
    *args: Any,
    deadline: float = 120.0,
    backend: str = "gloo",
    pg_timeout: float | None = None,
) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned processes in one ``backend`` process group
    (``nccl``: rank r on GPU r); raise the first rank's failure; kill them all and raise
    :class:`TimeoutError` past ``deadline`` s. ``pg_timeout`` (s) bounds every collective."""
    ctx = mp.start_processes(
        _entry,
        args=(fn, world, free_port(), args, pg_timeout, backend),
        nprocs=world,
        start_method="spawn",
        join=False,
    )
    end = time.monotonic() + deadline
    while not ctx.join(timeout=max(0.1, end - time.monotonic())):
        if time.monotonic() >= end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__} at world {world} did not finish within {deadline} s (a hang)")
