"""How fast does resumekit save and restore ~1 GiB to S3, next to the fastest raw s3fs transfer of the same bytes?

One process, one run, one S3 server: moto in its own process on 127.0.0.1 (so the server does not
share the client's GIL), started and stopped by this script. Every method moves the same tensor bytes
(``--size-gb`` GiB of float32 in 64 MiB tensors, split into four checkpoint entries, so resumekit
writes four safetensors objects and the raw methods four plain objects of the same bytes) and the
repetitions are interleaved across methods, so drift of the machine hits every method alike. Medians
are reported.

Methods (save / restore):

- ``s3fs pipe/cat`` (only with ``--include-pipe``): ``fs.pipe({path: data})`` (the objects at once,
  each in s3fs's own multipart of 50 MiB parts, in batches of 10) / ``fs.cat(paths)`` (one GET per
  object, at once). Measured once with a single 1 GiB object on this machine: 18 MiB/s save, 32 MiB/s
  restore, slower than ``raw parallel``; left out of the default run to keep it under five minutes.
- ``raw parallel``: the fastest raw transfer found here: every object as a multipart upload of 64 MiB
  parts, 8 parts in flight across all objects, straight from memory through s3fs's ``_call_s3`` /
  ranged GETs of 32 MiB, 8 in flight across all objects, each into its preallocated buffer. No
  checksum, no format, no commit protocol.
- ``resumekit``: ``Checkpointer.save`` (safetensors + JSON + crc32c in the same pass, streamed
  parallel multipart of 64 MiB parts, one file after the other, manifest PUT create-only, retention)
  / ``Checkpointer.restore`` (manifest, parallel ranged GETs of 32 MiB per file, crc32c verification,
  tensors back into the state).

Throughput is tensor bytes over wall time. The ratio compares resumekit with the faster raw method of
each direction. moto (Python, md5 of every part, copies on complete) is the ceiling on this machine:
the absolute numbers say little about AWS, the ratios say how much resumekit adds on top of the
transfer itself.

Usage::

    .venv/bin/python benchmarks/bench_s3.py                      # 1 GiB, 2 reps, writes results/s3.md/png
    .venv/bin/python benchmarks/bench_s3.py --include-pipe --reps 1   # also s3fs pipe_file/cat_file
    .venv/bin/python benchmarks/bench_s3.py --size-gb 0.1 --reps 1 --no-write   # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path[:0] = [REPO, os.path.join(REPO, "tests", "storage")]

from servers import moto_s3_server  # noqa: E402

import resumekit as rk  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
#: Four objects of a quarter each. One 1 GiB object makes moto's CompleteMultipartUpload take 15+ s,
#: and under load its re-sent completes fail with a 500 (KeyError inside moto), so a single-object
#: run is not reliably repeatable here. A real checkpoint is several files too (model, optimizer...).
ENTRIES = 4
ALL_METHODS = ("s3fs pipe/cat", "raw parallel", "resumekit")
METHODS: tuple[str, ...] = ALL_METHODS  # narrowed by --include-pipe / its absence in main()


@dataclass
class Timing:
    """Wall times of one method, one entry per repetition."""

    save: list[float] = field(default_factory=list)
    restore: list[float] = field(default_factory=list)


def build_state(size_gb: float) -> tuple[dict[str, Any], int]:
    """``ENTRIES`` entries of float32 tensors (64 MiB each, the last one of an entry shorter)."""
    total = int(size_gb * GIB) // (4 * ENTRIES) * 4 * ENTRIES
    per_entry = total // ENTRIES
    g = torch.Generator().manual_seed(0)
    state: dict[str, Any] = {}
    for e in range(ENTRIES):
        tensors = {}
        for i, start in enumerate(range(0, per_entry, 64 * MIB)):
            tensors[f"t{i:03d}"] = torch.rand(min(64 * MIB, per_entry - start) // 4, generator=g)
        state[f"part{e}"] = tensors
    return state, total


def flat_bytes(state: dict[str, Any]) -> list[bytearray]:
    """Each entry's tensor bytes back to back: the objects the raw methods move."""
    out = []
    for entry in state.values():
        buf = bytearray()
        for t in entry.values():
            buf += t.numpy().tobytes()
        out.append(buf)
    return out


