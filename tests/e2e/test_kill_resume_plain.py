"""Kill a real training process at any micro-batch, resume it in a fresh process, and get the same run.

The loop (examples/train_plain.py) has dropout, random augmentation in 2 DataLoader workers, shuffling,
AdamW, warmup + cosine, gradient accumulation 3 with checkpoints inside accumulation windows. The
resumed run's final weights and every logged loss must equal an uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train_plain.py"
TOTAL_MICRO = 72  # 384 samples / batch 16 = 24 micro-batches per epoch, 3 epochs


def _run(out: Path, *extra: str, world: int = 1) -> subprocess.CompletedProcess[str]:
    if world == 1:
        cmd = [sys.executable, str(SCRIPT), "--out", str(out), *extra]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
            "--master_addr=127.0.0.1", f"--master_port={port}", str(SCRIPT), "--out", str(out), *extra,
        ]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _losses(out: Path, rank: int = 0) -> dict[int, str]:
    """micro-batch -> loss (float.hex); a micro-batch replayed after a resume must log the same loss."""
    seen: dict[int, str] = {}
    for line in (out / f"losses-rank{rank}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["micro"] in seen:
            assert seen[rec["micro"]] == rec["loss"], f"micro-batch {rec['micro']} replayed differently"
        seen[rec["micro"]] = rec["loss"]
    return seen


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr
    return out


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kill_at=st.integers(min_value=6, max_value=TOTAL_MICRO - 1))
def test_sigkill_anywhere_then_resume_is_bitwise_identical(
    straight: Path, tmp_path_factory: pytest.TempPathFactory, kill_at: int
) -> None:
    out = tmp_path_factory.mktemp("killed")
    killed = _run(out, "--kill-at", str(kill_at))
    assert killed.returncode == -signal.SIGKILL
    resumed = _run(out)
    assert resumed.returncode == 0, resumed.stderr
    last_ckpt = kill_at - kill_at % 5
    assert f"resumed from step {last_ckpt}" in resumed.stdout
    assert (out / "final.safetensors").read_bytes() == (straight / "final.safetensors").read_bytes()
    assert _losses(out) == _losses(straight)
    assert len(_losses(out)) == TOTAL_MICRO


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_two_processes_sigkill_and_resume_is_bitwise_identical(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert _run(straight, world=2).returncode == 0
    out = tmp_path / "killed"
    killed = _run(out, "--kill-at", "23", world=2)
    assert killed.returncode != 0
    resumed = _run(out, world=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 20" in resumed.stdout
    assert (out / "final.safetensors").read_bytes() == (straight / "final.safetensors").read_bytes()
    for rank in (0, 1):
        assert _losses(out, rank) == _losses(straight, rank)
