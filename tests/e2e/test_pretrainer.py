"""The pretrainer killed for real, resubmitted unchanged, ends with the same weights, bit for bit.

Every run is a fresh ``python -m reference_trainer`` process with the same flags. The straight run is
never interrupted; the others are SIGKILLed at random instants (after a checkpoint at a random step, plus
a random delay), stopped by ``--max-epochs-per-run 0.5`` or by SIGTERM, and resubmitted until exit 0.
The workload has dropout, shuffling, 2 DataLoader workers, accumulation 2 with checkpoints inside
accumulation windows, and an 11-micro-batch epoch (a short last window).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARGS = (
    "--num-samples", "190", "--num-features", "32", "--epochs", "2", "--batch-size", "16",
    "--grad-accumulation", "2", "--save-every-steps", "1", "--keep-last", "2", "--num-workers", "2",
    "--seed", "3", "--warmup-steps", "3",
)  # fmt: skip
MICRO_PER_EPOCH = 11  # 171 training samples / 16
TOTAL_MICRO = 2 * MICRO_PER_EPOCH
FINAL = Path("final") / "model.safetensors"


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(ROOT / "adapters"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "reference_trainer", "--output-dir", str(out), *ARGS, *extra]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cmd(out, *extra), capture_output=True, text=True, timeout=300, env=_env())


def _latest_step(out: Path) -> int:
    steps = [int(m.parent.name.split("-")[1]) for m in (out / "checkpoints").glob("step-*/manifest.json")]
    return max(steps, default=-1)


def _history(out: Path) -> dict:
    return json.loads((out / "history.json").read_text())


def _metrics(out: Path) -> list[tuple[float, float, float]]:
    return [(r["train_loss"], r["val_loss"], r["lr"]) for r in _history(out)["epochs"]]


def _start(out: Path, log: Path) -> subprocess.Popen[bytes]:
    # A session of its own: a kill takes the trainer and its DataLoader workers down together, like a
    # node that dies (and leaves no orphaned worker behind).
    with open(log, "ab") as f:
        return subprocess.Popen(
            _cmd(out), stdout=f, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
        )


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill the run's whole session if it is still alive (a failed test leaves no process behind)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_for_step(proc: subprocess.Popen[bytes], out: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while _latest_step(out) < step:
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before checkpoint step {step}")
        if time.monotonic() > deadline:
            _reap(proc)
            raise AssertionError(f"no checkpoint step >= {step} within {timeout} s")
        time.sleep(0.005)


def _resubmit_until_complete(out: Path, limit: int = 8) -> list[int]:
    codes = []
    for _ in range(limit):
        proc = _run(out)
        codes.append(proc.returncode)
        if proc.returncode == 0:
            return codes
        assert proc.returncode == 75, proc.stderr[-3000:]
    raise AssertionError(f"not complete after {limit} submissions: {codes}")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _history(out)["complete"] is True
    return out


@pytest.mark.slow
def test_sigkill_twice_at_random_instants_then_resubmit_is_bitwise_identical(
    straight: Path, tmp_path: Path
) -> None:
    seed = random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    out, log = tmp_path / "run", tmp_path / "log.txt"
    targets = [rng.randint(2, TOTAL_MICRO // 3), 0]
    for i in range(2):
        if i == 1:
            # Counted from where the second job resumes: a first job killed late must not empty the range.
            lo = _latest_step(out) + 2
            targets[1] = rng.randint(lo, max(lo, 2 * TOTAL_MICRO // 3))
        proc = _start(out, log)
        try:
            _wait_for_step(proc, out, targets[i])
            time.sleep(rng.uniform(0.0, 0.05))  # the kill lands anywhere between two checkpoints
            os.killpg(proc.pid, signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL, f"kill {i + 1} came too late (seed {seed})"
        finally:
            _reap(proc)
        assert not (out / FINAL).exists()
    # history.json appears at the first epoch end; before that there is nothing to report.
    history_file = out / "history.json"
    assert not history_file.exists() or _history(out)["complete"] is False, "a killed run said complete"
    codes = _resubmit_until_complete(out)
    assert codes == [0], f"seed {seed}: {codes}"
    assert (out / FINAL).read_bytes() == (straight / FINAL).read_bytes(), (
        f"kill seed {seed}, targets {targets}"
    )
    assert _metrics(out) == _metrics(straight)
    assert len(_history(out)["resume_points"]) == 2


@pytest.mark.slow
def test_half_epoch_per_run_resubmitted_until_exit_0_is_bitwise_identical(
    straight: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    codes = []
    for _ in range(8):
        proc = _run(out, "--max-epochs-per-run", "0.5")
        codes.append(proc.returncode)
        if proc.returncode == 0:
            break
        assert proc.returncode == 75, proc.stderr[-3000:]
        history = _history(out)
        assert history["status"] == "incomplete" and history["complete"] is False
        assert history["stop_reason"] == "max-epochs-per-run"
        assert not (out / FINAL).exists(), "a partial run wrote the final weights"
    # round(0.5 * 11) = 6 micro-batches a run: stops at 6, 12 (inside an accumulation window), 18, then done.
    assert codes == [75, 75, 75, 0]
    assert (out / FINAL).read_bytes() == (straight / FINAL).read_bytes()
    assert _metrics(out) == _metrics(straight)
    assert [p["step"] for p in _history(out)["resume_points"]] == [6, 12, 18]
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sigterm_checkpoints_at_that_step_and_exits_75(tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _start(out, log)
    try:
        _wait_for_step(proc, out, 3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 75, log.read_text()[-3000:]
    finally:
        _reap(proc)
    text = log.read_text()
    match = re.search(r"stopped early \(signal SIGTERM\) at epoch [\d.]+ of 2: checkpoint step (\d+)", text)
    assert match, text[-3000:]
    step = int(match.group(1))
    assert 3 <= step < TOTAL_MICRO
    assert _latest_step(out) == step, "the stop's checkpoint is the newest one"
    history = _history(out)
    assert (history["status"], history["stop_reason"], history["complete"]) == (
        "incomplete",
        "signal SIGTERM",
        False,
    )
    assert not (out / FINAL).exists()
