"""How long does a checkpoint block a real training loop: ``save`` (sync) vs ``save_async``?

One process, one run. A stack of ``nn.Linear`` layers (a few hundred MB of float32 parameters, ~3x that
with AdamW's moments) trains on random data on the CPU: forward, backward, ``AdamW.step``. The same loop
runs in three configurations, repetitions interleaved so that drift of the machine hits each alike:

- ``none``: no checkpoints (the reference run time);
- ``sync``: ``Checkpointer.save`` every ``--every`` steps;
- ``async``: ``Checkpointer.save_async`` every ``--every`` steps, one Checkpointer per run (its staging
  buffers are allocated by the first call and reused by the next ones), drained by ``close()`` at the end.

Measured per checkpoint, all wall-clock time of the training thread:

- sync: the ``save`` call (fsync and commit included: nothing else blocks);
- async: the ``save_async`` call (copying the state into host staging buffers) and, separately, the time
  the next checkpoint waits for the previous background save (``wait()`` is called explicitly just
  before ``save_async``, which would otherwise wait inside itself). Their sum is the time blocked.
- the duration of each background save (``CheckpointInfo.seconds`` returned by that ``wait()``), and the
  time of every training step that overlapped one, next to the steps of the ``none`` run: on 2 cores the
  background thread competes with the training step for CPU and memory bandwidth;
- the whole run's wall time (the final ``close()`` included: before it the last checkpoint is not
  durable) against the ``none`` run.

Floors are measured before every repetition: the same tensors copied into preallocated buffers with
``Tensor.copy_`` (torch's intra-op pool, as the staging pool copies) and with ``numpy.copyto`` (one
thread). No host-staging save can block for less than such a copy.

Usage::

    .venv/bin/python benchmarks/bench_async_blocking.py              # defaults, ~3-5 minutes
    .venv/bin/python benchmarks/bench_async_blocking.py --steps 12 --every 4 --reps 1 --no-write
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
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_save_restore as bsr  # noqa: E402  (shared helpers: machine description, RSS, state tensors)

import resumekit  # noqa: E402

GIB = bsr.GIB
CONFIGS = ("none", "sync", "async")


# -- the training loop --------------------------------------------------------------------------------


def build_model(params_mb: float, width: int, seed: int = 0) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    """``Linear(width, width)`` layers with ReLU between, ~``params_mb`` MB of float32 parameters, and AdamW."""
    torch.manual_seed(seed)
    layer_bytes = (width * width + width) * 4
    n_layers = max(1, round(params_mb * 1e6 / layer_bytes))
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers.append(nn.Linear(width, width))
        if i < n_layers - 1:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    return model, opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: int, width: int) -> None:
    """One forward, backward and optimizer step on fresh random data."""
    x = torch.randn(batch, width)
    y = torch.randn(batch, width)
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@dataclass
class Run:
    """One run of the loop in one configuration."""

    config: str
    rep: int
    step_spans: list[tuple[float, float]] = field(default_factory=list)  # (start, end), run-relative s
    call_s: list[float] = field(default_factory=list)  # save() or save_async() wall time
    wait_s: list[float] = field(default_factory=list)  # async: wait for the previous background save
    ckpt_at: list[float] = field(default_factory=list)  # run-relative start of each checkpoint
    bg_s: list[float] = field(default_factory=list)  # async: each background save's own duration
    final_s: float = 0.0  # async: close() at the end (drains the last background save)
    total_s: float = 0.0
    staging_rss: int = 0  # async: RSS growth across the first save_async call (staging buffers)

    @property
    def blocked_s(self) -> list[float]:
        """Time the loop was blocked per checkpoint (call, plus waiting for the previous save)."""
        if not self.wait_s:
            return list(self.call_s)
        return [c + w for c, w in zip(self.call_s, self.wait_s)]

    def bg_spans(self) -> list[tuple[float, float]]:
        """Run-relative (start, end) of each background save (async only)."""
        return [(t, t + d) for t, d in zip(self.ckpt_at, self.bg_s)]

    def steps_during_bg(self) -> list[float]:
        """Durations of the steps that overlapped a background save."""
        spans = self.bg_spans()
        return [e - s for s, e in self.step_spans if any(s < be and e > bs for bs, be in spans)]

    def steps_outside_bg(self) -> list[float]:
        """Durations of the steps that did not overlap a background save (every step for none/sync)."""
        spans = self.bg_spans()
        return [e - s for s, e in self.step_spans if not any(s < be and e > bs for bs, be in spans)]


def run_once(
    config: str, rep: int, model: nn.Module, opt: torch.optim.Optimizer, args: argparse.Namespace, root: str
) -> Run:
    """Train ``args.steps`` steps in ``config``, checkpointing every ``args.every`` steps into ``root``."""
    r = Run(config, rep)
    live = {"model": model, "optimizer": opt}
    folder = os.path.join(root, f"{config}-{rep}")
    ckpt = resumekit.Checkpointer(folder, keep_last=2) if config != "none" else None
    os.sync()  # the previous run's writeback must not land in this one
    t0 = time.perf_counter()
    for i in range(args.steps):
        s = time.perf_counter()
        train_step(model, opt, args.batch, args.width)
        r.step_spans.append((s - t0, time.perf_counter() - t0))
        if ckpt is None or (i + 1) % args.every:
            continue
        step = i + 1
        if config == "sync":
            r.ckpt_at.append(time.perf_counter() - t0)
            c = time.perf_counter()
            ckpt.save(live, step=step)
            r.call_s.append(time.perf_counter() - c)
        else:
            w = time.perf_counter()
            info = ckpt.wait()
            r.wait_s.append(time.perf_counter() - w)
            if info is not None:
                r.bg_s.append(info.seconds)
            rss0 = bsr.rss_bytes()
            r.ckpt_at.append(time.perf_counter() - t0)
            c = time.perf_counter()
            ckpt.save_async(live, step=step)
            r.call_s.append(time.perf_counter() - c)
            if len(r.call_s) == 1:
                r.staging_rss = bsr.rss_bytes() - rss0
    if ckpt is not None:
        c = time.perf_counter()
        info = ckpt.wait()
        ckpt.close()
        r.final_s = time.perf_counter() - c
        if info is not None:
            r.bg_s.append(info.seconds)
        got = ckpt.steps()
        want = list(range(args.every, args.steps + 1, args.every))[-2:]
        if got != want:
            raise RuntimeError(f"{config}: committed steps {got}, expected {want}")
    r.total_s = time.perf_counter() - t0
    shutil.rmtree(folder, ignore_errors=True)
    return r


def copy_floor(model: nn.Module, opt: torch.optim.Optimizer, reps: int = 3) -> tuple[float, float]:
    """Median seconds to copy every state tensor into preallocated buffers: the staging floor.

    Returns:
        ``(torch_s, numpy_s)``: ``Tensor.copy_`` (torch's intra-op thread pool, as the staging pool
        copies) and ``numpy.copyto`` (one thread, no pool).
    """
    import numpy as np

    tensors = bsr.state_tensors(model, opt)
    bufs = [torch.empty_like(t) for t in tensors]
    for b, t in zip(bufs, tensors):  # first touch: fault the pages in before timing
        b.copy_(t)
    pairs = [(b.numpy(), t.numpy()) for b, t in zip(bufs, tensors)]

    def torch_copy() -> None:
        for b, t in zip(bufs, tensors):
            b.copy_(t)

    def numpy_copy() -> None:
        for b, t in pairs:
            np.copyto(b, t)

    out = []
    for copy in (torch_copy, numpy_copy):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            copy()
            times.append(time.perf_counter() - t0)
        out.append(float(statistics.median(times)))
    return out[0], out[1]


# -- statistics and report ----------------------------------------------------------------------------


def _med(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def summarise(runs: list[Run], floor_s: tuple[float, float], state_bytes: int) -> dict[str, Any]:
    """Every number of the table, pooled over repetitions (medians unless named otherwise)."""
    by: dict[str, list[Run]] = {c: [r for r in runs if r.config == c] for c in CONFIGS}
    sync_calls = [x for r in by["sync"] for x in r.call_s]
    first_calls = [r.call_s[0] for r in by["async"] if r.call_s]
    steady_calls = [x for r in by["async"] for x in r.call_s[1:]]
    waits = [x for r in by["async"] for x in r.wait_s]
    blocked = [x for r in by["async"] for x in r.blocked_s]
    steady_blocked = [x for r in by["async"] for x in r.blocked_s[1:]]
    base_steps = [e - s for r in by["none"] for s, e in r.step_spans]
    sync_steps = [x for r in by["sync"] for x in r.steps_outside_bg()]
    bg_steps = [x for r in by["async"] for x in r.steps_during_bg()]
    quiet_steps = [x for r in by["async"] for x in r.steps_outside_bg()]
    # Whole runs are compared within a repetition (the machine's load drifts between repetitions).
    none_of = {r.rep: r.total_s for r in by["none"]}
    paired = {
        c: [(r.total_s / none_of[r.rep], r.total_s - none_of[r.rep]) for r in by[c] if r.rep in none_of]
        for c in ("sync", "async")
    }
    return {
        "state_bytes": state_bytes,
        "run_ratio_sync": _med([x for x, _ in paired["sync"]]),
        "run_ratio_async": _med([x for x, _ in paired["async"]]),
        "run_extra_sync": _med([x for _, x in paired["sync"]]),
        "run_extra_async": _med([x for _, x in paired["async"]]),
        "sync_call": _med(sync_calls),
        "sync_call_all": sync_calls,
        "async_first_call": _med(first_calls),
        "async_steady_call": _med(steady_calls),
        "async_steady_call_all": steady_calls,
        "async_wait_med": _med(waits),
        "async_wait_max": max(waits) if waits else float("nan"),
        "async_blocked": _med(blocked),
        "async_steady_blocked": _med(steady_blocked),
        "async_blocked_max": max(blocked) if blocked else float("nan"),
        "bg_save": _med([x for r in by["async"] for x in r.bg_s]),
        "final_drain": _med([r.final_s for r in by["async"]]),
        "staging_rss": _med([float(r.staging_rss) for r in by["async"]]),
        "step_base": _med(base_steps),
        "step_sync": _med(sync_steps),
        "step_bg": _med(bg_steps),
        "step_async_quiet": _med(quiet_steps),
        "n_steps_bg": len(bg_steps),
        "total_none": _med([r.total_s for r in by["none"]]),
        "total_sync": _med([r.total_s for r in by["sync"]]),
        "total_async": _med([r.total_s for r in by["async"]]),
        "floor": floor_s[0],
        "floor_np": floor_s[1],
        "n_ckpt": len(by["sync"][0].call_s) if by["sync"] else 0,
    }


def _r(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and a == a and b == b else "-"


def _pct(a: float, b: float) -> str:
    return f"{a / b:.1%}" if b and a == a and b == b else "-"


def table(s: dict[str, Any]) -> str:
    """The markdown table of seconds and ratios, all measured in this run."""
    sync = s["sync_call"]
    gb = s["state_bytes"] / 1e9
    n = s["n_ckpt"]
    extra_sync = s["run_extra_sync"] / n if n else float("nan")
    extra_async = s["run_extra_async"] / n if n else float("nan")
    rows = [
        ("sync `save` call (loop blocked, fsync + commit)", sync, "1.00x", f"{gb / sync:.2f} GB/s"),
        (
            "async `save_async` call, first (allocates staging)",
            s["async_first_call"],
            _r(s["async_first_call"], sync),
            f"{gb / s['async_first_call']:.2f} GB/s",
        ),
        (
            "async `save_async` call, later (staging reused)",
            s["async_steady_call"],
            _r(s["async_steady_call"], sync),
            f"{gb / s['async_steady_call']:.2f} GB/s",
        ),
        (
            "async: next checkpoint waits for the previous save (median / max)",
            s["async_wait_med"],
            _r(s["async_wait_med"], sync),
            f"max {s['async_wait_max']:.3f} s",
        ),
        (
            "async: loop blocked per checkpoint, all (call + wait)",
            s["async_blocked"],
            _r(s["async_blocked"], sync),
            f"max {s['async_blocked_max']:.3f} s",
        ),
        (
            "async: loop blocked per checkpoint, later ones",
            s["async_steady_blocked"],
            _r(s["async_steady_blocked"], sync),
            "",
        ),
        (
            "floor: `copy_` of the same tensors into ready buffers",
            s["floor"],
            _r(s["floor"], sync),
            f"{gb / s['floor']:.2f} GB/s",
        ),
        (
            "floor: `numpy.copyto` of the same tensors (one thread)",
            s["floor_np"],
            _r(s["floor_np"], sync),
            f"{gb / s['floor_np']:.2f} GB/s",
        ),
        ("background save, call to commit", s["bg_save"], _r(s["bg_save"], sync), ""),
        ("async: final `close()` (drains the last save)", s["final_drain"], _r(s["final_drain"], sync), ""),
        ("training step, no checkpoints (reference)", s["step_base"], "1.00x (of step)", ""),
        (
            "training step, sync run (outside the saves)",
            s["step_sync"],
            _r(s["step_sync"], s["step_base"]) + " (of step)",
            "",
        ),
        (
            "training step while a background save runs",
            s["step_bg"],
            _r(s["step_bg"], s["step_base"]) + " (of step)",
            f"{s['n_steps_bg']} steps",
        ),
        (
            "training step, async run, no save running",
            s["step_async_quiet"],
            _r(s["step_async_quiet"], s["step_base"]) + " (of step)",
            "",
        ),
        ("whole run, no checkpoints", s["total_none"], "1.00x (of run)", ""),
        (
            "whole run, sync checkpoints",
            s["total_sync"],
            f"{s['run_ratio_sync']:.2f}x (of run, paired)",
            f"{extra_sync:+.2f} s per checkpoint",
        ),
        (
            "whole run, async checkpoints (final close included)",
            s["total_async"],
            f"{s['run_ratio_async']:.2f}x (of run, paired)",
            f"{extra_async:+.2f} s per checkpoint",
        ),
    ]
    out = [
        "| quantity | seconds (median) | ratio (to sync save unless noted) | note |",
        "|---|---:|---:|---|",
    ]
    for name, sec, ratio, note in rows:
        out.append(f"| {name} | {sec:.3f} | {ratio} | {note} |")
    return "\n".join(out)


def targets(s: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """Issue 8's async target, judged on medians, and the same for the steady state."""
    sync = s["sync_call"]
    return [
        (
            "async blocking <= 10% of sync save time (issue 8), every checkpoint",
            _pct(s["async_blocked"], sync),
            s["async_blocked"] <= 0.1 * sync,
        ),
        (
            "same, checkpoints after the first (staging reused)",
            _pct(s["async_steady_blocked"], sync),
            s["async_steady_blocked"] <= 0.1 * sync,
        ),
    ]


