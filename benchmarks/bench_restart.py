"""Restart to first step: what a preempted user waits for, from process start to the first optimizer step.

A run is killed in the middle of epoch 0 (after batch 3,000 of 6,250: 200,000 synthetic samples, batch
32) holding ~1 GiB of state (21 x ``nn.Linear(2048, 2048)`` + AdamW's two moments). Its job starts again.
Four stacks, each resuming the way its documentation says, in one run of this script:

- ``resumekit``: ``Checkpointer.restore`` of model, optimizer, ``ResumableSampler`` and ``RNGState``, the
  loop of docs/exact-resume.md (``sampler.set_epoch(sampler.epoch)``; ``ResumableLoader``); the default
  ``order="torch"`` (``DistributedSampler``'s order, so all four stacks share one epoch order);
- ``lightning``: ``Trainer.fit(module, loader, ckpt_path=...)`` with torchdata's ``StatefulDataLoader``
  (Lightning saves and reloads a stateful loader's position; with a plain ``DataLoader`` it would restart
  the epoch's data from its first batch);
- ``accelerate``: ``Accelerator(cpu=True).prepare`` + ``accelerator.load_state`` +
  ``accelerator.skip_first_batches`` (the step taken from the folder name, as in accelerate's examples);
- ``dcp``: ``torch.distributed.checkpoint.load`` (one process, no process group) of model + optimizer
  (``get_state_dict``/``set_state_dict``, the DCP recipe) and a ``StatefulDataLoader``'s state.

Every checkpoint is written beforehand (not timed), by one process, from the same state (weights and
AdamW moments after two real steps) at the same position, each stack producing its own position the way
a run does (iterating its loader; Lightning's fit loop counting 3,000 optimizer steps whose updates are
skipped). Each timed run is a fresh process (``restart_stacks.py``); the page cache is dropped before it
(``sync; echo 3 > /proc/sys/vm/drop_caches``: the libraries and the checkpoint both come from disk, as on
a freshly allocated node) when permitted. The child stamps ``time.monotonic()`` (system-wide) after each
phase; this process stamps the spawn. Phases: startup (spawn to the script's first line), import torch,
import the stack, build (model, optimizer, data, trainer objects), restore, fast-forward (the data
positioned), first batch, first step (forward, backward, ``AdamW.step``). Stacks alternate order across
repetitions; medians and min-max are reported.

Checked on every run: the first batch after the restore holds exactly the indices the uninterrupted run
took next (``torch.randperm(200000, generator seeded 0)[96000:96032]``, also recorded from each stack's
own loader during preparation), and the state after the first step is identical across stacks (float64
sums of weights and moments).

Usage::

    .venv/bin/python benchmarks/bench_restart.py                   # 3 reps, ~3-4 minutes on 2 cores
    .venv/bin/python benchmarks/bench_restart.py --quick --no-write  # tiny state, 1 rep: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_save_restore as bsr  # noqa: E402  (drop_caches, describe_machine, versions)
import restart_stacks as rs  # noqa: E402  (the children; sizes and phase names)

LABELS = {
    "resumekit": "resumekit",
    "lightning": "Lightning fit(ckpt_path)",
    "accelerate": "Accelerate load_state + skip_first_batches",
    "dcp": "DCP load + StatefulDataLoader",
}
COLORS = ("#bbbbbb", "#8c564b", "#e377c2", "#9467bd", "#d62728", "#ff7f0e", "#2ca02c", "#1f77b4")
QUICK = {"BENCH_RESTART_SAMPLES": "4000", "BENCH_RESTART_BATCH": "60", "BENCH_RESTART_LAYERS": "2"}


def child(args: list[str], env: dict[str, str], timeout: float) -> tuple[float, dict[str, Any]]:
    """Spawn ``restart_stacks.py ARGS``; return the spawn's monotonic stamp and the child's JSON line."""
    cmd = [sys.executable, os.path.join(HERE, "restart_stacks.py"), *args]
    t_spawn = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return t_spawn, json.loads(done.stdout.strip().splitlines()[-1])


def phases(t_spawn: float, marks: list[list[Any]]) -> dict[str, float]:
    """Seconds per phase from the child's stamps (``startup`` from the spawn), plus ``total``."""
    stamps = {m[0]: m[1] for m in marks}
    out = {"startup": stamps["start"] - t_spawn}
    previous = stamps["start"]
    for name in rs.PHASES[1:]:
        out[name] = stamps[name] - previous
        previous = stamps[name]
    out["total"] = previous - t_spawn
    out["stack part"] = sum(out[k] for k in rs.STACK_PART)
    cpu = {m[0]: m[2] for m in marks}
    out["cpu"] = cpu[rs.PHASES[-1]]  # the process's CPU time (all threads) from its start to the first step
    out["cpu stack part"] = cpu[rs.STACK_PART[-1]] - cpu["import torch"]
    return out