async def _parallel_put(fs: Any, paths: list[str], datas: list[bytearray], part: int, conc: int) -> None:
    """Multipart uploads of every object at once, ``conc`` parts in flight across all of them."""
    sem = asyncio.Semaphore(conc)

    async def one(path: str, data: bytearray) -> None:
        bucket, key, _ = fs.split_path(path)
        mpu = await fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key)

        async def upload(i: int, start: int) -> dict[str, Any]:
            async with sem:
                r = await fs._call_s3(
                    "upload_part",
                    Bucket=bucket,
                    Key=key,
                    UploadId=mpu["UploadId"],
                    PartNumber=i + 1,
                    Body=data[start : start + part],
                )
                return {"PartNumber": i + 1, "ETag": r["ETag"]}

        parts = await asyncio.gather(*(upload(i, s) for i, s in enumerate(range(0, len(data), part))))
        await fs._call_s3(
            "complete_multipart_upload",
            Bucket=bucket,
            Key=key,
            UploadId=mpu["UploadId"],
            MultipartUpload={"Parts": list(parts)},
        )

    await asyncio.gather(*(one(p, d) for p, d in zip(paths, datas)))


async def _parallel_get(fs: Any, paths: list[str], outs: list[Any], part: int, conc: int) -> None:
    """Ranged GETs of every object at once, ``conc`` in flight, each straight into its buffer."""
    sem = asyncio.Semaphore(conc)

    async def get(path: str, view: memoryview, start: int) -> None:
        end = min(start + part, len(view))
        async with sem:
            view[start:end] = await fs._cat_file(path, start=start, end=end)

    await asyncio.gather(
        *(get(p, memoryview(o), s) for p, o in zip(paths, outs) for s in range(0, len(o), part))
    )


def _clock() -> float:
    return time.perf_counter()


def one_method(
    method: str,
    fs: Any,
    storage_options: dict[str, Any],
    prefix: str,
    state: dict[str, Any],
    datas: list[bytearray],
) -> tuple[float, float]:
    """Save then restore the bytes once with ``method``; check them; return (save s, restore s)."""
    from fsspec.asyn import sync

    objs = [f"{prefix}/object{i}" for i in range(len(datas))]
    if method == "s3fs pipe/cat":
        blobs = {o: bytes(d) for o, d in zip(objs, datas)}  # what users usually have
        t0 = _clock()
        fs.pipe(blobs)  # s3fs uploads the objects concurrently, each as its own multipart
        t1 = _clock()
        del blobs
        got = fs.cat(objs)
        t2 = _clock()
        ok = all(got[o] == d for o, d in zip(objs, datas))
    elif method == "raw parallel":
        t0 = _clock()
        sync(fs.loop, _parallel_put, fs, objs, datas, 64 * MIB, 8)
        t1 = _clock()
        # Uninitialised memory, as resumekit uses: a zero-filled bytearray would touch every page twice.
        outs = [torch.empty(len(d), dtype=torch.uint8).numpy() for d in datas]
        sync(fs.loop, _parallel_get, fs, objs, outs, 32 * MIB, 8)
        t2 = _clock()
        ok = all(o.tobytes() == d for o, d in zip(outs, datas))
    else:
        ckpt = rk.Checkpointer(f"s3://{prefix}", storage_options=storage_options)
        ckpt.steps()  # client creation, outside the timings (as for the raw filesystem)
        target: dict[str, Any] = {name: {} for name in state}
        t0 = _clock()
        ckpt.save(state, step=1)
        t1 = _clock()
        ckpt.restore(target)
        t2 = _clock()
        ok = all(torch.equal(t, target[e][k]) for e, ts in state.items() for k, t in ts.items())
    if not ok:
        raise RuntimeError(f"{method}: the bytes read back differ from the bytes written")
    return t1 - t0, t2 - t1


def run(args: argparse.Namespace) -> tuple[dict[str, Timing], dict[str, Any]]:
    """Start moto, run every method ``args.reps`` times (interleaved), stop moto; return the timings."""
    import s3fs

    state, nbytes = build_state(args.size_gb)
    datas = flat_bytes(state)
    timings = {m: Timing() for m in METHODS}
    info: dict[str, Any] = {"bytes": nbytes, "load_before": os.getloadavg()}
    with moto_s3_server(subprocess=True) as ep:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **ep.storage_options)
        base = f"{ep.bucket}/bench-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(f"{base}/warm", b"x")  # client creation and first connection, outside the timings
        fs.cat_file(f"{base}/warm")
        for rep in range(args.reps):
            for method in METHODS:
                prefix = f"{base}/{rep}-{method.replace(' ', '-').replace('/', '-')}"
                save_s, restore_s = one_method(method, fs, ep.storage_options, prefix, state, datas)
                timings[method].save.append(save_s)
                timings[method].restore.append(restore_s)
                fs.rm(prefix, recursive=True)  # moto keeps everything in memory
                print(
                    f"rep {rep + 1}/{args.reps} {method:>14}: save {save_s:6.1f} s, restore {restore_s:6.1f} s",
                    flush=True,
                )
    info["load_after"] = os.getloadavg()
    return timings, info


