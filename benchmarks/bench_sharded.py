"""Sharded save and restore: resumekit against torch.distributed.checkpoint on the same FSDP2 state.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_sharded.py                       # world 2 and 4, ~3 minutes
    .venv/bin/python benchmarks/bench_sharded.py --world 2 --mib 16 --reps 1

Each world size runs in gloo processes on the CPU: an FSDP2 (``fully_shard``) stack of
``nn.Linear(1024, 1024)`` layers of ``--mib`` MiB of float32 parameters, seeded, stepped once with
AdamW (two moments: 3x the parameters in all). Per repetition, on that same live state, back to back
(the library that goes first alternates):

- ``Checkpointer.save`` vs ``dcp.save`` (state dicts from ``get_state_dict``, as DCP documents);
- ``Checkpointer.save_async`` vs ``dcp.async_save``: the blocking call, and the total until durable;
  the first save of a new ``Checkpointer`` (fresh staging buffers) against DCP's default (a stager
  created per call: fresh buffers); and the blocking call as a training loop sees it from its second
  save on, with staging buffers reused: one ``Checkpointer`` for the run against one ``DefaultStager``
  passed to every ``dcp.async_save`` (DCP then reuses its cached CPU storages);
- ``Checkpointer.restore`` vs ``dcp.load`` + ``set_state_dict``, each into freshly built objects, the
  page cache dropped before each where the kernel allows; every restored tensor is then compared
  with the live one (not timed), so both libraries are seen to load the same values.

Times are the slowest rank's (barrier, run, barrier, max over ranks). Durability and checks differ, see
the notes the script writes: resumekit fsyncs every file and the step folder and checks the crc32c of
every byte it reads; DCP's ``FileSystemWriter`` fsyncs each data file and its ``.metadata`` by default
(``sync_files=True``), not the folder, and keeps no checksum. Results go to
``benchmarks/results/sharded.md``.
"""

# ruff: noqa: B023  (each closure is called at once, inside the iteration that defines it)

from __future__ import annotations

import argparse
import json
import os
import shlex
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_save_restore as bsr  # noqa: E402

import resumekit as rk  # noqa: E402

WIDTH = 1024
#: (key, label); each resumekit measurement is compared with the DCP one that follows it.
PAIRS = (
    ("rk_save", "dcp_save", "save", "`Checkpointer.save`", "`dcp.save`"),
    (
        "rk_async_block",
        "dcp_async_block",
        "async save, blocking call",
        "`save_async` call",
        "`dcp.async_save` call",
    ),
    (
        "rk_async_steady",
        "dcp_async_steady",
        "async save, blocking call, buffers reused",
        "`save_async` call, one Checkpointer",
        "`dcp.async_save` call, one `DefaultStager`",
    ),
    (
        "rk_async_total",
        "dcp_async_total",
        "async save, until durable",
        "`save_async` + `wait`",
        "`async_save` + `result()`",
    ),
    ("rk_restore", "dcp_load", "restore", "`Checkpointer.restore`", "`dcp.load` + `set_state_dict`"),
)