def build_parts(run: dict[str, Any]) -> dict[str, float]:
    """The build phase of one run split at its sub-stamps (model init, optimizer construction, the rest)."""
    stamps, sub = {m[0]: m[1] for m in run["marks"]}, run.get("sub", {})
    out, previous = {}, stamps["import stack"]
    for name in ("accelerator", "model", "optimizer"):
        if name in sub:
            out[name] = sub[name] - previous
            previous = sub[name]
    out["rest"] = stamps["build"] - previous
    return out


def expected_next() -> list[int]:
    """The batch the uninterrupted run takes after ``RESUME_BATCH`` batches: epoch 0's seeded order."""
    import torch

    perm = torch.randperm(rs.N_SAMPLES, generator=rs.seeded())
    lo = rs.RESUME_BATCH * rs.BATCH
    return [int(i) for i in perm[lo : lo + rs.BATCH]]


def run(args: argparse.Namespace, env: dict[str, str], root: str) -> dict[str, Any]:
    """Prepare every checkpoint, then time ``args.reps`` restarts of every stack, order rotated."""
    info: dict[str, Any] = {"load_before": os.getloadavg()}
    t0 = time.monotonic()
    print("preparing the checkpoints (not timed) ...", flush=True)
    t_prep, prep = child(["prepare", root], env, timeout=900)
    info["prepare_wall_s"] = time.monotonic() - t_prep
    info["prepare_s"] = prep["seconds"]
    info["state_bytes"] = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, fs in os.walk(os.path.join(root, "resumekit"))
        for f in fs
    )
    info["checkpoint_bytes"] = {
        s: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(root, s)) for f in fs)
        for s in args.stacks
    }
    expected = expected_next()
    for stack, got in prep["next"].items():
        if got != expected:
            raise RuntimeError(
                f"{stack}: the uninterrupted run's next batch {got[:4]}... is not {expected[:4]}..."
            )
    info["expected"] = expected
    runs: list[dict[str, Any]] = []
    dropped = []
    for rep in range(args.reps):
        order = args.stacks[rep % len(args.stacks) :] + args.stacks[: rep % len(args.stacks)]
        for stack in order:
            dropped.append(bsr.drop_caches() if args.drop_caches else False)
            t_spawn, out = child([stack, root], env, timeout=600)
            r = {"stack": stack, "rep": rep, "phases": phases(t_spawn, out["marks"]), **out}
            r["same_batch"] = out["next"] == expected
            runs.append(r)
            ph = r["phases"]
            print(
                f"rep {rep} {stack:10s} total {ph['total']:6.2f} s  "
                + "  ".join(f"{k} {ph[k]:.2f}" for k in rs.PHASES)
                + f"  same batch: {r['same_batch']}",
                flush=True,
            )
    prints = {json.dumps(r["fingerprint"]) for r in runs}
    info["same_state"] = len(prints) == 1
    info["dropped"] = all(dropped) and bool(dropped)
    info["load_after"] = os.getloadavg()
    info["wall_s"] = time.monotonic() - t0
    return {"info": info, "runs": runs}


def summary(runs: list[dict[str, Any]], stacks: list[str]) -> dict[str, dict[str, Any]]:
    """Per stack: median, min and max of every phase and of the total; the ratio to resumekit's total."""
    out: dict[str, dict[str, Any]] = {}
    for s in stacks:
        rs_ = [r["phases"] for r in runs if r["stack"] == s]
        out[s] = {
            k: (statistics.median(p[k] for p in rs_), min(p[k] for p in rs_), max(p[k] for p in rs_))
            for k in (*rs.PHASES, "total", "stack part", "cpu", "cpu stack part")
        }
        out[s]["ok"] = all(r["same_batch"] for r in runs if r["stack"] == s)
    for s in stacks:
        out[s]["ratio"] = out[s]["total"][0] / out["resumekit"]["total"][0]
        out[s]["part ratio"] = out[s]["stack part"][0] / out["resumekit"]["stack part"][0]
        out[s]["cpu ratio"] = out[s]["cpu"][0] / out["resumekit"]["cpu"][0]
    return out


