"""How do save and restore costs grow with the size of the state, 100 MB to 3 GB?

One process, one run. For each size a stack of ``nn.Linear`` layers plus its Adam state (after one step;
parameters are a third of the bytes) is built, and three methods save it to local disk and restore it
into the live model and optimizer, repetitions interleaved across methods:

- ``raw``: one sequential write of every tensor's bytes + fsync / ``readinto`` the tensors (the disk's limit);
- ``resumekit``: ``Checkpointer.save`` / ``Checkpointer.restore``;
- ``torch.save``: ``torch.save`` + fsync / ``torch.load(weights_only=True)`` + ``load_state_dict``.

The methods, the state and the machine description are those of ``bench_save_restore.py`` (imported,
not copied), so the numbers line up with that benchmark's. The page cache is dropped before every timed
restore where the process may. Before each size the free RAM and disk are checked; a size that does not
fit is skipped and the report says so. Every file is removed as soon as it has been restored.

Usage::

    .venv/bin/python benchmarks/bench_scaling.py                      # 0.1, 0.3, 1, 3 GB; ~5-8 minutes
    .venv/bin/python benchmarks/bench_scaling.py --sizes 0.1,0.3 --reps 1 --no-write
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_save_restore as bsr  # noqa: E402  (the methods, the state and the machine description)

METHODS = ("raw", "resumekit", "torch.save")
#: Restore-only diagnostic: the raw file read into a newly allocated buffer (what a restore into a fresh
#: process pays for tensors that do not exist yet, e.g. Adam's moments before its first step, and what
#: ``torch.load`` always pays), to separate the cost of fresh memory from the cost of the disk.
FRESH = "raw-fresh"
OPS: dict[str, tuple[str, ...]] = {"save": METHODS, "restore": (*METHODS, FRESH)}
LABELS = {
    ("raw", "save"): "raw write + fsync",
    ("raw", "restore"): "raw read",
    ("resumekit", "save"): "resumekit save",
    ("resumekit", "restore"): "resumekit restore",
    ("torch.save", "save"): "torch.save + fsync",
    ("torch.save", "restore"): "torch.load(weights_only=True)",
    (FRESH, "restore"): "raw read into a new buffer",
}


@dataclass
class Point:
    """Every repetition of every method at one state size."""

    target_gb: float
    state_bytes: int = 0
    layers: int = 0
    width: int = 0
    seconds: dict[str, list[float]] = field(default_factory=dict)  # "method/op" -> seconds per rep
    skipped: str = ""

    def med(self, method: str, op: str) -> float:
        """Median seconds of ``method``'s ``op`` ("save" or "restore"); NaN when not measured."""
        xs = self.seconds.get(f"{method}/{op}", [])
        return float(statistics.median(xs)) if xs else float("nan")


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def room_for(size_bytes: float, workdir: str) -> str:
    """Why a state of ``size_bytes`` cannot be measured here, or "" when it can.

    RAM: the state plus what ``torch.load`` materialises (a full second copy) plus 1 GB of slack. Disk:
    one method's files at a time (each removed after its restore) plus 2 GB of slack.
    """
    ram, disk = _mem_available(), shutil.disk_usage(workdir).free
    need_ram, need_disk = 2 * size_bytes + 1e9, size_bytes + 2e9
    print(
        f"  check: {ram / 1e9:.1f} GB RAM available (need {need_ram / 1e9:.1f}), "
        f"{disk / 1e9:.0f} GB disk free (need {need_disk / 1e9:.1f})",
        flush=True,
    )
    if ram < need_ram:
        return f"skipped: {ram / 1e9:.1f} GB RAM available, {need_ram / 1e9:.1f} GB needed"
    if disk < need_disk:
        return f"skipped: {disk / 1e9:.1f} GB disk free, {need_disk / 1e9:.1f} GB needed"
    return ""


def read_fresh(path: str) -> float:
    """Seconds to read ``path`` into newly allocated, uninitialised memory (``torch.empty``, uint8).

    The buffer's pages are first touched by the read itself: the cost over "raw read" (which reads into
    the live tensors, already resident) is the cost of fresh memory on this machine.
    """
    import torch

    t0 = time.perf_counter()
    size = os.path.getsize(path)
    buf = torch.empty(size, dtype=torch.uint8)
    view = buf.numpy().data  # a writable memoryview of the tensor's bytes
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                raise EOFError(f"{path} ended after {got} of {size} bytes")
            got += n
    seconds = time.perf_counter() - t0
    del view, buf
    return seconds