def reading(s: dict[str, Any]) -> list[str]:
    """What the numbers of this run say about the target, as markdown bullets computed from them."""
    sync, call = s["sync_call"], s["async_steady_call"]
    gb = s["state_bytes"] / 1e9
    best_floor = min(s["floor"], s["floor_np"])
    ratio = s["floor"] / s["floor_np"]
    if ratio > 1.1:
        pool_vs_one = f"{ratio:.1f}x slower than"
    elif ratio < 1 / 1.1:
        pool_vs_one = f"{1 / ratio:.1f}x faster than"
    else:
        pool_vs_one = "about as fast as"
    return [
        f"- A later `save_async` call copies {gb:.2f} GB into staging in {call:.3f} s ({gb / call:.2f} GB/s): "
        f"{call / s['floor']:.2f}x the `Tensor.copy_` floor and {call / s['floor_np']:.2f}x the one-thread "
        "`numpy.copyto` floor (the same tensors copied into ready buffers, once per repetition; medians). "
        f"The first call also allocates the staging buffers: {s['async_first_call']:.3f} s, the cost of "
        "faulting in fresh memory.",
        f"- No host-staging design can block less than the copy itself: here the fastest copy is "
        f"{best_floor / sync:.1%} of the sync save. The 10% target needs host memory to copy at least 10x "
        f"faster than the disk takes durable writes; in this run sync saves reach {gb / sync:.2f} GB/s and "
        f"the copy {gb / best_floor:.2f} GB/s, a factor of {sync / best_floor:.1f}.",
        f"- `Tensor.copy_` (what the staging pool uses) runs on torch's intra-op pool of "
        f"{torch.get_num_threads()} threads; in this run it was {pool_vs_one} one thread doing `numpy.copyto`"
        + (
            " (likely: a parallel copy waits at every tensor for its slowest worker, which other processes "
            "preempt on a loaded machine)."
            if ratio > 1.1
            else "."
        ),
        f"- The background save takes {s['bg_save'] / sync:.2f}x as long as a sync save (call to commit): it "
        "shares the CPUs with the training step. Steps that overlap it take "
        f"{s['step_bg'] / s['step_base']:.2f}x the reference step time; the next checkpoint waited "
        f"{s['async_wait_med']:.3f} s (median) for it at this interval.",
        "- Whole-run ratios are paired: each run against the no-checkpoint run of the same repetition, "
        f"median over repetitions (sync {s['run_ratio_sync']:.2f}x, async {s['run_ratio_async']:.2f}x). The "
        "load of the other jobs drifts within a repetition too: see every run in the last table.",
    ]