def table(s: dict[str, dict[str, Any]]) -> str:
    """The per-phase medians, the total and the stack's part with (min-max) and their ratios to resumekit."""
    head = (
        "| stack | "
        + " | ".join(rs.PHASES)
        + " | **total** (min-max) | / resumekit | stack's part (min-max) | / resumekit | CPU s | / resumekit "
        "| same next batch |"
    )
    lines = [head, "|---|" + "---:|" * (len(rs.PHASES) + 6) + ":---:|"]
    for stack, v in s.items():
        total, part = v["total"], v["stack part"]
        lines.append(
            f"| {LABELS[stack]} | "
            + " | ".join(f"{v[k][0]:.2f}" for k in rs.PHASES)
            + f" | **{total[0]:.2f}** ({total[1]:.2f}-{total[2]:.2f}) | {v['ratio']:.2f}x "
            + f"| {part[0]:.2f} ({part[1]:.2f}-{part[2]:.2f}) | {v['part ratio']:.2f}x "
            + f"| {v['cpu'][0]:.2f} | {v['cpu ratio']:.2f}x | "
            + ("yes" if v["ok"] else "**no**")
            + " |"
        )
    return "\n".join(lines)


def where_resumekit_goes(saved: dict[str, Any], s: dict[str, dict[str, Any]]) -> list[str]:
    """resumekit's phases as shares of its total, largest first (build split at its sub-stamps), and the
    order of the stacks by total and by the stack's part."""
    v = s["resumekit"]
    total = v["total"][0]
    runs = [r for r in saved["runs"] if r["stack"] == "resumekit"]
    build = {k: statistics.median(build_parts(r)[k] for r in runs) for k in build_parts(runs[0])}
    notes = {
        "build": " = model construction with its default init "
        f"{build.get('model', 0):.2f} s + optimizer construction {build.get('optimizer', 0):.2f} s + dataset, "
        f"sampler, loader, `Checkpointer` {build['rest']:.2f} s",
        "import stack": " (`import resumekit`)",
        "restore": f" (`Checkpointer.restore`: manifest, plan, {saved['info']['state_bytes'] / 2**30:.2f} GiB read "
        "and checksummed, loaded)",
        "first batch": " (the epoch's permutation, sliced at the position, and 32 samples)",
        "fast-forward": " (`set_epoch` + `iter(loader)`)",
    }
    parts = sorted(((v[k][0], k) for k in rs.PHASES), reverse=True)
    lines = [f"resumekit's median total {total:.2f} s; median of each phase (share of the total):", ""]
    lines += [f"- {k}: {sec:.2f} s ({100 * sec / total:.0f}%){notes.get(k, '')}" for sec, k in parts]

    def order(key: str) -> str:
        ranked = sorted(s, key=lambda k: s[k][key][0])
        text = ", ".join(f"{k} {s[k][key][0]:.2f} s" for k in ranked) + ": "
        return text + (
            "resumekit first." if ranked[0] == "resumekit" else f"**{ranked[0]} before resumekit.**"
        )

    return [
        *lines,
        "",
        "By median total: " + order("total"),
        "",
        "By the stack's part (import stack + build + restore + fast-forward + first batch): "
        + order("stack part"),
        "",
        "By CPU time (all threads, process start to first step): " + order("cpu"),
    ]


