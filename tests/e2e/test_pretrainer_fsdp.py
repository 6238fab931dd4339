"""The pretrainer under FSDP2 (``--fsdp``, 2 gloo processes via torchrun), stopped three ways and
resubmitted: the same final weights and history, bit for bit, as an uninterrupted ``--fsdp`` run.

The interrupted run is stopped (1) by ``--max-epochs-per-run 0.3``, three micro-batches in: inside a
gradient-accumulation window, so the checkpoint carries each rank's shard of the accumulated (DTensor)
gradients; (2) by SIGTERM sent to rank 1 only: both ranks agree on the step, checkpoint it and exit 75;
(3) by SIGKILL of the whole job (torchrun and both workers) at a random instant. Then a plain,
single-process run of the trainer continues the FSDP checkpoint (world 2 -> 1, no process group).

Launch and kill helpers are the DDP test's (tests/e2e/test_pretrainer_ddp.py).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_pretrainer_ddp import ARGS, FINAL, TOTAL_MICRO, _cmd, _descendants, _env, _kill_job, _latest_step

import resumekit as rk
from resumekit.drift import DriftWarning

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MICRO_PER_EPOCH = TOTAL_MICRO // 4


def _fsdp_cmd(out: Path, *extra: str) -> list[str]:
    cmd = _cmd(out)
    cmd[cmd.index("--distributed")] = "--fsdp"
    return [*cmd, *extra]


def _run(out: Path, log: Path, *extra: str) -> int:
    with open(log, "ab") as f:
        return subprocess.run(
            _fsdp_cmd(out, *extra), stdout=f, stderr=subprocess.STDOUT, env=_env(), timeout=300
        ).returncode


def _history(out: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((out / "history.json").read_text())
    return loaded


def _worker_of_rank(torchrun: int, rank: int) -> int:
    """The pid of the worker torchrun started for ``rank`` (found by its environment)."""
    for pid in _descendants(torchrun):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    raise AssertionError(f"no worker of rank {rank} under torchrun {torchrun}")


def _wait_for_step(out: Path, proc: subprocess.Popen[bytes], target: int, what: str) -> None:
    deadline = time.monotonic() + 180
    while _latest_step(out) < target:
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before step {target}: {what}"
        assert time.monotonic() < deadline, f"no progress to step {target} within 180 s: {what}"
        time.sleep(0.005)


@pytest.mark.timeout(900)
def test_fsdp_two_processes_stopped_sigtermed_sigkilled_then_resubmitted_is_bitwise_identical(
    tmp_path: Path,
) -> None:
    straight, out, log = tmp_path / "straight", tmp_path / "run", tmp_path / "log.txt"
    assert _run(straight, log) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "mode: FSDP2 over 2 processes (gloo, cpu" in text
    assert "8 per device x 2 device(s) x 2 accumulation = 32 samples" in text

    # (1) A budget stop three micro-batches in: inside the second accumulation window (accumulation 2).
    # Workers exit 75; torchrun reports any non-zero worker status as its own failure (1).
    assert _run(out, log, "--max-epochs-per-run", "0.3") != 0
    assert _latest_step(out) == 3, log.read_text()[-4000:]
    assert _history(out)["status"] == "incomplete" and not (out / FINAL).exists()
    manifest = json.loads((out / "checkpoints" / "step-000000000003" / "manifest.json").read_text())
    assert manifest["config"]["batch_size"] == 8, "the checkpoint records the per-device batch size"

    seed = random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    # (2) SIGTERM to rank 1 alone, once this job has committed a checkpoint of its own.
    start = _latest_step(out)
    with open(log, "ab") as f:
        proc = subprocess.Popen(_fsdp_cmd(out), stdout=f, stderr=subprocess.STDOUT, env=_env())
    try:
        _wait_for_step(out, proc, start + rng.randint(1, 4), f"seed {seed}")
        os.kill(_worker_of_rank(proc.pid, 1), signal.SIGTERM)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            _kill_job(proc)
    history = _history(out)
    assert history["status"] == "incomplete" and history["stop_reason"].startswith("signal"), history
    assert not (out / FINAL).exists()
    assert "stopped early (signal (on another rank))" in log.read_text(), "rank 0 did not follow rank 1"

    # (3) SIGKILL of the whole job at a random instant after a checkpoint of its own.
    start = _latest_step(out)
    target = start + rng.randint(2, 6)
    assert target < TOTAL_MICRO, f"the earlier jobs ran to step {start}: seed {seed}"
    with open(log, "ab") as f:
        proc = subprocess.Popen(_fsdp_cmd(out), stdout=f, stderr=subprocess.STDOUT, env=_env())
    try:
        _wait_for_step(out, proc, target, f"seed {seed}")
        time.sleep(rng.uniform(0.0, 0.05))
    finally:
        _kill_job(proc)  # also on failure: no process outlives the test
    assert not (out / FINAL).exists()

    assert _run(out, log) == 0, log.read_text()[-4000:]
    assert (out / FINAL).read_bytes() == (straight / FINAL).read_bytes(), f"kill seed {seed}"
    history, expected = _history(out), _history(straight)
    assert len(history.pop("resume_points")) == 3 and expected.pop("resume_points") == []
    assert history == expected, f"kill seed {seed}"  # per-epoch metrics and train curve, exactly

    _check_export_and_plain_restore(out, tmp_path)


def _check_export_and_plain_restore(out: Path, tmp_path: Path) -> None:
    """The export is the full weights of the last checkpoint; that checkpoint restores into plain objects
    in this process, and a plain single-process trainer continues it."""
    from safetensors.torch import load_file

    from reference_trainer.cli import main
    from reference_trainer.model import ProfileEncoder
    from reference_trainer.train import MODEL_SHAPE

    final = load_file(str(out / FINAL))
    torch.manual_seed(0)  # other weights than the run's: the restore must overwrite every one
    plain = ProfileEncoder(
        32,
        hidden_dims=MODEL_SHAPE["hidden_dims"],
        embedding_dim=MODEL_SHAPE["embedding_dim"],
        dropout=MODEL_SHAPE["dropout"],
        input_transform=MODEL_SHAPE["input_transform"],
    )
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.01)
    with pytest.warns(DriftWarning, match="world_size changed: 2 at save, 1 now"):
        result = rk.Checkpointer(str(out / "checkpoints")).restore({"model": plain, "optimizer": plain_opt})
    assert result is not None and result.step == TOTAL_MICRO
    weights = plain.state_dict()
    assert sorted(weights) == sorted(final)
    for name, value in final.items():
        assert torch.equal(weights[name], value), name
    assert int(plain_opt.state_dict()["state"][0]["step"]) == TOTAL_MICRO // 2  # accumulation 2

    # The whole trainer state (sharded model and optimizer, per-rank RNG, sampler, loop counters) into
    # a one-process run, extended by one epoch. World 2 -> 1 is reported as drift, not refused.
    single = tmp_path / "single"
    args = list(ARGS)
    args[args.index("--epochs") + 1] = "5"
    code = main(
        ["--output-dir", str(single), "--resume-from", str(out / "checkpoints"), "--device", "cpu", *args]
    )
    assert code == 0
    history = _history(single)
    assert history["status"] == "complete" and history["last_completed_epoch"] == 5
    assert history["epochs"][:4] == _history(out)["epochs"], "the FSDP run's epochs travel with it"
    assert history["epochs"][4]["micro_batches"] > TOTAL_MICRO


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp_on_gpus_with_nccl_stops_inside_a_window_and_resumes(tmp_path: Path) -> None:
    """``--fsdp`` on CUDA (NCCL, one process per GPU, at most 2): a stop inside an accumulation window and
    a resubmission complete; the export equals the last checkpoint restored into a plain CPU model.

    The resumed weights are compared with the straight run's within a tolerance, not bit for bit: the
    pairwise loss's indexing backward accumulates with CUDA atomics (the trainer does not switch on
    ``torch.use_deterministic_algorithms``), so two straight runs on a GPU may already differ in the
    last bits. On the CPU the test above is bitwise.
    """
    from safetensors.torch import load_file

    world = min(2, torch.cuda.device_count())
    straight, out, log = tmp_path / "straight", tmp_path / "run", tmp_path / "log.txt"

    def run(target: Path, *extra: str) -> int:
        cmd = _fsdp_cmd(target, "--device", "cuda", *extra)
        cmd[cmd.index("--nproc_per_node") + 1] = str(world)
        with open(log, "ab") as f:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), timeout=300).returncode

    assert run(straight) == 0, log.read_text()[-4000:]
    assert f"mode: FSDP2 over {world} processes (nccl, cuda" in log.read_text()
    micro_per_epoch = math.ceil(math.ceil(153 / world) / 8)  # 153 training samples over the ranks, 8 a batch
    first = run(out, "--max-epochs-per-run", str(3 / micro_per_epoch))
    assert first != 0 and _history(out)["status"] == "incomplete", log.read_text()[-4000:]
    assert _latest_step(out) == 3, "the stop is inside the second accumulation window (accumulation 2)"
    assert run(out) == 0, log.read_text()[-4000:]
    history = _history(out)
    assert history["complete"] is True and len(history["resume_points"]) == 1

    final, reference = load_file(str(out / FINAL)), load_file(str(straight / FINAL))
    assert sorted(final) == sorted(reference)
    for name, value in reference.items():
        torch.testing.assert_close(final[name], value, rtol=1e-4, atol=1e-5, msg=name)

    from reference_trainer.model import ProfileEncoder
    from reference_trainer.train import MODEL_SHAPE

    plain = ProfileEncoder(
        32,
        hidden_dims=MODEL_SHAPE["hidden_dims"],
        embedding_dim=MODEL_SHAPE["embedding_dim"],
        dropout=MODEL_SHAPE["dropout"],
        input_transform=MODEL_SHAPE["input_transform"],
    )
    assert rk.Checkpointer(str(out / "checkpoints")).restore({"model": plain}) is not None
    for name, value in plain.state_dict().items():
        assert torch.equal(value, final[name]), f"the export differs from the last checkpoint: {name}"
