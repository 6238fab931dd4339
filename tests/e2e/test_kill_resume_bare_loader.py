"""SIGKILL a loop that uses a bare DataLoader over a ResumableSampler (tests/e2e/_bare_loop.py), resume it.

With ``num_workers=0`` the resumed run is the uninterrupted run bit for bit: every step's sample indices and
loss, and the final weights. With ``num_workers=2`` every step trains on the same samples (nothing skipped or
repeated) and the workers' random augmentation cannot be replayed: both the killed run (at its first save)
and the resumed run (at restore) warn, naming the fix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

SCRIPT = Path(__file__).with_name("_bare_loop.py")
TOTAL = 18  # 48 samples / batch 8 = 6 steps an epoch, 3 epochs
WARNING = "not wrapped in resumekit.ResumableLoader"


def _run(out: Path, workers: int, kill_at: int | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--workers", str(workers)]
    if kill_at is not None:
        cmd += ["--kill-at", str(kill_at)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "always::RuntimeWarning"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def _steps(out: Path) -> dict[int, dict[str, object]]:
    """step -> what it trained on; a step replayed after a resume must log the same samples."""
    seen: dict[int, dict[str, object]] = {}
    for line in (out / "steps.jsonl").read_text().splitlines():
        rec = json.loads(line)
        step = rec.pop("step")
        if step in seen:
            assert seen[step]["indices"] == rec["indices"], f"step {step} replayed other samples"
        seen[step] = rec
    return seen


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    runs = {}
    for workers in (0, 2):
        out = tmp_path_factory.mktemp(f"straight-{workers}")
        proc = _run(out, workers)
        assert proc.returncode == 0, proc.stderr
        runs[workers] = out
    return runs


@pytest.mark.timeout(300)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kill_at=st.integers(min_value=1, max_value=TOTAL - 1))
@example(kill_at=7)  # resumes from step 6: saved at the last batch of epoch 0, inside the loop
def test_num_workers_0_sigkill_anywhere_then_resume_is_bitwise_identical(
    straight: dict[int, Path], tmp_path_factory: pytest.TempPathFactory, kill_at: int
) -> None:
    out = tmp_path_factory.mktemp("killed-0")
    killed = _run(out, 0, kill_at)
    assert killed.returncode == -signal.SIGKILL
    resumed = _run(out, 0)
    assert resumed.returncode == 0, resumed.stderr
    assert WARNING not in killed.stderr + resumed.stderr
    last = (kill_at - 1) - (kill_at - 1) % 3  # killed before that step's own checkpoint
    assert (f"resumed from step {last}" if last else "fresh start") in resumed.stdout
    assert _steps(out) == _steps(straight[0]) and len(_steps(out)) == TOTAL
    assert (out / "final.safetensors").read_bytes() == (straight[0] / "final.safetensors").read_bytes()


@pytest.mark.timeout(300)
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kill_at=st.integers(min_value=4, max_value=TOTAL - 1))
def test_num_workers_2_sigkill_then_resume_trains_the_same_samples_and_warns(
    straight: dict[int, Path], tmp_path_factory: pytest.TempPathFactory, kill_at: int
) -> None:
    out = tmp_path_factory.mktemp("killed-2")
    killed = _run(out, 2, kill_at)
    assert killed.returncode == -signal.SIGKILL
    assert killed.stderr.count(WARNING) == 1, killed.stderr  # once, at the first save
    resumed = _run(out, 2)
    assert resumed.returncode == 0, resumed.stderr
    assert "this checkpoint was written by a run whose DataLoader had num_workers=2" in resumed.stderr
    assert "resumekit.ResumableLoader(DataLoader(...))" in resumed.stderr
    got, want = _steps(out), _steps(straight[2])
    assert len(got) == TOTAL
    assert [got[s]["indices"] for s in sorted(got)] == [want[s]["indices"] for s in sorted(want)]