def _build(mib: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    layers = max(1, (mib << 20) // (4 * WIDTH * WIDTH))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(1)
    model(torch.randn(2, WIDTH)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _fresh(mib: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Objects of the same layout whose values differ from the saved ones (so a restore must load)."""
    model, opt = _build(mib)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for st in opt.state.values():
            for v in st.values():
                v.zero_()
    return model, opt


def _local(t: Any) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _same(
    a: tuple[torch.nn.Module, torch.optim.Optimizer], b: tuple[torch.nn.Module, torch.optim.Optimizer]
) -> bool:
    ok = all(torch.equal(_local(p), _local(q)) for p, q in zip(a[0].parameters(), b[0].parameters()))
    for p, q in zip(a[0].parameters(), b[0].parameters()):
        sa, sb = a[1].state[p], b[1].state[q]
        ok = ok and sa.keys() == sb.keys() and all(torch.equal(_local(sa[k]), _local(sb[k])) for k in sa)
    return ok


def _timed(fn: Any) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _drop(rank: int) -> bool:
    """Rank 0 drops the page cache (every rank shares this machine's); all ranks learn whether it could."""
    dist.barrier()
    ok = torch.tensor([1 if rank != 0 or bsr.drop_caches() else 0])
    dist.broadcast(ok, 0)
    return bool(ok.item())


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _worker(rank: int, world: int, port: int, mib: int, reps: int, tmp: str, out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # world ranks share 2 cores; intra-op threads would only fight
    dist.init_process_group("gloo", rank=rank, world_size=world)
    live = _build(mib)
    model, opt = live
    state = {"model": model, "optimizer": opt}
    # DCP's async save runs collectives in a background thread: on the default group they would
    # interleave with this benchmark's barriers (a hang), so it gets its own, as resumekit does.
    async_group = dist.new_group(backend="gloo")
    # The steady state of a training loop: one checkpointer (one stager) for every save, warmed up once.
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    run_ckpt = rk.Checkpointer(f"{tmp}/rk-run", keep_last=1)
    run_stager = DefaultStager(StagingOptions(False, False, False, False))
    run_ckpt.save_async(state, step=0)
    run_ckpt.wait()
    msd, osd = get_state_dict(model, opt)
    dcp.async_save(
        {"model": msd, "optimizer": osd},
        checkpoint_id=f"{tmp}/dcp-run-warm",
        process_group=async_group,
        async_stager=run_stager,
    ).result()
    res: dict[str, list[float]] = {k: [] for p in PAIRS for k in p[:2]}
    dropped: list[bool] = []
    equal: list[bool] = []
    sizes: dict[str, int] = {}
    for i in range(reps):
        rk_dir, dcp_dir = f"{tmp}/rk-{i}", f"{tmp}/dcp-{i}"
        ckpt = rk.Checkpointer(rk_dir)

        def rk_save() -> None:
            res["rk_save"].append(_timed(lambda: ckpt.save(state, step=1)))

        def dcp_save() -> None:
            def run() -> None:
                msd, osd = get_state_dict(model, opt)
                dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=dcp_dir)

            res["dcp_save"].append(_timed(run))

        def rk_async() -> None:
            blocking = _timed(lambda: ckpt.save_async(state, step=2))
            res["rk_async_block"].append(blocking)
            res["rk_async_total"].append(blocking + _timed(ckpt.wait))

        def dcp_async() -> None:
            fut: list[Any] = []

            def call() -> None:
                msd, osd = get_state_dict(model, opt)
                sd = {"model": msd, "optimizer": osd}
                fut.append(dcp.async_save(sd, checkpoint_id=dcp_dir + "-async", process_group=async_group))

            blocking = _timed(call)
            res["dcp_async_block"].append(blocking)
            res["dcp_async_total"].append(blocking + _timed(lambda: fut[0].result()))

        def rk_steady() -> None:
            res["rk_async_steady"].append(_timed(lambda: run_ckpt.save_async(state, step=i + 1)))
            _timed(run_ckpt.wait)

        def dcp_steady() -> None:
            fut: list[Any] = []

            def call() -> None:
                msd, osd = get_state_dict(model, opt)
                sd = {"model": msd, "optimizer": osd}
                fut.append(
                    dcp.async_save(
                        sd,
                        checkpoint_id=f"{dcp_dir}-steady",
                        process_group=async_group,
                        async_stager=run_stager,
                    )
                )

            res["dcp_async_steady"].append(_timed(call))
            _timed(lambda: fut[0].result())

        def rk_restore() -> None:
            fresh = _fresh(mib)
            dropped.append(_drop(rank))
            into = {"model": fresh[0], "optimizer": fresh[1]}
            res["rk_restore"].append(_timed(lambda: rk.Checkpointer(rk_dir).restore(into, step=1)))
            equal.append(_same(live, fresh))

        def dcp_load() -> None:
            fresh = _fresh(mib)
            dropped.append(_drop(rank))

            def run() -> None:
                msd, osd = get_state_dict(fresh[0], fresh[1])
                sd = {"model": msd, "optimizer": osd}
                dcp.load(sd, checkpoint_id=dcp_dir)
                set_state_dict(
                    fresh[0], fresh[1], model_state_dict=sd["model"], optim_state_dict=sd["optimizer"]
                )

            res["dcp_load"].append(_timed(run))
            equal.append(_same(live, fresh))

        first_rk = i % 2 == 0
        for a, b in (
            (rk_save, dcp_save),
            (rk_async, dcp_async),
            (rk_steady, dcp_steady),
            (rk_restore, dcp_load),
        ):
            if rank == 0:
                os.sync()  # earlier writes must not be flushed inside the next measurement
            dist.barrier()
            (a if first_rk else b)()
            if rank == 0:
                os.sync()
            dist.barrier()
            (b if first_rk else a)()
        dist.barrier()
        if rank == 0:
            if i == 0:
                # The sync save's step alone (the async save's step 2 sits beside it).
                sizes = {"resumekit": _tree_bytes(f"{rk_dir}/step-000000000001"), "dcp": _tree_bytes(dcp_dir)}
            for d in (rk_dir, dcp_dir, dcp_dir + "-async", dcp_dir + "-steady"):
                shutil.rmtree(d, ignore_errors=True)
        dist.barrier()
    run_stager.close()
    ok = torch.tensor([int(all(equal))])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if rank == 0:
        payload = {"times": res, "dropped": all(dropped), "equal": bool(ok.item()), "sizes": sizes}
        Path(out).write_text(json.dumps(payload))
    dist.destroy_process_group()


def _run_world(world: int, mib: int, reps: int, base: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rk-sharded-", dir=base) as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = f"{tmp}/result.json"
        mp.start_processes(
            _worker, args=(world, port, mib, reps, tmp, out), nprocs=world, start_method="spawn"
        )
        got: dict[str, Any] = json.loads(Path(out).read_text())
        got["machine"] = bsr.describe_machine(tmp)
        return got


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, action="append", help="world sizes (default: 2 and 4)")
    p.add_argument("--mib", type=int, default=128, help="parameter MiB (AdamW adds twice that)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: the temp dir)")
    p.add_argument("--out", default=str(HERE / "results" / "sharded"))
    args = p.parse_args(argv)
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    worlds = args.world or [2, 4]
    results = {}
    for world in worlds:
        results[world] = _run_world(world, args.mib, args.reps, args.dir)
        med = {k: statistics.median(v) for k, v in results[world]["times"].items()}
        print(f"world {world}: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()), flush=True)
    load1 = os.getloadavg()[0]
    cmd = ".venv/bin/python benchmarks/bench_sharded.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    lines = _report(args, worlds, results, cmd.rstrip(), time.perf_counter() - t_start, load0, load1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _report(
    args: argparse.Namespace,
    worlds: list[int],
    results: dict[int, dict[str, Any]],
    cmd: str,
    took: float,
    load0: float,
    load1: float,
) -> list[str]:
    import safetensors

    machine = results[worlds[0]]["machine"]
    layers = max(1, (args.mib << 20) // (4 * WIDTH * WIDTH))
    state_mb = 3 * layers * WIDTH * WIDTH * 4 / 1e6
    dropped = all(r["dropped"] for r in results.values())
    lines = [
        "# Sharded (FSDP2) save and restore against torch.distributed.checkpoint",
        "",
        "Produced by (from the repository root):",
        "",
        "```",
        cmd,
        "```",
        "",
        f"- Date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}; whole script {took:.0f} s.",
        f"- Machine: {machine['cpu']}; RAM {machine['ram']}; disk {machine['disk']}.",
        f"- Versions: torch {machine['torch']}, safetensors {safetensors.__version__}, Python "
        f"{sys.version.split()[0]}; resumekit {machine['resumekit']}.",
        f"- Load: 1-minute load average {load0:.1f} before, {load1:.1f} after, on {os.cpu_count()} CPUs "
        "shared with other jobs; every world's ranks are processes on these same 2 cores (absolute times "
        "are noisy; each pair is measured back to back, the library going first alternating).",
        f"- State: FSDP2 `fully_shard` per layer and on the root, {layers} x `nn.Linear({WIDTH}, {WIDTH}, "
        f"bias=False)` float32, seeded, one AdamW step: parameters + `exp_avg` + `exp_avg_sq` = "
        f"{state_mb:.0f} MB across all ranks (the same state for both libraries). On disk, one sync save: "
        + "; ".join(
            f"world {w}: resumekit {r['sizes']['resumekit'] / 1e6:.0f} MB, DCP {r['sizes']['dcp'] / 1e6:.0f} MB"
            for w, r in results.items()
        )
        + ".",
        "- Process groups: gloo on the CPU, one process a rank; `torch.set_num_threads(1)` per rank. Times are "
        "the slowest rank's (barrier, call, barrier, max over ranks).",
        f"- Page cache: {'dropped before every restore and load' if dropped else 'could not be dropped (reads may hit the page cache)'}; "
        "`os.sync()` before every save.",
        f"- {args.reps} repetitions per world size; medians, min-max over the repetitions. Every restore and load "
        f"was checked (untimed) to reproduce every live parameter and AdamW moment bit for bit: "
        f"{'yes' if all(r['equal'] for r in results.values()) else 'NO'}.",
        "- What each does. resumekit `save`: each rank writes only its own chunks, plus a chunk index "
        "(crc32c of every chunk) and a manifest (crc32c of every file) written last; every file and the step "
        "folder fsynced, the folder renamed into place. `dcp.save` (torch's `FileSystemWriter`, defaults): "
        "one file a rank, each fsynced (`sync_files=True` is the default), `.metadata` (pickle) written to a "
        "temporary name, fsynced and renamed; the folder is not fsynced; no checksum. resumekit `restore`: "
        "reads only the chunks this rank's shards overlap and checks the crc32c of every byte it reads "
        "against the chunk index, itself checked against the manifest; strict validation of names, shapes and "
        "dtypes before any state changes. `dcp.load`: unpickles `.metadata`, `torch.load(weights_only=True)` "
        "of each chunk, no checksum. `save_async` (default `staging='overlap'`) and `dcp.async_save` "
        "(default: stage to CPU memory, write in a thread) give the same durability as their sync saves. "
        "'buffers reused': the second and later saves of one `Checkpointer` (its staging buffers are kept "
        "between saves) against `dcp.async_save` with one `DefaultStager` passed to every call (it caches "
        "its CPU copies); the other async rows use a new `Checkpointer` and DCP's default stager per call.",
        "",
    ]
    targets = []
    for w in worlds:
        t = results[w]["times"]
        med = {k: statistics.median(v) for k, v in t.items()}
        lines += [
            f"## World {w}",
            "",
            "| measurement | resumekit s, median | min-max | DCP s, median | min-max | resumekit / DCP |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for rk_k, dcp_k, label, _, _ in PAIRS:
            lines.append(
                f"| {label} | {med[rk_k]:.3f} | {min(t[rk_k]):.3f}-{max(t[rk_k]):.3f} | {med[dcp_k]:.3f} | "
                f"{min(t[dcp_k]):.3f}-{max(t[dcp_k]):.3f} | {med[rk_k] / med[dcp_k]:.2f}x |"
            )
            targets.append((w, label, med[rk_k] / med[dcp_k]))
        lines.append("")
    lines += [
        "## Targets (issue 13): no slower than DCP, while fsyncing and checksumming every byte",
        "",
        "| world | measurement | resumekit / DCP, median | met (<= 1.00x) |",
        "|---:|---|---:|:---:|",
    ]
    for w, label, ratio in targets:
        lines.append(f"| {w} | {label} | {ratio:.2f}x | {'yes' if ratio <= 1.0 else 'no'} |")
    lines += ["", "## Every repetition (seconds)", ""]
    for w in worlds:
        t = results[w]["times"]
        keys = [k for p in PAIRS for k in p[:2]]
        heads = [f"{lab_rk} | {lab_dcp}" for _, _, _, lab_rk, lab_dcp in PAIRS]
        lines += [
            f"World {w}:",
            "",
            "| rep | " + " | ".join(heads) + " |",
            "|---:|" + "---:|" * len(keys),
        ]
        for i in range(args.reps):
            lines.append(f"| {i} | " + " | ".join(f"{t[k][i]:.3f}" for k in keys) + " |")
        lines.append("")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
