"""The pretrainer under DDP (2 gloo processes via torchrun), SIGKILLed twice and resubmitted: same weights.

A kill takes down the whole job at once, torchrun and both workers (torchrun starts its workers in
sessions of their own, so they are found through /proc and killed with it), like a node that dies.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARGS = (
    "--num-samples", "170", "--num-features", "32", "--epochs", "4", "--batch-size", "8",
    "--grad-accumulation", "2", "--save-every-steps", "1", "--keep-last", "2", "--seed", "5",
    "--warmup-steps", "3",
)  # fmt: skip
TOTAL_MICRO = 4 * 10  # 153 training samples over 2 ranks -> 77 per rank / 8 = 10 micro-batches an epoch
FINAL = Path("final") / "model.safetensors"

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _cmd(out: Path) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), "-m", "reference_trainer", "--distributed", "--output-dir", str(out), *ARGS,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(ROOT / "adapters"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def _latest_step(out: Path) -> int:
    steps = [int(m.parent.name.split("-")[1]) for m in (out / "checkpoints").glob("step-*/manifest.json")]
    return max(steps, default=-1)


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found += children
        frontier += children
    return found


def _kill_job(proc: subprocess.Popen[bytes]) -> None:
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _run(out: Path, log: Path) -> int:
    with open(log, "ab") as f:
        return subprocess.run(
            _cmd(out), stdout=f, stderr=subprocess.STDOUT, env=_env(), timeout=300
        ).returncode


def test_ddp_two_processes_sigkilled_twice_then_resubmitted_is_bitwise_identical(tmp_path: Path) -> None:
    straight, out, log = tmp_path / "straight", tmp_path / "run", tmp_path / "log.txt"
    assert _run(straight, log) == 0, log.read_text()[-4000:]
    assert "8 per device x 2 device(s) x 2 accumulation = 32 samples" in log.read_text()
    seed = random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    for first in (True, False):
        # Each job must commit a checkpoint of its own before it is killed (so its resume point is
        # recorded): the second target counts from where the second job resumes, since a fast first
        # job may run past any fixed target before the kill lands.
        start = _latest_step(out)
        target = rng.randint(2, TOTAL_MICRO // 4) if first else start + rng.randint(2, 6)
        assert target < TOTAL_MICRO, f"the first job ran to step {start} before it was killed: seed {seed}"
        with open(log, "ab") as f:
            proc = subprocess.Popen(_cmd(out), stdout=f, stderr=subprocess.STDOUT, env=_env())
        try:
            deadline = time.monotonic() + 180
            while _latest_step(out) < target:
                assert proc.poll() is None, (
                    f"the run exited ({proc.returncode}) before step {target}: seed {seed}"
                )
                assert time.monotonic() < deadline, "no progress"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.05))
        finally:
            _kill_job(proc)  # also on failure: no process outlives the test
        assert not (out / FINAL).exists()
    assert _run(out, log) == 0, log.read_text()[-4000:]
    assert (out / FINAL).read_bytes() == (straight / FINAL).read_bytes(), f"kill seed {seed}"
    history = json.loads((out / "history.json").read_text())
    assert len(history["resume_points"]) == 2 and history["complete"] is True
    manifest = json.loads(next((out / "checkpoints").glob("step-*/manifest.json")).read_text())
    assert manifest["config"]["batch_size"] == 8, "the checkpoint records the per-device batch size"