def write_markdown(path: str, saved: dict[str, Any], notes: str | None) -> None:
    """The results file: command, machine, load, versions, the table, resumekit's breakdown, every run."""
    info, m = saved["info"], saved["machine"]
    s = summary(saved["runs"], saved["stacks"])
    lb, la = info["load_before"], info["load_after"]
    sizes = saved["sizes"]
    lines = [
        "# Restart to first step: resumekit, Lightning, Accelerate, DCP",
        "",
        "Produced by (from the repository root):",
        "",
        f"```\n{saved['command']}\n```",
        "",
        f"- Date (UTC): {saved['date']}; whole script {info['wall_s']:.0f} s "
        + (f"(preparation {info['prepare_wall_s']:.0f} s, of which " if "prepare_wall_s" in info else "(")
        + f"writing the four checkpoints {sum(info['prepare_s'].values()):.0f} s; not timed).",
        f"- Machine: {m['cpu']}; RAM {m['ram']}; disk {m['disk']}; kernel {m['kernel']}.",
        f"- Load average (1/5/15 min): {lb[0]:.1f}/{lb[1]:.1f}/{lb[2]:.1f} before, "
        f"{la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f} after, on {os.cpu_count()} CPUs shared with other sessions: "
        "absolute times are noisy; the stacks alternate order so drift hits each alike.",
        f"- Software: Python {m['python']}, torch {m['torch']}, lightning {m['lightning']}, accelerate "
        f"{m['accelerate']}, torchdata {m['torchdata']}, safetensors {m['safetensors']}; resumekit from "
        f"{m['resumekit']}.",
        f"- State: {sizes['layers']} x `nn.Linear({sizes['width']}, {sizes['width']})` float32 + AdamW moments: "
        f"resumekit's checkpoint {info['state_bytes'] / 2**30:.3f} GiB on disk ("
        + ", ".join(f"{k} {v / 2**30:.3f}" for k, v in info["checkpoint_bytes"].items() if k != "resumekit")
        + " GiB).",
        f"- Data: {sizes['samples']:,} synthetic samples, batch {sizes['batch']}, shuffled (one seeded order "
        f"for all four), `num_workers=0`; resumed after batch {sizes['resume_batch']:,} of epoch 0.",
        "- Page cache before each timed run: "
        + (
            "**dropped** (`sync; echo 3 > /proc/sys/vm/drop_caches`): libraries and checkpoint are read from disk."
            if info["dropped"]
            else "**not dropped** (not permitted, or `--no-drop-caches`): warm page cache."
        ),
        f"- {saved['reps']} repetition(s) per stack, order rotated each repetition; seconds, medians per phase; "
        "total = spawn to first optimizer step done.",
        "- Same next batch: the first batch after the restore holds exactly the indices of the uninterrupted "
        "run's next batch: "
        + (
            "yes, on every run"
            if all(r["same_batch"] for r in saved["runs"])
            else "**not on every run** (below)"
        )
        + ". Same state after the first step across all stacks and runs: "
        + ("yes" if info["same_state"] else "**no**")
        + ".",
        "",
        table(s),
        "",
        "Phases: startup = spawn to the script's first line (interpreter, site-packages); build = model "
        "(default init), optimizer, dataset, loader, plus `Accelerator`/`Trainer` objects; restore = load into "
        "model and optimizer (Lightning: the whole of `fit` up to the end of its checkpoint restore, its setup "
        "included); fast-forward = the data positioned, as far as the stack does it before the first batch is "
        "pulled (iterator created; torchdata's stateful sampler redraws the permutation and replays the skipped "
        "indices here); first batch = the next batch in hand (resumekit computes the epoch's permutation here, "
        "when the first index is pulled; Accelerate's `SkipBatchSampler` iterates and discards the skipped "
        "index lists here); first step = forward, backward, `AdamW.step`. Stack's part = import stack + build + restore "
        "+ fast-forward + first batch: the time the choice of stack decides (interpreter start, `import torch` "
        "and the training step are the same work for all four). CPU s = the child's CPU time, all threads, "
        "from its start to its first step (`time.process_time()`): the work done, much less sensitive than "
        "wall time to other jobs on a shared machine (disk waits are not in it).",
        "",
        "## Where resumekit's time goes",
        "",
        *where_resumekit_goes(saved, s),
        "",
        "## Every run (seconds, in run order)",
        "",
        "| rep | stack | " + " | ".join(rs.PHASES) + " | total | same batch |",
        "|---:|---|" + "---:|" * (len(rs.PHASES) + 1) + ":---:|",
    ]
    for r in saved["runs"]:
        ph = r["phases"]
        lines.append(
            f"| {r['rep']} | {r['stack']} | "
            + " | ".join(f"{ph[k]:.2f}" for k in rs.PHASES)
            + f" | {ph['total']:.2f} | {'yes' if r['same_batch'] else '**no**'} |"
        )
    if notes:
        lines += ["", notes.rstrip()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_chart(path: str, saved: dict[str, Any]) -> None:
    """Stacked horizontal bars: one per stack, one segment per phase (medians)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(saved["runs"], saved["stacks"])
    names = list(s)[::-1]
    fig, ax = plt.subplots(figsize=(11, 4.6))
    left = [0.0] * len(names)
    for k, color in zip(rs.PHASES, COLORS):
        widths = [s[n][k][0] for n in names]
        ax.barh([LABELS[n] for n in names], widths, left=left, color=color, label=k, edgecolor="white")
        left = [a + b for a, b in zip(left, widths)]
    for i, n in enumerate(names):
        ax.text(left[i] + 0.1, i, f"{s[n]['total'][0]:.1f} s ({s[n]['ratio']:.2f}x)", va="center", fontsize=9)
    ax.set_xlim(0, max(left) * 1.2)
    ax.set_xlabel(
        "seconds from process spawn to the first optimizer step (bars: median of each phase; label: median total)"
    )
    cache = "cold page cache" if saved["info"]["dropped"] else "warm page cache"
    ax.set_title(
        f"Restart to first step, ~{saved['info']['state_bytes'] / 2**30:.1f} GiB state, resumed mid-epoch, "
        f"{cache}, median of {saved['reps']} run(s) per stack",
        fontsize=10,
    )
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the table and write ``results/restart.*``."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the scratch folder is removed
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="timed restarts of each stack (median reported)")
    p.add_argument(
        "--stacks", default=",".join(rs.STACKS), help="comma-separated subset of " + ",".join(rs.STACKS)
    )
    p.add_argument(
        "--quick", action="store_true", help="a tiny state and dataset: a smoke test, not a result"
    )
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false")
    p.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary folder)")
    p.add_argument("--no-write", action="store_true", help="print only; do not write results/")
    p.add_argument("--out", default=os.path.join(RESULTS, "restart"), help="base path of .md, .png, .json")
    p.add_argument("--render", action="store_true", help="rewrite .md and .png from .json and the notes file")
    args = p.parse_args(argv)
    notes_path = args.out + "_notes.md"
    notes = None
    if os.path.exists(notes_path):
        with open(notes_path) as f:
            notes = f.read()
    if args.render:
        with open(args.out + ".json") as f:
            saved = json.load(f)
        write_markdown(args.out + ".md", saved, notes)
        write_chart(args.out + ".png", saved)
        print(f"rewrote {args.out}.md and .png from {args.out}.json")
        return 0
    args.stacks = [x for x in args.stacks.split(",") if x]
    if "resumekit" not in args.stacks or set(args.stacks) - set(rs.STACKS) or args.reps < 1:
        p.error("--stacks must include resumekit and name only " + ",".join(rs.STACKS) + "; --reps >= 1")
    env = dict(os.environ)
    if args.quick:
        env.update(QUICK)
        os.environ.update(QUICK)
        import importlib

        importlib.reload(rs)  # the sizes are read from the environment at import
    env["PYTHONPATH"] = os.pathsep.join(x for x in (HERE, REPO, env.get("PYTHONPATH", "")) if x)
    command = ".venv/bin/python benchmarks/bench_restart.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    root = tempfile.mkdtemp(prefix="rk-restart-", dir=args.dir)
    try:
        result = run(args, env, root)
        machine = bsr.describe_machine(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    machine["torchdata"] = bsr._version_of("torchdata")
    saved = {
        "command": command.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "reps": args.reps,
        "stacks": args.stacks,
        "machine": machine,
        "sizes": {
            "samples": rs.N_SAMPLES,
            "batch": rs.BATCH,
            "resume_batch": rs.RESUME_BATCH,
            "width": rs.WIDTH,
            "layers": rs.LAYERS,
        },
        **result,
    }
    s = summary(saved["runs"], args.stacks)
    print()
    print(table(s))
    print()
    print("\n".join(where_resumekit_goes(saved, s)))
    if not args.no_write:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(saved, f, indent=1)
        write_markdown(args.out + ".md", saved, notes)
        write_chart(args.out + ".png", saved)
        print(f"\nwrote {args.out}.md, .png and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
