"""Is this tree's ``save`` / ``restore`` slower than an earlier revision's, on the same state, in one run?

For refactors of the engine (issue 14: "save and restore benchmarks no slower than before"). Two
long-lived worker processes, one importing resumekit from this tree and one from a git worktree of
``--ref``, each build the same seeded state (the ``bench_async_blocking.py`` ``nn.Linear`` stack + AdamW
moments, CPU) and time ``Checkpointer.save`` (fsync, manifest, rename) and ``Checkpointer.restore`` into
their live objects (page cache dropped first where the kernel allows). The parent alternates which
version goes first in every repetition, so load on this shared machine hits both alike, and reports the
medians and the ratio of this tree to the reference.

Usage::

    .venv/bin/python benchmarks/bench_versions.py --ref 884c480            # ~1-2 minutes
    .venv/bin/python benchmarks/bench_versions.py --ref HEAD~5 --params-mb 40 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import IO, Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def worker(params_mb: float, width: int) -> None:
    """Serve ``save FOLDER`` / ``restore FOLDER`` lines from stdin; print one JSON line per command."""
    import bench_async_blocking as bab

    import resumekit

    model, opt = bab.build_model(params_mb, width)
    bab.train_step(model, opt, 8, width)
    live = {"model": model, "optimizer": opt}
    print(json.dumps({"ready": os.path.dirname(os.path.dirname(resumekit.__file__))}), flush=True)
    for line in sys.stdin:
        what, folder = line.split()
        start = time.perf_counter()
        if what == "save":
            resumekit.Checkpointer(folder).save(live, step=1)
        else:
            resumekit.Checkpointer(folder).restore(live)
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


class _Worker:
    def __init__(self, tree: str, params_mb: float, width: int) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, HERE])}
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--params-mb", str(params_mb)]
        self.proc = subprocess.Popen(
            [*cmd, "--width", str(width)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        ready = self._read()
        if os.path.realpath(ready["ready"]) != os.path.realpath(tree):
            raise RuntimeError(f"worker imported resumekit from {ready['ready']}, not {tree}")

    def _read(self) -> Any:
        out: IO[str] | None = self.proc.stdout
        line = out.readline() if out is not None else ""
        if not line:
            raise RuntimeError(f"worker exited ({self.proc.wait()})")
        return json.loads(line)

    def run(self, what: str, folder: str) -> float:
        if self.proc.stdin is None:
            raise RuntimeError("the worker has no stdin")
        self.proc.stdin.write(f"{what} {folder}\n")
        self.proc.stdin.flush()
        return float(self._read()["seconds"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _rev(tree: str) -> str:
    return subprocess.run(
        ["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default="884c480", help="the earlier revision (default: before issues 13-18)")
    p.add_argument("--params-mb", type=float, default=150.0)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results", "versions"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.params_mb, args.width)
        return 0
    import bench_save_restore as bsr

    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    root = tempfile.mkdtemp(prefix="rk-versions-", dir=args.dir)
    ref_tree = os.path.join(root, "ref-tree")
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", ref_tree, args.ref], check=True)
    res: dict[str, dict[str, list[float]]] = {v: {"save": [], "restore": []} for v in ("this", "ref")}
    dropped: list[bool] = []
    workers: dict[str, _Worker] = {}
    try:
        workers = {
            "this": _Worker(REPO, args.params_mb, args.width),
            "ref": _Worker(ref_tree, args.params_mb, args.width),
        }
        for rep in range(args.reps):
            order = ["this", "ref"] if rep % 2 == 0 else ["ref", "this"]
            for v in order:
                folder = os.path.join(root, f"{v}-{rep}")
                os.sync()
                res[v]["save"].append(workers[v].run("save", folder))
            for v in order:
                dropped.append(bsr.drop_caches())
                res[v]["restore"].append(workers[v].run("restore", os.path.join(root, f"{v}-{rep}")))
            for v in order:
                shutil.rmtree(os.path.join(root, f"{v}-{rep}"))
            print({v: {k: round(x[-1], 3) for k, x in r.items()} for v, r in res.items()}, flush=True)
        machine = bsr.describe_machine(root)
        this_rev, ref_rev = _rev(REPO), _rev(ref_tree)
    finally:
        for w in workers.values():
            w.close()
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", ref_tree], check=False)
        shutil.rmtree(root, ignore_errors=True)
    med = {v: {k: statistics.median(x) for k, x in r.items()} for v, r in res.items()}
    rng = {v: {k: (min(x), max(x)) for k, x in r.items()} for v, r in res.items()}
    cache = (
        "dropped before every restore"
        if all(dropped)
        else "could not be dropped (restores may hit the cache)"
    )
    cmd = ".venv/bin/python benchmarks/bench_versions.py " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    lines = [
        "# `save` / `restore`: this tree against an earlier revision, same state, one run",
        "",
        "Produced by (from the repository root):",
        "",
        "```",
        cmd.strip(),
        "```",
        "",
        f"- Date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}; whole script "
        f"{time.perf_counter() - t_start:.0f} s.",
        f"- This tree: {this_rev} ({machine['resumekit']}); reference: `{args.ref}` = {ref_rev}.",
        f"- Machine: {machine['cpu']}; RAM {machine['ram']}; disk {machine['disk']}; torch {machine['torch']}.",
        f"- Load: 1-minute load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after, on "
        f"{os.cpu_count()} CPUs shared with other jobs; each repetition runs both versions back to back, "
        "order alternating.",
        f"- State: nn.Linear stack of {args.params_mb:g} MB of parameters + AdamW moments (CPU). "
        f"Page cache: {cache}. {args.reps} repetitions, medians (min-max).",
        "",
        "| measurement | reference (s) | this tree (s) | this / reference |",
        "|---|---:|---:|---:|",
    ]
    for k in ("save", "restore"):
        r, t = med["ref"][k], med["this"][k]
        lines.append(
            f"| {k} | {r:.3f} ({rng['ref'][k][0]:.3f}-{rng['ref'][k][1]:.3f}) | "
            f"{t:.3f} ({rng['this'][k][0]:.3f}-{rng['this'][k][1]:.3f}) | {t / r:.2f}x |"
        )
    lines += ["", "## Every repetition", "", "| rep | ref save | this save | ref restore | this restore |"]
    lines.append("|---:|---:|---:|---:|---:|")
    for i in range(args.reps):
        lines.append(
            f"| {i} | {res['ref']['save'][i]:.3f} | {res['this']['save'][i]:.3f} | "
            f"{res['ref']['restore'][i]:.3f} | {res['this']['restore'][i]:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