def _mibs(nbytes: int, seconds: float) -> float:
    return nbytes / MIB / seconds


def report(
    args: argparse.Namespace, timings: dict[str, Timing], info: dict[str, Any], argv: list[str]
) -> str:
    """The results as Markdown."""
    import aiobotocore
    import moto
    import s3fs

    n = info["bytes"]
    med = {m: (statistics.median(t.save), statistics.median(t.restore)) for m, t in timings.items()}
    raw = [m for m in METHODS if m != "resumekit"]
    best_save = min(med[m][0] for m in raw)
    best_restore = min(med[m][1] for m in raw)
    rk_save, rk_restore = med["resumekit"]
    lines = [
        "# resumekit vs raw s3fs on S3 (moto, loopback)",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in ['.venv/bin/python', 'benchmarks/bench_s3.py', *argv])}`",
        "",
        f"{n / GIB:.2f} GiB of float32 tensors, median of {args.reps} interleaved repetition(s). "
        f"{os.cpu_count()} CPUs, load average {info['load_before'][0]:.1f} before and "
        f"{info['load_after'][0]:.1f} after (other jobs shared the machine). Python "
        f"{platform.python_version()}, torch {torch.__version__}, s3fs {s3fs.__version__}, aiobotocore "
        f"{aiobotocore.__version__}, moto {moto.__version__} (server in its own process).",
        "",
        "| method | save s | save MiB/s | restore s | restore MiB/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in METHODS:
        s, r = med[m]
        lines.append(f"| {m} | {s:.1f} | {_mibs(n, s):.0f} | {r:.1f} | {_mibs(n, r):.0f} |")
    lines += [
        "",
        "| resumekit / fastest raw (throughput) | ratio |",
        "|---|---:|",
        f"| save | {best_save / rk_save:.2f}x |",
        f"| restore | {best_restore / rk_restore:.2f}x |",
        "",
        "Spread between repetitions (slowest / fastest, save and restore): "
        + ", ".join(
            f"{m} {max(t.save) / min(t.save):.2f} / {max(t.restore) / min(t.restore):.2f}"
            for m, t in timings.items()
        )
        + ". On this shared machine a ratio within that spread of 1.0 is a tie, not a difference.",
        "",
        "All repetitions (seconds, save / restore):",
        "",
    ]
    for m in METHODS:
        pairs = ", ".join(f"{s:.1f}/{r:.1f}" for s, r in zip(timings[m].save, timings[m].restore))
        lines.append(f"- {m}: {pairs}")
    lines.append("")
    return "\n".join(lines)


def write_chart(path: str, timings: dict[str, Timing], nbytes: int) -> None:
    """A grouped bar chart of median MiB/s per method and direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.38
    for j, (label, pick) in enumerate((("save", "save"), ("restore", "restore"))):
        vals = [_mibs(nbytes, statistics.median(getattr(timings[m], pick))) for m in METHODS]
        xs = [i + (j - 0.5) * width for i in range(len(METHODS))]
        bars = ax.bar(xs, vals, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(METHODS)), METHODS)
    ax.set_ylabel("MiB/s (median)")
    ax.set_title(f"{nbytes / GIB:.2f} GiB to moto S3 on loopback")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print and (unless --no-write) write results/s3.md and results/s3.png."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=1.0, help="GiB of tensor data (default 1)")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions (default 2)")
    p.add_argument("--no-write", action="store_true", help="print only; do not write results/")
    p.add_argument("--include-pipe", action="store_true", help="also time s3fs pipe_file/cat_file")
    args = p.parse_args(argv)
    global METHODS
    METHODS = ALL_METHODS if args.include_pipe else tuple(m for m in ALL_METHODS if m != "s3fs pipe/cat")
    t0 = time.perf_counter()
    timings, info = run(args)
    text = report(args, timings, info, argv)
    text += f"\nWall time of the whole run: {time.perf_counter() - t0:.0f} s.\n"
    print("\n" + text)
    if not args.no_write:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "s3.md"), "w") as f:
            f.write(text)
        write_chart(os.path.join(RESULTS, "s3.png"), timings, info["bytes"])
        print(f"wrote {os.path.join(RESULTS, 's3.md')} and s3.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