def write_markdown(
    path: str,
    command: str,
    s: dict[str, Any],
    runs: list[Run],
    info: dict[str, Any],
    machine: dict[str, str],
    args: argparse.Namespace,
) -> None:
    """The results file: command, machine, setup, the table, the target and every checkpoint."""
    sb = s["state_bytes"]
    lines = [
        "# Training-loop blocking per checkpoint: `save` vs `save_async`",
        "",
        "Produced by (from the repository root):",
        "",
        f"```\n{command}\n```",
        "",
        f"- Date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}; whole script {info['wall_s']:.0f} s.",
        f"- Machine: {machine['cpu']}; RAM {machine['ram']}; disk {machine['disk']}; kernel {machine['kernel']}; "
        f"torch intra-op threads {torch.get_num_threads()}.",
        f"- Shared machine: 1-minute load average {min(info['load']):.1f}-{max(info['load']):.1f} during the run "
        f"on {os.cpu_count()} CPUs (other jobs ran). Absolute times carry that noise; the ratios compare "
        "runs interleaved in the same process.",
        f"- Software: Python {machine['python']}, torch {machine['torch']}; resumekit from {machine['resumekit']}.",
        f"- Model: {info['layers']} x `nn.Linear({args.width}, {args.width})` with ReLU between, "
        f"{info['n_params'] / 1e6:.0f} M float32 parameters ({info['param_bytes'] / 1e6:.0f} MB); AdamW "
        f"(`exp_avg`, `exp_avg_sq`, `step`): checkpointed state {sb / 1e9:.3f} GB ({sb / GIB:.3f} GiB). "
        f"Batch {args.batch} of random data, MSE loss, CPU.",
        f"- Each run: {args.steps} steps, a checkpoint every {args.every} steps ({s['n_ckpt']} per run), "
        f"`keep_last=2`; {args.reps} repetition(s) of none/sync/async, order rotated per repetition. "
        "Checkpoints go to a temporary folder on the disk above, removed afterwards.",
        "- Blocked = wall time of the training thread inside resumekit calls. For async it is the "
        "`save_async` call plus the explicit `wait()` just before it (the previous background save, if "
        'still running). Steps "while a background save runs" are those whose time span overlaps the '
        "span [save_async called, commit] of some save.",
        f"- Staging memory: one host buffer per tensor, {sb / 1e9:.3f} GB in all, kept for the checkpointer's "
        f"lifetime and reused. RSS grew by {s['staging_rss'] / 1e6:.0f} MB over the first `save_async` "
        f"({s['staging_rss'] / sb:.0%} of the state): less than the buffers, likely because part of them "
        "landed on pages the process already held (freed gradients).",
        "",
        table(s),
        "",
        "## What this run says",
        "",
        *reading(s),
        "",
        "## Target (issue 8)",
        "",
        "| target | measured | met |",
        "|---|---:|:---:|",
    ]
    for name, value, ok in targets(s):
        lines.append(f"| {name} | {value} | {'yes' if ok else '**no**'} |")
    lines += [
        "",
        "## Every checkpoint (seconds, in run order)",
        "",
        "| run | blocked per checkpoint | async: of which waiting | background save | final close | whole run |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.config} #{r.rep + 1} | {', '.join(f'{x:.3f}' for x in r.blocked_s) or '-'} "
            f"| {', '.join(f'{x:.3f}' for x in r.wait_s) or '-'} | {', '.join(f'{x:.2f}' for x in r.bg_s) or '-'} "
            f"| {r.final_s:.2f} | {r.total_s:.1f} |"
        )
    if args.notes and os.path.exists(args.notes):
        with open(args.notes) as f:
            lines += ["", f.read().rstrip()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_chart(path: str, s: dict[str, Any], runs: list[Run]) -> None:
    """Left: blocked seconds per checkpoint. Right: step times over the last repetition of each config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [1, 1.6]})
    labels = ["sync save", "async: call", "async: wait prev.", "copy_ floor", "copyto floor\n(1 thread)"]
    vals = [s["sync_call"], s["async_steady_call"], s["async_wait_med"], s["floor"], s["floor_np"]]
    colors = ["#d62728", "#ff9896", "#ffbb78", "#888888", "#bbbbbb"]
    bars = ax1.bar(labels, vals, color=colors)
    ax1.bar_label(bars, fmt="%.3f", fontsize=8)
    ax1.axhline(0.1 * s["sync_call"], color="k", ls="--", lw=1, label="10% of sync save (target)")
    ax1.set_ylabel("seconds the loop is blocked per checkpoint (median)")
    ax1.set_title(f"{s['state_bytes'] / 1e9:.2f} GB state: blocking per checkpoint", fontsize=10)
    ax1.legend(fontsize=8)
    ax1.grid(axis="y", alpha=0.3)
    ax1.tick_params(axis="x", labelsize=8)
    colors2 = {"none": "#888888", "sync": "#d62728", "async": "#1f77b4"}
    last = {r.config: r for r in runs}
    for cfg, r in last.items():
        xs = [e for _, e in r.step_spans]
        ys = [e - st for st, e in r.step_spans]
        ax2.plot(xs, ys, "o-", ms=3, lw=1, color=colors2[cfg], label=f"{cfg} (run {r.total_s:.1f} s)")
        for t in r.ckpt_at:
            ax2.axvline(t, color=colors2[cfg], lw=0.6, ls=":")
        for bs, be in r.bg_spans():
            ax2.axvspan(bs, be, color=colors2[cfg], alpha=0.12)
    ax2.set_xlabel("seconds since the run started (dotted: checkpoint calls; shaded: background saves)")
    ax2.set_ylabel("training step time (s)")
    ax2.set_title("step times, last repetition of each configuration", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the loops, print the table and write ``results/``."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--params-mb", type=float, default=150.0, help="MB of float32 parameters; default 150")
    p.add_argument("--width", type=int, default=2048, help="Linear width; default 2048")
    p.add_argument("--batch", type=int, default=8, help="batch size; default 8")
    p.add_argument("--steps", type=int, default=20, help="training steps per run; default 20")
    p.add_argument("--every", type=int, default=5, help="checkpoint every N steps; default 5")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the runs; default 3")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each configuration; default 3")
    p.add_argument(
        "--workdir", default=bsr.REPO, help="folder on the disk under test; default the repository"
    )
    p.add_argument("--no-write", action="store_true", help="print only; do not write results/")
    p.add_argument("--out", default="async_blocking", help="base name in results/; default async_blocking")
    p.add_argument(
        "--notes", default=None, help="markdown appended to the results (default results/<out>_notes.md)"
    )
    args = p.parse_args(argv)
    if min(args.steps, args.every, args.reps, args.width, args.batch) < 1 or args.every > args.steps:
        p.error("--steps, --every, --reps, --width and --batch must be positive, and --every <= --steps")
    if args.notes is None:
        args.notes = os.path.join(bsr.RESULTS, f"{args.out}_notes.md")
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    command = ".venv/bin/python " + " ".join(
        shlex.quote(a)
        for a in [os.path.relpath(os.path.abspath(sys.argv[0]), bsr.REPO), *(argv or sys.argv[1:])]
    )
    machine = bsr.describe_machine(args.workdir)
    t_start = time.perf_counter()
    model, opt = build_model(args.params_mb, args.width)
    for _ in range(args.warmup):  # also creates AdamW's state, so every checkpoint holds the same tensors
        train_step(model, opt, args.batch, args.width)
    tensors = bsr.state_tensors(model, opt)
    state_bytes = bsr.nbytes_of(tensors)
    param_bytes = bsr.nbytes_of([p_.detach() for p_ in model.parameters()])
    del tensors
    linears = sum(isinstance(m, nn.Linear) for m in model)
    print(
        f"state: {linears} x Linear({args.width}, {args.width}) + AdamW = {state_bytes / 1e9:.3f} GB; "
        f"disk {bsr.describe_disk(args.workdir)}; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    floors = [copy_floor(model, opt)]
    floor_s = floors[0]
    print(
        f"copy floor: torch copy_ {floor_s[0]:.3f} s, numpy.copyto {floor_s[1]:.3f} s "
        f"({state_bytes / 1e9 / min(floor_s):.2f} GB/s)",
        flush=True,
    )
    root = tempfile.mkdtemp(prefix=".bench-async-blocking-", dir=args.workdir)
    runs: list[Run] = []
    loads: list[float] = []
    try:
        for rep in range(args.reps):
            if rep:  # measured again each repetition: the machine's load drifts between them
                floors.append(copy_floor(model, opt))
            order = CONFIGS[rep % 3 :] + CONFIGS[: rep % 3]
            for cfg in order:
                r = run_once(cfg, rep, model, opt, args, root)
                runs.append(r)
                loads.append(os.getloadavg()[0])
                steps = [e - s_ for s_, e in r.step_spans]
                print(
                    f"  rep {rep + 1}/{args.reps} {cfg:5s} run {r.total_s:6.1f} s, step median "
                    f"{statistics.median(steps):.3f} s, blocked per checkpoint "
                    f"[{', '.join(f'{x:.3f}' for x in r.blocked_s)}]"
                    + (f", waits [{', '.join(f'{x:.3f}' for x in r.wait_s)}]" if r.wait_s else "")
                    + (f", background saves [{', '.join(f'{x:.2f}' for x in r.bg_s)}]" if r.bg_s else "")
                    + f"  load {loads[-1]:.1f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    floor_med = (_med([f[0] for f in floors]), _med([f[1] for f in floors]))
    s = summarise(runs, floor_med, state_bytes)
    info = {
        "wall_s": time.perf_counter() - t_start,
        "load": loads,
        "layers": linears,
        "n_params": sum(p_.numel() for p_ in model.parameters()),
        "param_bytes": param_bytes,
    }
    print()
    print(table(s))
    print()
    for name, value, ok in targets(s):
        print(f"  [{'met' if ok else 'MISSED'}] {name}: {value}")
    print()
    print("\n".join(reading(s)))
    if not args.no_write:
        base = os.path.join(bsr.RESULTS, args.out)
        os.makedirs(bsr.RESULTS, exist_ok=True)
        write_markdown(base + ".md", command, s, runs, info, machine, args)
        write_chart(base + ".png", s, runs)
        print(f"\nwrote {base}.md and {base}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
