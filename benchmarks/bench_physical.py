"""How close are ``save`` and ``restore`` to the physical limit of this disk for the *same files*?

One process, one run, repetitions interleaved. The state is the ``bench_async_blocking.py`` model
(``nn.Linear`` stack + AdamW moments, CPU). Four measurements per repetition:

- ``resumekit save``: ``Checkpointer.save`` (fsync of every file, manifest, rename, parent fsync);
- ``raw parallel write``: the very bytes of that checkpoint's files (read into memory beforehand), written
  into a fresh folder with the same number of threads resumekit used (``min(parallel_files, files of
  8 MB or more)``), each file fsynced, then the folder: the limit for writing those files from memory;
- ``resumekit restore``: ``Checkpointer.restore`` into the live model and optimizer (checksums included);
- ``raw parallel read``: the same files read into preallocated memory in 64 MiB positional reads by the
  same number of threads resumekit's reader uses (4), no checksum: the limit for reading them.

Page cache: before each read measurement the cache is dropped where the kernel allows
(``/proc/sys/vm/drop_caches``); the results say whether it was.

Usage::

    .venv/bin/python benchmarks/bench_physical.py                 # ~1-2 minutes
    .venv/bin/python benchmarks/bench_physical.py --params-mb 40 --reps 2
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_async_blocking as bab  # noqa: E402
import bench_save_restore as bsr  # noqa: E402

import resumekit  # noqa: E402

CHUNK = 64 << 20
WRITEBACK = 32 << 20  # resumekit.storage.local._WRITEBACK_BYTES
READ_THREADS = 4  # resumekit.format.tensorfile._READ_WORKERS
WRITE_THREADS_MAX = 4  # LocalStorage.parallel_files
BIG = 8 << 20  # resumekit.engine.save._PARALLEL_MIN_BYTES


def checkpoint_files(step_dir: str) -> dict[str, bytes]:
    """Every file of a committed checkpoint, by name, read into memory."""
    out = {}
    for name in sorted(os.listdir(step_dir)):
        with open(os.path.join(step_dir, name), "rb") as f:
            out[name] = f.read()
    return out


def raw_write(folder: str, files: dict[str, bytes], threads: int, early: bool = False) -> None:
    """Write ``files`` into ``folder`` from memory with ``threads`` threads, fsync each and the folder;
    ``early``: after every 32 MiB, hint the kernel to start writing them back (as resumekit does)."""
    os.makedirs(folder)

    def one(name: str) -> None:
        fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            mv = memoryview(files[name])
            step = WRITEBACK if early else CHUNK
            for i in range(0, len(mv), step):
                os.write(fd, mv[i : i + step])
                if early:
                    os.posix_fadvise(fd, i, len(mv[i : i + step]), os.POSIX_FADV_DONTNEED)
            os.fsync(fd)
        finally:
            os.close(fd)

    names = sorted(files, key=lambda n: -len(files[n]))
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(one, names))
    dfd = os.open(folder, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)


def raw_read(folder: str, buffers: dict[str, bytearray]) -> None:
    jobs: list[tuple[int, memoryview, int]] = []
    fds = {}
    for name, buf in buffers.items():
        fds[name] = os.open(os.path.join(folder, name), os.O_RDONLY)
        mv = memoryview(buf)
        for i in range(0, len(buf), CHUNK):
            jobs.append((fds[name], mv[i : i + CHUNK], i))
    try:
        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            list(pool.map(lambda j: os.preadv(j[0], [j[1]], j[2]), jobs))
    finally:
        for fd in fds.values():
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params-mb", type=float, default=150.0)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results", "physical"))
    args = p.parse_args(argv)
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    model, opt = bab.build_model(args.params_mb, args.width)
    bab.train_step(model, opt, 8, args.width)
    live = {"model": model, "optimizer": opt}
    root = tempfile.mkdtemp(prefix="rk-physical-", dir=args.dir)
    res: dict[str, list[float]] = {
        "save": [],
        "raw_write": [],
        "raw_early": [],
        "restore": [],
        "raw_read": [],
    }
    dropped = []
    try:
        ref = resumekit.Checkpointer(os.path.join(root, "ref"))
        ref.save(live, step=0)
        step_dir = os.path.join(root, "ref", "step-000000000000")
        files = checkpoint_files(step_dir)
        data_bytes = sum(len(b) for b in files.values())
        threads = min(WRITE_THREADS_MAX, sum(1 for b in files.values() if len(b) >= BIG))
        buffers = {n: bytearray(len(b)) for n, b in files.items()}
        for rep in range(args.reps):
            folder = os.path.join(root, f"rk-{rep}")
            ck = resumekit.Checkpointer(folder)
            order = ["save", "raw_write", "raw_early"]
            for what in order[rep % 3 :] + order[: rep % 3]:
                os.sync()
                s = time.perf_counter()
                if what == "save":
                    ck.save(live, step=1)
                elif what == "raw_write":
                    raw_write(os.path.join(root, f"raw-{rep}"), files, threads)
                else:
                    raw_write(os.path.join(root, f"early-{rep}"), files, threads, early=True)
                res[what].append(time.perf_counter() - s)
            for what in ["restore", "raw_read"] if rep % 2 == 0 else ["raw_read", "restore"]:
                dropped.append(bsr.drop_caches())
                s = time.perf_counter()
                if what == "restore":
                    ck.restore(live)
                else:
                    raw_read(os.path.join(root, f"raw-{rep}"), buffers)
                res[what].append(time.perf_counter() - s)
            shutil.rmtree(folder)
            shutil.rmtree(os.path.join(root, f"raw-{rep}"))
            shutil.rmtree(os.path.join(root, f"early-{rep}"))
            print({k: round(v[-1], 3) for k, v in res.items()}, flush=True)
        machine = bsr.describe_machine(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    cache = (
        "dropped before every read" if all(dropped) else "could not be dropped (reads may hit the page cache)"
    )
    cmd = ".venv/bin/python benchmarks/bench_physical.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    gb = data_bytes / 1e9
    lines = [
        "# `save` / `restore` against a raw parallel write / read of the same files",
        "",
        "Produced by (from the repository root):",
        "",
        "```",
        cmd,
        "```",
        "",
        f"- Date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}; whole script "
        f"{time.perf_counter() - t_start:.0f} s.",
        f"- Machine: {machine['cpu']}; RAM {machine['ram']}; disk {machine['disk']}; torch {machine['torch']}; "
        f"resumekit {machine['resumekit']}.",
        f"- Load: 1-minute load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} "
        "CPUs shared with other jobs (absolute times are noisy; each pair is measured back to back, order "
        "alternating).",
        f"- Files: {len(files)} ({', '.join(f'{n} {len(b) / 1e6:.0f} MB' for n, b in files.items())}); "
        f"{gb:.3f} GB in all. Write threads {threads} (as resumekit used), read threads {READ_THREADS}.",
        f"- Page cache: {cache}. {args.reps} repetitions, medians.",
        "- raw parallel write = the checkpoint's own bytes from memory, same threads, fsync of every file "
        "and of the folder (no checksum, no manifest, no rename). raw + early write-back = the same, with the "
        "hint resumekit's local storage gives every 32 MiB (`posix_fadvise(DONTNEED)`, which starts the disk "
        "on the bytes written so far): the limit for a writer that knows the trick. raw parallel read = the "
        "same files into preallocated memory, 64 MiB positional reads (no checksum, no validation).",
        "",
        "| measurement | seconds, median | min-max | GB/s | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, label, base in (
        ("raw_write", "raw parallel write", None),
        ("raw_early", "raw parallel write + early write-back (limit)", "raw_write"),
        ("save", "resumekit save", "raw_early"),
        ("raw_read", "raw parallel read (limit)", None),
        ("restore", "resumekit restore", "raw_read"),
    ):
        v = res[k]
        ratio = (
            f"{med[k] / med[base]:.2f}x {'raw' if base == 'raw_read' else base.replace('_', ' ')}"
            if base
            else "1.00x"
        )
        lines.append(f"| {label} | {med[k]:.3f} | {min(v):.3f}-{max(v):.3f} | {gb / med[k]:.2f} | {ratio} |")
    lines += [
        "",
        "## Targets (issue 15)",
        "",
        "| target | measured | met |",
        "|---|---:|:---:|",
        f"| save within 1.05x of the raw parallel write | {med['save'] / med['raw_write']:.2f}x | "
        f"{'yes' if med['save'] <= 1.05 * med['raw_write'] else 'no'} |",
        f"| save within 1.05x of the raw parallel write with the same write-back hint | "
        f"{med['save'] / med['raw_early']:.2f}x | {'yes' if med['save'] <= 1.05 * med['raw_early'] else 'no'} |",
        f"| restore within 1.05x of the raw parallel read | {med['restore'] / med['raw_read']:.2f}x | "
        f"{'yes' if med['restore'] <= 1.05 * med['raw_read'] else 'no'} |",
        "",
        "## Every repetition",
        "",
        "| rep | save | raw write | raw + early write-back | restore | raw read |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for i in range(args.reps):
        lines.append(
            f"| {i} | {res['save'][i]:.3f} | {res['raw_write'][i]:.3f} | {res['raw_early'][i]:.3f} | "
            f"{res['restore'][i]:.3f} | {res['raw_read'][i]:.3f} |"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    _ = Any
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
