"""What does an async checkpoint cost the training loop: resumekit's staging modes vs DCP ``async_save``.

One process, one run, the model and loop of ``bench_async_blocking.py`` (``nn.Linear`` stack, AdamW, CPU).
Configurations, repetitions interleaved (order rotated) so drift of the shared machine hits each alike:

- ``none``: no checkpoints (reference);
- ``sync``: ``Checkpointer.save``;
- ``rk-copy``: ``save_async(staging="copy")`` (every tensor copied before the call returns; the old default);
- ``rk-overlap``: ``save_async()`` (default: copies run during the next forward/backward; the optimizer
  step waits for any copy still pending);
- ``rk-budget``: ``save_async(staging_budget=--budget-mib MiB)`` (bounded staging memory);
- ``dcp``: ``torch.distributed.checkpoint.async_save`` with its default stager (no process group:
  ``no_dist=True``; a thread executor);
- ``dcp-bg``: ``async_save`` with ``DefaultStager(StagingOptions(use_async_staging=True))`` (staging runs
  after the call returns) and the next step does *not* wait for staging (the usage of pytorch issue 144657);
- ``dcp-bg-wait``: the same, but the next step waits for ``staging_completion`` before ``opt.step()``
  (the correct usage, and the same overlap as ``rk-overlap``).

Per checkpoint: the time the training thread spends in the call plus waiting for the previous save
("blocked"); whole-run overhead per checkpoint against the paired ``none`` run (everything the
checkpoint costs the loop: the call, waits inside the next step, CPU the background thread takes);
the peak RSS growth of the run over the state's size; and whether the committed checkpoint holds the
values of the call (per-tensor float64 sums taken just before the call, outside the timed spans,
compared with the checkpoint read back after the run).

Usage::

    .venv/bin/python benchmarks/bench_async_overlap.py            # ~2-3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_async_overlap.py --reps 1 --steps 8 --every 4 --params-mb 40
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

import bench_async_blocking as bab  # noqa: E402  (model and training step)
import bench_save_restore as bsr  # noqa: E402  (machine description, RSS)

import resumekit  # noqa: E402

CONFIGS = ("none", "sync", "rk-copy", "rk-overlap", "rk-budget", "dcp", "dcp-bg", "dcp-bg-wait")


@dataclass
class Run:
    config: str
    rep: int
    blocked_s: list[float] = field(default_factory=list)
    total_s: float = 0.0
    cpu_s: float = 0.0
    rss_growth: int = 0
    fingerprints: dict[int, list[float]] = field(default_factory=dict)
    preserved: bool | None = None
    steps: list[int] = field(default_factory=list)


def fingerprint(model: nn.Module, opt: torch.optim.Optimizer) -> list[float]:
    """Per-tensor float64 sums of every parameter and moment (changes whenever a value changes)."""
    ts = list(model.state_dict().values()) + [
        v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    ]
    return [float(torch.sum(t.detach(), dtype=torch.float64)) for t in ts]


def run_once(
    config: str, rep: int, model: nn.Module, opt: torch.optim.Optimizer, args: Any, root: str
) -> Run:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    r = Run(config, rep)
    live = {"model": model, "optimizer": opt}
    folder = os.path.join(root, f"{config}-{rep}")
    os.makedirs(folder, exist_ok=True)
    ckpt = (
        resumekit.Checkpointer(folder) if config in ("sync", "rk-copy", "rk-overlap", "rk-budget") else None
    )
    pending: Any = None  # DCP: the previous save's future / response
    staging_wait: Any = None  # dcp-bg-wait: staging future the next optimizer step waits on
    os.sync()
    bsr._reset_hwm()
    rss0 = bsr.rss_bytes()
    excluded = 0.0  # fingerprint time, not part of the loop
    excluded_cpu = 0.0
    t0 = time.perf_counter()
    c0 = bsr.cpu_seconds()
    for i in range(args.steps):
        if staging_wait is not None:
            # Forward and backward may overlap staging; the optimizer step must not.
            x, y = torch.randn(args.batch, args.width), torch.randn(args.batch, args.width)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            staging_wait.result()
            staging_wait = None
            opt.step()
        else:
            bab.train_step(model, opt, args.batch, args.width)
        if config == "none" or (i + 1) % args.every:
            continue
        step = i + 1
        f0, fc0 = time.perf_counter(), bsr.cpu_seconds()
        r.fingerprints[step] = fingerprint(model, opt)
        excluded += time.perf_counter() - f0
        excluded_cpu += bsr.cpu_seconds() - fc0
        s = time.perf_counter()
        if config == "sync":
            assert ckpt is not None
            ckpt.save(live, step=step)
        elif config.startswith("rk-"):
            assert ckpt is not None
            ckpt.wait()
            if config == "rk-copy":
                ckpt.save_async(live, step=step, staging="copy")
            elif config == "rk-budget":
                ckpt.save_async(live, step=step, staging_budget=args.budget_mib << 20)
            else:
                ckpt.save_async(live, step=step)
        else:
            if pending is not None:
                pending.result()
            path = os.path.join(folder, f"step-{step}")
            sd = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            if config == "dcp":
                pending = dcp.async_save(sd, checkpoint_id=path, no_dist=True)
            else:
                stager = DefaultStager(StagingOptions(False, False, True, False))
                resp = dcp.async_save(sd, checkpoint_id=path, no_dist=True, async_stager=stager)
                pending = resp.upload_completion
                if config == "dcp-bg-wait":
                    staging_wait = resp.staging_completion
        r.blocked_s.append(time.perf_counter() - s)
        r.steps.append(step)
    if ckpt is not None:
        ckpt.close()
    if pending is not None:
        pending.result()
    r.total_s = time.perf_counter() - t0 - excluded
    r.cpu_s = bsr.cpu_seconds() - c0 - excluded_cpu
    r.rss_growth = bsr._status_kib("VmHWM:") * 1024 - rss0
    if config != "none":
        r.preserved = verify(config, folder, r, model, opt)
    shutil.rmtree(folder, ignore_errors=True)
    return r


def verify(config: str, folder: str, r: Run, model: nn.Module, opt: torch.optim.Optimizer) -> bool:
    """Read every checkpoint back into the live objects and compare with the fingerprint of its call."""
    import torch.distributed.checkpoint as dcp

    ok = True
    for step in r.steps:
        if config.startswith("dcp"):
            sd = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load(sd, checkpoint_id=os.path.join(folder, f"step-{step}"), no_dist=True)
            model.load_state_dict(sd["model"])
            opt.load_state_dict(sd["optimizer"])
        else:
            resumekit.Checkpointer(folder).restore({"model": model, "optimizer": opt}, step=step)
        ok = ok and fingerprint(model, opt) == r.fingerprints[step]
    return ok


def summarise(runs: list[Run], nckpt: int) -> dict[str, dict[str, float]]:
    none = {r.rep: r.total_s for r in runs if r.config == "none"}
    none_cpu = {r.rep: r.cpu_s for r in runs if r.config == "none"}
    sync_blocked = statistics.median(b for r in runs if r.config == "sync" for b in r.blocked_s)
    out: dict[str, dict[str, float]] = {}
    for c in CONFIGS:
        rs = [r for r in runs if r.config == c]
        if not rs:
            continue
        blocked = [b for r in rs for b in r.blocked_s]
        later = [b for r in rs for b in r.blocked_s[1:]]
        out[c] = {
            "blocked_med": statistics.median(blocked) if blocked else 0.0,
            "blocked_later_med": statistics.median(later) if later else 0.0,
            "blocked_max": max(blocked) if blocked else 0.0,
            "blocked_pct": 100 * statistics.median(blocked) / sync_blocked if blocked else 0.0,
            "overhead_per_ckpt": statistics.median((r.total_s - none[r.rep]) / nckpt for r in rs)
            if c != "none"
            else 0.0,
            "cpu_per_ckpt": statistics.median((r.cpu_s - none_cpu[r.rep]) / nckpt for r in rs)
            if c != "none"
            else 0.0,
            "total_med": statistics.median(r.total_s for r in rs),
            "rss_growth_max": max(r.rss_growth for r in rs),
            "preserved": float(all(r.preserved for r in rs)) if c != "none" else 1.0,
        }
    return out


def write_markdown(path: str, s: dict[str, dict[str, float]], runs: list[Run], info: dict[str, Any]) -> None:
    st = info["state_bytes"]
    sync_s = s["sync"]["blocked_med"]
    lines = [
        "# Async checkpoints: loop cost of resumekit's staging modes vs DCP `async_save`",
        "",
        "Produced by (from the repository root):",
        "",
        "```",
        info["command"],
        "```",
        "",
        f"- Date (UTC): {info['date']}; whole script {info['wall']:.0f} s.",
        f"- Machine: {info['machine']['cpu']}; RAM {info['machine']['ram']}; disk {info['machine']['disk']}; "
        f"torch {info['machine']['torch']}; resumekit {info['machine']['resumekit']}.",
        f"- Load: 1-minute load average {info['load0']:.1f} before and {info['load1']:.1f} after, on "
        f"{os.cpu_count()} CPUs shared with other jobs: absolute times are noisy; configurations are "
        "interleaved in one process so ratios compare like with like.",
        f"- State: {info['model']}; checkpointed tensors {st / 1e9:.3f} GB ({st / 2**30:.3f} GiB).",
        f"- Each run: {info['steps']} steps, a checkpoint every {info['every']} ({info['nckpt']} per run); "
        f"{info['reps']} repetition(s) of every configuration. rk-budget: staging_budget={info['budget_mib']} MiB.",
        "- blocked = training-thread time in the call plus waiting for the previous save. overhead per "
        "checkpoint = (run wall time - paired `none` run) / checkpoints: everything the loop pays, including "
        "waits inside the next optimizer step and CPU the background work takes from training; on this "
        "loaded machine it carries seconds of noise per run (see every run below). CPU s per ckpt = the "
        "same difference in this process's CPU time (user + system, all threads), which other jobs' "
        "load barely moves: what each checkpoint costs in CPU work. peak RSS "
        "growth = kernel VmHWM at the end of the run - RSS at its start. values of the call = every "
        "checkpoint read back equals per-tensor float64 sums taken just before its call.",
        "",
        "| configuration | blocked per ckpt, median (s) | later ones (s) | max (s) | blocked, % of sync save | "
        "overhead per ckpt (s) | CPU s per ckpt | peak RSS growth / state | values of the call |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for c, v in s.items():
        if c == "none":
            lines.append(
                f"| none (reference run {v['total_med']:.2f} s) | | | | | | | "
                f"{v['rss_growth_max'] / st:.2f} | |"
            )
            continue
        lines.append(
            f"| {c} | {v['blocked_med']:.4f} | {v['blocked_later_med']:.4f} | {v['blocked_max']:.4f} | "
            f"{v['blocked_pct']:.2f}% | {v['overhead_per_ckpt']:.3f} | {v['cpu_per_ckpt']:.3f} | "
            f"{v['rss_growth_max'] / st:.2f} | "
            f"{'yes' if v['preserved'] else '**no**'} |"
        )
    ov, dcp_ok = (
        s.get("rk-overlap"),
        [c for c in ("dcp", "dcp-bg-wait", "dcp-bg") if c in s and s[c]["preserved"]],
    )
    best_dcp = min((s[c]["overhead_per_ckpt"] for c in dcp_ok), default=float("nan"))
    lines += [
        "",
        "## Targets (issue 15)",
        "",
        "| target | measured | met |",
        "|---|---:|:---:|",
    ]
    if ov is not None:
        lines.append(
            f"| rk-overlap blocks <= 2% of a sync save | {ov['blocked_pct']:.2f}% ({ov['blocked_med'] * 1e3:.1f} ms "
            f"vs {sync_s:.3f} s) | {'yes' if ov['blocked_pct'] <= 2 else 'no'} |"
        )
        lines.append(
            f"| rk-overlap whole-loop overhead per ckpt <= best DCP async_save that kept the values "
            f"({', '.join(dcp_ok) or 'none'}) | {ov['overhead_per_ckpt']:.3f} s vs {best_dcp:.3f} s | "
            f"{'yes' if ov['overhead_per_ckpt'] <= best_dcp else 'no'} |"
        )
    if ov is not None:
        best_cpu = min((s[c]["cpu_per_ckpt"] for c in dcp_ok), default=float("nan"))
        lines.append(
            f"| rk-overlap CPU per ckpt <= best DCP async_save that kept the values | "
            f"{ov['cpu_per_ckpt']:.3f} s vs {best_cpu:.3f} s | {'yes' if ov['cpu_per_ckpt'] <= best_cpu else 'no'} |"
        )
    lines += [
        "",
        "## Every run",
        "",
        "| config | rep | run (s) | CPU (s) | blocked per ckpt (s) | RSS growth (MB) | values |",
        "|---|---:|---:|---:|---|---:|:---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.config} | {r.rep} | {r.total_s:.2f} | {r.cpu_s:.2f} | {', '.join(f'{b:.4f}' for b in r.blocked_s)} | "
            f"{r.rss_growth / 1e6:.0f} | {'' if r.preserved is None else ('yes' if r.preserved else 'no')} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_chart(path: str, s: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c for c in s if c != "none"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(names, [s[c]["blocked_med"] * 1e3 for c in names], color="tab:blue")
    axes[0].set_ylabel("loop blocked per checkpoint (ms, median)")
    axes[0].set_yscale("log")
    axes[1].bar(
        names,
        [s[c]["overhead_per_ckpt"] for c in names],
        color=["tab:green" if s[c]["preserved"] else "tab:red" for c in names],
    )
    axes[1].set_ylabel("whole-loop overhead per checkpoint (s)\nred: values of the call not kept")
    for ax in axes:
        ax.tick_params(axis="x", rotation=35)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params-mb", type=float, default=150.0, help="float32 parameters (state ~3x with AdamW)")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of every configuration first")
    p.add_argument("--budget-mib", type=int, default=256)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary folder)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "async_overlap"))
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    model, opt = bab.build_model(args.params_mb, args.width)
    bab.train_step(model, opt, args.batch, args.width)  # moments exist
    state_bytes = sum(t.numel() * t.element_size() for t in bsr.state_tensors(model, opt))
    root = tempfile.mkdtemp(prefix="rk-overlap-", dir=args.dir)
    configs = [c for c in CONFIGS if c in args.configs.split(",")]
    runs: list[Run] = []
    try:
        # Warm-up runs are discarded: the first run of each configuration pays imports, thread and
        # process-group start-up and cold allocator pools, which no later checkpoint of a run pays.
        warm = argparse.Namespace(**{**vars(args), "steps": args.every})
        for _ in range(args.warmup):
            for c in configs:
                run_once(c, -1, model, opt, warm, root)
        for rep in range(args.reps):
            order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
            for c in order:
                r = run_once(c, rep, model, opt, args, root)
                print(
                    f"rep {rep} {c:12s} run {r.total_s:6.2f} s blocked "
                    f"{[round(b, 4) for b in r.blocked_s]} preserved {r.preserved}",
                    flush=True,
                )
                runs.append(r)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    nckpt = args.steps // args.every
    s = summarise(runs, nckpt)
    info = {
        "command": ".venv/bin/python benchmarks/bench_async_overlap.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "wall": time.perf_counter() - t_start,
        "machine": bsr.describe_machine(root if os.path.exists(root) else tempfile.gettempdir()),
        "load0": load0,
        "load1": os.getloadavg()[0],
        "state_bytes": state_bytes,
        "model": f"{sum(1 for m in model if isinstance(m, nn.Linear))} x nn.Linear({args.width}, {args.width}), "
        f"AdamW, batch {args.batch}, CPU",
        "steps": args.steps,
        "every": args.every,
        "nckpt": nckpt,
        "reps": args.reps,
        "budget_mib": args.budget_mib,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_markdown(args.out + ".md", s, runs, info)
    write_chart(args.out + ".png", s)
    with open(args.out + ".md") as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
