"""A real ``Accelerator`` run SIGKILLed mid-epoch and resumed equals the uninterrupted run, bit for bit.

The file is also the training script the tests launch (``python this_file.py ...``, or under
``accelerate launch --multi_gpu --num_processes 2`` with ``Accelerator(cpu=True)``: two CPU processes). The run has dropout, a shuffled dataloader, AdamW, a
scheduler and gradient accumulation 2; it saves every 5 micro-batches (so odd steps, inside an
accumulation window) and kills itself with SIGKILL right after a micro-batch that is not a save point.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve()
TOTAL = 40  # micro-batches; epochs hold 24 (1 process) or 12 (2 processes) batches
SAVE_EVERY = 5
KILL_AT = 27  # last checkpoint 25: mid-epoch, mid accumulation window


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The caller's path first (it may pin another checkout of the core), then this checkout's.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [env.get("PYTHONPATH", ""), str(ROOT), str(ROOT / "adapters")] if p
    )
    env["OMP_NUM_THREADS"] = "1"
    env.pop("ACCELERATE_CONFIG_FILE", None)
    return env


def train(ckpt_dir: str, out_dir: str, kill_at: int) -> None:
    """Train TOTAL micro-batches, resuming from ``ckpt_dir``; log each loss; SIGKILL after ``kill_at``."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from safetensors.torch import save_file
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from resumekit_accelerate import AcceleratorCheckpointer

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    set_seed(0)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(96, 8, generator=g)
    y = (x @ torch.randn(8, 1, generator=g)).sin()
    dl = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.9)
    model, opt, dl, sched = accelerator.prepare(model, opt, dl, sched)
    progress = {"micro": 0}
    ckpt = AcceleratorCheckpointer(accelerator, ckpt_dir, keep_last=2, extra_state={"progress": progress})
    ckpt.load_state()
    rank = accelerator.process_index
    with open(os.path.join(out_dir, f"losses-{rank}.txt"), "a") as log:
        while progress["micro"] < TOTAL:
            for xb, yb in dl:
                with accelerator.accumulate(model):
                    loss = nn.functional.mse_loss(model(xb), yb)
                    accelerator.backward(loss)
                    opt.step()
                    sched.step()
                    opt.zero_grad()
                progress["micro"] += 1
                micro = progress["micro"]
                log.write(f"{micro} {float(loss.item()).hex()}\n")
                log.flush()
                if micro % SAVE_EVERY == 0:
                    ckpt.save_state(step=micro)
                if micro == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if micro == TOTAL:
                    break
    if accelerator.is_main_process:
        weights = accelerator.unwrap_model(model).state_dict()
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(out_dir, "final.safetensors"))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _start(num_processes: int, ckpt: Path, out: Path, kill_at: int) -> subprocess.Popen[str]:
    out.mkdir(parents=True, exist_ok=True)
    args = [str(THIS), "--ckpt", str(ckpt), "--out", str(out), "--kill-at", str(kill_at)]
    if num_processes == 1:
        cmd = [sys.executable, *args]
    else:
        # `--cpu` selects accelerate's single-process launcher (multi-CPU there means MPI); `--multi_gpu`
        # selects torchrun, and Accelerator(cpu=True) in the script makes it MULTI_CPU over gloo.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *args]  # fmt: skip
    return subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(out)
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"training run timed out:\n{output[-4000:]}")
    return proc.returncode, output


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _losses(out: Path, rank: int) -> dict[int, str]:
    """micro-batch -> loss bits; a micro-batch logged twice (redone after the kill) must agree."""
    seen: dict[int, str] = {}
    for line in (out / f"losses-{rank}.txt").read_text().splitlines():
        micro_s, bits = line.split()
        micro = int(micro_s)
        assert seen.get(micro, bits) == bits, f"rank {rank} micro-batch {micro} gave two different losses"
        seen[micro] = bits
    return seen


def _weights(out: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    return {k: v.numpy().tobytes() for k, v in load_file(str(out / "final.safetensors")).items()}


def _kill_and_resume(tmp_path: Path, num_processes: int) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    # The uninterrupted run and the run that gets killed are independent: run them side by side.
    ok = _start(num_processes, straight / "ckpt", straight, kill_at=-1)
    killed = _start(num_processes, broken / "ckpt", broken, kill_at=KILL_AT)
    (ok_rc, ok_out), (killed_rc, killed_out) = _finish(ok), _finish(killed)
    assert ok_rc == 0, ok_out[-4000:]
    assert killed_rc != 0, f"the run was supposed to be killed:\n{killed_out[-2000:]}"
    assert not (broken / "final.safetensors").exists()
    committed = sorted(p.name for p in (broken / "ckpt").iterdir() if (p / "manifest.json").exists())
    assert committed[-1] == f"step-{KILL_AT // SAVE_EVERY * SAVE_EVERY:012d}", committed
    assert len(committed) == 2, f"keep_last=2 should leave two checkpoints, found {committed}"
    resumed_rc, resumed_out = _finish(_start(num_processes, broken / "ckpt", broken, kill_at=-1))
    assert resumed_rc == 0, resumed_out[-4000:]
    for rank in range(num_processes):
        want, got = _losses(straight, rank), _losses(broken, rank)
        assert sorted(want) == list(range(1, TOTAL + 1))
        assert got == want, (
            f"rank {rank}: losses differ at micro-batches {[m for m in want if got.get(m) != want[m]]}"
        )
    assert _weights(broken) == _weights(straight)
    # The resumed run really resumed: it did not start over at micro-batch 1 (the log would repeat them).
    lines = (broken / "losses-0.txt").read_text().splitlines()
    assert len(lines) == KILL_AT + (TOTAL - KILL_AT // SAVE_EVERY * SAVE_EVERY)
    _check_portable(broken, num_processes)


def _check_portable(out: Path, num_processes: int) -> None:
    """The last checkpoint loads into a plain model and optimizer through the plain Checkpointer."""
    import json

    import torch
    from torch import nn

    import resumekit as rk

    step_dir = max(p for p in (out / "ckpt").iterdir() if (p / "manifest.json").exists())
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert manifest["entries"]["rng"]["ranks"] == list(range(num_processes))
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # Read in this single test process: a different world size is expected here, not drift to report.
    plain = rk.Checkpointer(out / "ckpt", drift_policy=rk.DriftPolicy({"env.world_size": "ignore"}))
    result = plain.restore({"model": model, "optimizer": opt})
    assert result is not None and result.step == TOTAL
    # Canonical keys even when the model was DDP-wrapped (2 processes): it loads into the plain module.
    final = _weights(out)
    assert {k: v.numpy().tobytes() for k, v in model.state_dict().items()} == final
    assert len(opt.state_dict()["state"]) == len(list(model.parameters()))


pytest.importorskip("accelerate")


@pytest.mark.accelerate
def test_sigkill_mid_epoch_resume_is_bitwise_identical(tmp_path: Path) -> None:
    _kill_and_resume(tmp_path, num_processes=1)


@pytest.mark.accelerate
@pytest.mark.distributed
def test_two_processes_sigkill_resume_is_bitwise_identical(tmp_path: Path) -> None:
    _kill_and_resume(tmp_path, num_processes=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill-at", type=int, default=-1)
    a = parser.parse_args()
    train(a.ckpt, a.out, a.kill_at)
    # Everything the test compares is written and closed, and end_training() has destroyed the process
    # group. Skip interpreter finalization: under load, torch's gloo worker threads can still be alive
    # there and abort the finished process with "terminate called without an active exception"
    # (SIGABRT; pytorch issue 190489, fixed upstream by PR 179291). That is torch teardown, not resume.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