def measure(point: Point, args: argparse.Namespace, workdir: str, can_drop: bool) -> None:
    """Build the state for ``point`` and run every method ``args.reps`` times."""
    size_bytes = point.target_gb * 1e9
    point.skipped = room_for(size_bytes, workdir)
    if point.skipped:
        print(f"  {point.target_gb} GB {point.skipped}", flush=True)
        return
    # Adam after one step holds exp_avg and exp_avg_sq per parameter: parameters are a third of the state.
    model, opt = bsr.build_state(size_bytes / 3 / bsr.GIB)
    tensors = bsr.state_tensors(model, opt)
    point.state_bytes = bsr.nbytes_of(tensors)
    point.layers, point.width = len(model), model[0].in_features
    reference = bsr._fingerprint(tensors)
    del tensors
    methods = bsr.make_methods(model, opt, list(METHODS))
    print(
        f"size {point.target_gb} GB: {point.layers} x Linear({point.width}, {point.width}) + Adam = "
        f"{point.state_bytes / 1e9:.3f} GB",
        flush=True,
    )
    try:
        for rep in range(args.reps):
            order = methods[rep % len(methods) :] + methods[: rep % len(methods)]
            for m in order:
                path = os.path.join(workdir, m.name)
                os.sync()  # earlier writeback must not be billed to this save
                t0 = time.perf_counter()
                m.save(path)
                save_s = time.perf_counter() - t0
                bsr._perturb(model, opt)
                if not (can_drop and bsr.drop_caches()):
                    os.sync()
                if m.restore is None:
                    raise RuntimeError(f"{m.name} has no restore of its own; pick methods that do")
                t0 = time.perf_counter()
                m.restore(path)
                restore_s = time.perf_counter() - t0
                if bsr._fingerprint(bsr.state_tensors(model, opt)) != reference:
                    raise RuntimeError(f"{m.name}: the restored state differs from the saved one")
                if m.name == "raw":
                    if not (can_drop and bsr.drop_caches()):
                        os.sync()
                    point.seconds.setdefault(f"{FRESH}/restore", []).append(read_fresh(path))
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
                point.seconds.setdefault(f"{m.name}/save", []).append(save_s)
                point.seconds.setdefault(f"{m.name}/restore", []).append(restore_s)
                print(
                    f"  rep {rep + 1}/{args.reps} {m.name:10s} save {save_s:6.2f} s  restore {restore_s:6.2f} s"
                    f"  load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    finally:
        del methods, model, opt
        gc.collect()


# -- report -------------------------------------------------------------------------------------------


def _r(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a == a and b == b and b else "-"


def growth(points: list[Point], method: str, op: str) -> float:
    """Least-squares slope of log(seconds) on log(bytes): 1.0 is linear growth, below 1 is sublinear."""
    xy = [
        (math.log(p.state_bytes), math.log(p.med(method, op)))
        for p in points
        if p.state_bytes and p.med(method, op) == p.med(method, op)
    ]
    if len(xy) < 2:
        return float("nan")
    mx = sum(x for x, _ in xy) / len(xy)
    my = sum(y for _, y in xy) / len(xy)
    den = sum((x - mx) ** 2 for x, _ in xy)
    return sum((x - mx) * (y - my) for x, y in xy) / den if den else float("nan")


def tables(points: list[Point]) -> str:
    """Two markdown tables: seconds and GB/s per size, and resumekit's ratios per size."""
    done = [p for p in points if not p.skipped]
    cols = [(m, op) for op in ("save", "restore") for m in OPS[op]]
    head = "| state | " + " | ".join(LABELS[c] for c in cols) + " |"
    out = [
        "**Seconds, median (GB/s)**",
        "",
        head,
        "|---|" + "---:|" * len(cols),
    ]
    for p in done:
        gb = p.state_bytes / 1e9
        cells = []
        for m, op in cols:
            t = p.med(m, op)
            cells.append(f"{t:.3f} ({gb / t:.2f})" if t == t else "-")
        out.append(f"| {gb:.3f} GB | " + " | ".join(cells) + " |")
    out.append("| growth exponent | " + " | ".join(f"{growth(done, m, op):.2f}" for m, op in cols) + " |")
    out += [
        "",
        "**Ratios (same run, medians)**",
        "",
        "| state | save / raw write | save / torch.save | restore / raw read | restore / torch.load |",
        "|---|---:|---:|---:|---:|",
    ]
    for p in done:
        out.append(
            f"| {p.state_bytes / 1e9:.3f} GB | {_r(p.med('resumekit', 'save'), p.med('raw', 'save'))} "
            f"| {_r(p.med('resumekit', 'save'), p.med('torch.save', 'save'))} "
            f"| {_r(p.med('resumekit', 'restore'), p.med('raw', 'restore'))} "
            f"| {_r(p.med('resumekit', 'restore'), p.med('torch.save', 'restore'))} |"
        )
    for p in points:
        if p.skipped:
            out += ["", f"{p.target_gb} GB: {p.skipped}"]
    return "\n".join(out)


def targets(points: list[Point]) -> list[tuple[str, str, bool]]:
    """Issue 8's ratio targets at every measured size: (target, measured per size, met at all sizes)."""
    done = [p for p in points if not p.skipped]
    checks = (
        ("save <= 1.15x raw write", "save", "raw", 1.15, False),
        ("save faster than torch.save + fsync", "save", "torch.save", 1.0, True),
        ("restore no slower than torch.load(weights_only=True)", "restore", "torch.save", 1.0, False),
        ("restore <= 1.2x raw read", "restore", "raw", 1.2, False),
    )
    out = []
    for name, op, other, limit, strict in checks:
        ratios = [p.med("resumekit", op) / p.med(other, op) for p in done]
        ok = all(r < limit if strict else r <= limit for r in ratios)
        shown = ", ".join(f"{p.state_bytes / 1e9:.1f} GB: {r:.2f}x" for p, r in zip(done, ratios))
        out.append((name, shown, ok))
    return out


def write_chart(path: str, points: list[Point], cache: str) -> None:
    """Seconds vs state size, log-log: every method's save (solid) and restore (dashed), with a linear guide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [p for p in points if not p.skipped]
    colors = {"raw": "#888888", "resumekit": "#d62728", "torch.save": "#1f77b4", FRESH: "#2ca02c"}
    fig, ax = plt.subplots(figsize=(9, 6))
    xs = [p.state_bytes / 1e9 for p in done]
    for op, ls, mk in (("save", "-", "o"), ("restore", "--", "s")):
        for m in OPS[op]:
            ys = [p.med(m, op) for p in done]
            lo = [y - min(p.seconds[f"{m}/{op}"]) for y, p in zip(ys, done)]
            hi = [max(p.seconds[f"{m}/{op}"]) - y for y, p in zip(ys, done)]
            ax.errorbar(
                xs,
                ys,
                yerr=[lo, hi],
                ls=ls,
                marker=mk,
                ms=5,
                capsize=3,
                color=colors[m],
                label=LABELS[(m, op)],
            )
    if done:
        ref = done[0].med("raw", "save")
        ax.plot(xs, [ref * x / xs[0] for x in xs], color="k", lw=0.8, ls=":", label="linear in size (guide)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("state size (GB, model + Adam state)")
    ax.set_ylabel("seconds (median; bars min-max)")
    ax.set_title(f"Save (fsync included) and restore vs state size, local disk, {cache}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(
    path: str,
    command: str,
    points: list[Point],
    info: dict[str, Any],
    machine: dict[str, str],
    args: argparse.Namespace,
) -> None:
    """The results file: command, machine, setup, the tables, the targets and every repetition."""
    lines = [
        "# Save and restore cost vs state size",
        "",
        "Produced by (from the repository root):",
        "",
        f"```\n{command}\n```",
        "",
        f"- Date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}; whole script {info['wall_s']:.0f} s.",
        f"- Machine: {machine['cpu']}; RAM {machine['ram']}; disk {machine['disk']}; kernel {machine['kernel']}.",
        f"- Shared machine: 1-minute load average {min(info['load']):.1f}-{max(info['load']):.1f} during the run "
        f"on {os.cpu_count()} CPUs (other jobs ran). Ratios compare methods interleaved in the same run.",
        f"- Software: Python {machine['python']}, torch {machine['torch']}; resumekit from {machine['resumekit']}.",
        "- State per size: `nn.Linear` layers (float32) + Adam `exp_avg`, `exp_avg_sq`, `step` after one step "
        "(parameters are a third of the bytes), built by `bench_save_restore.build_state`. GB = 1e9 bytes.",
        f"- {args.reps} repetition(s) per size, method order rotated per repetition; median shown. Save includes "
        "every fsync. Restore = state back in the live model and optimizer (resumekit also verifies crc32c).",
        "- Page cache before each restore: "
        + (
            "**dropped** (`echo 3 > /proc/sys/vm/drop_caches`): every restore reads from the disk."
            if info["drop_caches"]
            else "**not dropped** (not permitted): restores read from the page cache."
        ),
        '- "raw read into a new buffer" is a diagnostic, restore only: the raw file read (cold) into newly '
        "allocated, uninitialised memory (`torch.empty`), what `torch.load` always pays and what a restore pays "
        "for tensors that do not exist yet (Adam's moments in a fresh process); resumekit reads into the live "
        'tensors when they exist, like "raw read"; the gap between the two shows what fresh memory '
        "(first-touch page faults) costs on this machine.",
        "- Growth exponent: slope of log(seconds) against log(bytes) over the sizes (1.00 = linear; below 1, "
        "fixed costs dominate the small sizes).",
        "",
        tables(points),
        "",
        "## Targets of issue 8 at every size",
        "",
        "| target | resumekit, per size | met at every size |",
        "|---|---|:---:|",
    ]
    for name, value, ok in targets(points):
        lines.append(f"| {name} | {value} | {'yes' if ok else '**no**'} |")
    lines += ["", "## Every repetition (seconds, in run order)", "", "| state | method | save | restore |"]
    lines.append("|---|---|---|---|")
    for p in points:
        if p.skipped:
            continue
        for m in OPS["restore"]:
            sv = ", ".join(f"{x:.3f}" for x in p.seconds.get(f"{m}/save", []))
            rs = ", ".join(f"{x:.3f}" for x in p.seconds.get(f"{m}/restore", []))
            lines.append(f"| {p.state_bytes / 1e9:.3f} GB | {m} | {sv} | {rs} |")
    if args.notes and os.path.exists(args.notes):
        with open(args.notes) as f:
            lines += ["", f.read().rstrip()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure every size, print the tables and write ``results/``."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--sizes",
        default="0.1,0.3,1,3",
        help="state sizes in GB (1e9 bytes), comma-separated; default 0.1,0.3,1,3",
    )
    p.add_argument("--reps", type=int, default=5, help="repetitions per size and method; default 5")
    p.add_argument(
        "--workdir", default=bsr.REPO, help="folder on the disk under test; default the repository"
    )
    p.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache before restores")
    p.add_argument("--no-write", action="store_true", help="print only; do not write results/")
    p.add_argument("--out", default="scaling", help="base name in results/; default scaling")
    p.add_argument(
        "--notes", default=None, help="markdown appended to the results (default results/<out>_notes.md)"
    )
    args = p.parse_args(argv)
    try:
        sizes = sorted(float(s) for s in args.sizes.split(",") if s.strip())
    except ValueError:
        p.error(f"--sizes must be comma-separated numbers, got {args.sizes!r}")
    if not sizes or min(sizes) <= 0 or args.reps < 1:
        p.error("--sizes must be positive and --reps at least 1")
    if args.notes is None:
        args.notes = os.path.join(bsr.RESULTS, f"{args.out}_notes.md")
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    command = ".venv/bin/python " + " ".join(
        shlex.quote(a)
        for a in [os.path.relpath(os.path.abspath(sys.argv[0]), bsr.REPO), *(argv or sys.argv[1:])]
    )
    machine = bsr.describe_machine(args.workdir)
    print(f"resumekit: {machine['resumekit']}; disk {machine['disk']}", flush=True)
    t_start = time.perf_counter()
    can_drop = not args.no_drop_caches and bsr.drop_caches()
    points = [Point(s) for s in sizes]
    loads: list[float] = []
    workdir = tempfile.mkdtemp(prefix=".bench-scaling-", dir=args.workdir)
    try:
        for point in points:
            measure(point, args, workdir, can_drop)
            loads.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    info = {"wall_s": time.perf_counter() - t_start, "load": loads, "drop_caches": can_drop}
    print()
    print(tables(points))
    print()
    for name, value, ok in targets(points):
        print(f"  [{'met' if ok else 'MISSED'}] {name}: {value}")
    print(f"\nwhole run {info['wall_s']:.0f} s")
    if not args.no_write:
        base = os.path.join(bsr.RESULTS, args.out)
        os.makedirs(bsr.RESULTS, exist_ok=True)
        write_markdown(base + ".md", command, points, info, machine, args)
        write_chart(
            base + ".png", points, "cold page cache" if can_drop else "page cache NOT dropped before restores"
        )
        print(f"wrote {base}.md and {base}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
