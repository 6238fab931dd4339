"""The pretrainer's CLI contract and its field lessons, run in-process through ``reference_trainer.cli.main``.

Each test calls ``main(argv)`` as the console script would and checks the exit status, what was printed
and what landed in the output dir (local, or an in-memory fsspec store that counts reads).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from safetensors import safe_open

import resumekit as rk
from reference_trainer.cli import EXIT_COMPLETE, EXIT_FAILED, EXIT_TEMPFAIL, EXIT_USAGE, main
from reference_trainer.config import PretrainConfig
from reference_trainer.devices import Placement
from reference_trainer.evaluation import EvalBatches
from reference_trainer.progress import Progress
from reference_trainer.signals import StopSignals
from reference_trainer.train import Run, start_epoch

SMALL = (
    "--num-samples", "120", "--num-features", "16", "--batch-size", "8", "--epochs", "2",
    "--save-every-steps", "2", "--warmup-steps", "2",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(out: Any, *extra: str, base: tuple[str, ...] = SMALL) -> int:
    return main(["--output-dir", str(out), *base, *extra])


def _history(out: Path) -> dict[str, Any]:
    return json.loads((out / "history.json").read_text())


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return dict(meta)


# -- exit codes and flags ----------------------------------------------------------------------------


def test_complete_run_exits_0_and_writes_every_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, "--grad-accumulation", "2") == EXIT_COMPLETE
    err = capsys.readouterr().err
    # Batch size per device, and the global batch spelled out, at start.
    assert "global batch: 8 per device x 1 device(s) x 2 accumulation = 16 samples per optimizer step" in err
    assert "never cross micro-batches" in err
    history = _history(tmp_path)
    assert (history["status"], history["complete"], history["last_completed_epoch"]) == ("complete", True, 2)
    assert [r["epoch"] for r in history["epochs"]] == [1, 2]
    for record in history["epochs"]:
        assert {"train_loss", "val_loss", "val_predicted_std", "val_spread_ratio", "lr"} <= set(record)
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    # Plain safetensors, no resumekit needed; metadata names the epoch.
    meta = _metadata(tmp_path / "final" / "model.safetensors")
    assert (meta["last_epoch"], meta["epochs_planned"], meta["early_stopped"]) == ("2", "2", "false")
    # A completed run resubmitted stays complete without training more.
    steps = rk.Checkpointer(tmp_path / "checkpoints").steps()
    assert _run(tmp_path, "--grad-accumulation", "2") == EXIT_COMPLETE
    assert rk.Checkpointer(tmp_path / "checkpoints").steps() == steps


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (("--distributed", "--data-parallel"), "--distributed and --data-parallel cannot be combined"),
        (("--data-parallel",), "--data-parallel needs CUDA GPUs"),
        (("--distributed",), "--distributed needs the environment torchrun sets up"),
        (("--fsdp", "--data-parallel"), "--fsdp and --data-parallel cannot be combined"),
        (("--fsdp", "--distributed"), "--fsdp and --distributed cannot be combined"),
        (("--fsdp",), "--fsdp needs the environment torchrun sets up"),
        (("--device", "cuda"), "--device cuda was requested but torch sees no CUDA device"),
        (("--batch-size", "0"), "--batch-size must be at least 1"),
        (("--max-epochs-per-run", "0"), "--max-epochs-per-run must be a positive number"),
    ],
)
def test_unusable_flags_exit_2_with_a_message_naming_them(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: tuple[str, ...],
    needle: str,
) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    if "cuda" in needle.lower() and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert _run(tmp_path, *flags) == EXIT_USAGE
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


def test_torchrun_without_distributed_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _run(tmp_path) == EXIT_USAGE
    assert "WORLD_SIZE=2 but without --distributed" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["--data-parallel", "--auto-batch-size"])
def test_gpu_modes_complete(tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str) -> None:
    assert _run(tmp_path, mode, "--device", "cuda", "--epochs", "1") == EXIT_COMPLETE
    err = capsys.readouterr().err
    assert "global batch:" in err and "SKIPPED" not in err
    assert _metadata(tmp_path / "final" / "model.safetensors")["last_epoch"] == "1"


def test_resume_from_none_refuses_a_folder_with_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, "--max-epochs-per-run", "0.5") == EXIT_TEMPFAIL
    assert _run(tmp_path, "--resume-from", "none") == EXIT_USAGE
    assert "--resume-from auto" in capsys.readouterr().err


def test_resume_from_a_checkpoint_folder_continues_into_a_new_output_dir(tmp_path: Path) -> None:
    first, second, straight = tmp_path / "first", tmp_path / "second", tmp_path / "straight"
    assert _run(first, "--max-epochs-per-run", "0.5") == EXIT_TEMPFAIL
    step = rk.Checkpointer(first / "checkpoints").latest_step()
    source = first / "checkpoints" / f"step-{step:012d}"
    assert _run(second, "--resume-from", str(source)) == EXIT_COMPLETE
    assert _run(straight) == EXIT_COMPLETE
    final = Path("final") / "model.safetensors"
    assert (second / final).read_bytes() == (straight / final).read_bytes()
    assert _history(second)["resume_points"][0]["step"] == step


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
def test_sigusr1_and_ctrl_c_checkpoint_at_the_next_step_and_exit_75(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sig: signal.Signals
) -> None:
    def send_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 60
        while (
            not list((tmp_path / "checkpoints").glob("step-*/manifest.json")) and time.monotonic() < deadline
        ):
            time.sleep(0.002)
        os.kill(os.getpid(), sig)

    sender = threading.Thread(target=send_after_first_checkpoint)
    sender.start()
    code = _run(tmp_path, "--epochs", "40")
    sender.join()
    assert code == EXIT_TEMPFAIL
    history = _history(tmp_path)
    assert history["stop_reason"] == f"signal {sig.name}" and history["complete"] is False
    assert f"stopped early (signal {sig.name})" in capsys.readouterr().err
    assert history["last_completed_epoch"] < 40 and not (tmp_path / "final").exists()
    # The handlers were only borrowed.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_time_budget_stops_before_it_runs_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    budget = 6.0
    t0 = time.monotonic()
    code = _run(tmp_path, "--epochs", "500", "--time-budget", str(budget))
    elapsed = time.monotonic() - t0
    assert code == EXIT_TEMPFAIL
    assert elapsed < budget, f"took {elapsed:.2f} s of a {budget} s budget"
    assert _history(tmp_path)["stop_reason"] == "time-budget"
    assert rk.Checkpointer(tmp_path / "checkpoints").latest_step() is not None
    assert "run the same command again to continue (exit 75)" in capsys.readouterr().err


# -- field lessons -----------------------------------------------------------------------------------


def test_scheduler_length_counts_optimizer_steps_not_micro_batches(tmp_path: Path) -> None:
    # 108 training samples / 8 = 14 micro-batches an epoch; accumulation 3 -> 5 optimizer steps an epoch
    # (the last window holds 2). Cosine decay reaches exactly 0 at the last optimizer step only if its
    # length is 2 * 5 = 10 steps; counted in micro-batches (28) it would stop at a third of the way.
    assert _run(tmp_path, "--grad-accumulation", "3", "--warmup-steps", "0") == EXIT_COMPLETE
    epochs = _history(tmp_path)["epochs"]
    assert [r["optimizer_steps"] for r in epochs] == [5, 10]
    assert [r["micro_batches"] for r in epochs] == [14, 28]
    assert epochs[-1]["lr"] == 0.0
    assert 0.0 < epochs[0]["lr"] < 1e-3


class CountingMemoryFS(MemoryFileSystem):
    """An in-memory fsspec store that counts every read of every path."""

    protocol = "countmem"
    reads: ClassVar[Counter[str]] = Counter()

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if "r" in mode:
            CountingMemoryFS.reads[self._strip_protocol(path)] += 1
        return super()._open(path, mode, *args, **kwargs)

    def cat_file(self, path: str, *args: Any, **kwargs: Any) -> Any:
        CountingMemoryFS.reads[self._strip_protocol(path)] += 1
        return super().cat_file(path, *args, **kwargs)


def test_checkpoint_is_read_exactly_once_on_resume_and_outputs_go_through_fsspec() -> None:
    fsspec.register_implementation("countmem", CountingMemoryFS, clobber=True)
    run_id = f"pretrainer-{os.getpid()}-{time.monotonic_ns()}"
    url = f"countmem://{run_id}"
    fs = fsspec.filesystem("countmem")
    try:
        assert _run(url, "--max-epochs-per-run", "0.5") == EXIT_TEMPFAIL
        step = rk.Checkpointer(url + "/checkpoints").latest_step()
        assert step is not None
        CountingMemoryFS.reads.clear()
        assert _run(url) == EXIT_COMPLETE
        data_reads = {
            p: n
            for p, n in CountingMemoryFS.reads.items()
            if "/checkpoints/" in p and not p.endswith("manifest.json")
        }
        assert len(data_reads) >= 4, f"the resume read too little checkpoint data: {data_reads}"
        assert all(f"/checkpoints/step-{step:012d}/" in p for p in data_reads), data_reads
        assert set(data_reads.values()) == {1}, f"files read more than once: {data_reads}"
        for name in ("history.json", "loss_curves.png", "final/model.safetensors"):
            assert fs.exists(f"{url}/{name}"), name
        assert json.loads(fs.cat_file(f"{url}/history.json"))["complete"] is True
    finally:
        for key in [k for k in CountingMemoryFS.store if run_id in k]:
            del CountingMemoryFS.store[key]


def test_set_epoch_reaches_the_train_and_the_validation_sampler() -> None:
    data = torch.arange(20.0)
    train = rk.ResumableSampler(data, seed=0)
    val = EvalBatches(10, batch_size=4)
    start_epoch(train, val, 3)
    assert (train.epoch, val.epoch) == (3, 3)


def test_validation_batches_are_unpadded_and_equally_many_on_every_rank() -> None:
    shards = [list(EvalBatches(11, batch_size=2, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    seen = sorted(i for s in shards for batch in s for i in batch)
    assert seen == list(range(11)), "every validation sample exactly once, none repeated as padding"


def test_train_validation_split_is_seeded(tmp_path: Path) -> None:
    def split(seed: int) -> tuple[list[int], list[int]]:
        cfg = PretrainConfig(output_dir=str(tmp_path), num_samples=120, num_features=16, seed=seed)
        run = Run(cfg, Placement("single", torch.device("cpu")), StopSignals(), time.monotonic())
        run.setup()
        return list(run.train_set.indices), list(run.val_set.indices)

    first = split(0)
    assert split(0) == first
    assert split(1) != first
    assert not set(first[0]) & set(first[1])


def test_early_stopping_final_weights_name_the_last_epoch_trained(tmp_path: Path) -> None:
    # lr 0: the validation loss never improves after epoch 1, so patience 1 stops after epoch 2 of 6.
    assert _run(tmp_path, "--epochs", "6", "--lr", "0", "--early-stopping-patience", "1") == EXIT_COMPLETE
    meta = _metadata(tmp_path / "final" / "model.safetensors")
    assert (meta["last_epoch"], meta["epochs_planned"], meta["early_stopped"]) == ("2", "6", "true")
    history = _history(tmp_path)
    assert (history["last_completed_epoch"], history["early_stopped"], history["status"]) == (
        2,
        True,
        "complete",
    )
    progress: dict[str, Any] = {}
    restored = rk.Checkpointer(tmp_path / "checkpoints").restore({"progress": progress}, strict=False)
    assert restored is not None and progress["epoch"] == 2 and progress["early_stopped"] is True


def test_auto_batch_size_on_cpu_warns_that_it_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, "--auto-batch-size", "--device", "cpu", "--epochs", "1") == EXIT_COMPLETE
    err = capsys.readouterr().err
    assert "WARNING" in err and "--auto-batch-size is SKIPPED on CPU" in err
    assert "Training with --batch-size 8 per device" in err
    assert "global batch: 8 per device" in err


def test_drift_warnings_are_printed_at_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(tmp_path, "--max-epochs-per-run", "0.5") == EXIT_TEMPFAIL
    capsys.readouterr()
    i = SMALL.index("--batch-size") + 1
    changed = (*SMALL[:i], "12", *SMALL[i + 1 :])  # per device
    assert _run(tmp_path, "--lr", "0.002", "--max-epochs-per-run", "0.5", base=changed) == EXIT_TEMPFAIL
    err = capsys.readouterr().err
    start = err.index("resumed from checkpoint")
    warnings = [line for line in err[:start].splitlines() if "WARNING resumekit" in line]
    assert any("lr" in line for line in warnings), err[:start]
    assert any("batch" in line and "8" in line and "12" in line for line in warnings), err[:start]
    assert "drift: 2 warning(s), listed above" in err


def test_raising_epochs_after_completion_trains_the_extra_epochs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    i = SMALL.index("--epochs") + 1
    one_epoch = (*SMALL[:i], "1", *SMALL[i + 1 :])
    assert _run(tmp_path, base=one_epoch) == EXIT_COMPLETE
    assert _metadata(tmp_path / "final" / "model.safetensors")["last_epoch"] == "1"
    assert _run(tmp_path) == EXIT_COMPLETE
    err = capsys.readouterr().err
    assert "config.epochs changed: 1 at save, 2 now" in err
    assert "extending a completed run from 1 to 2 epochs" in err
    assert _metadata(tmp_path / "final" / "model.safetensors")["last_epoch"] == "2"
    assert [r["epoch"] for r in _history(tmp_path)["epochs"]] == [1, 2]


# -- failures ----------------------------------------------------------------------------------------


def _corrupt_every_checkpoint(out: Path) -> None:
    for f in (out / "checkpoints").glob("step-*/*.safetensors"):
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("break_it", "needle"),
    [
        (lambda out: _corrupt_every_checkpoint(out), "CheckpointCorruptError"),
        (None, "StateMismatchError"),  # resumed with a different --num-samples mid-epoch
    ],
)
def test_failures_are_logged_with_the_cause_and_recorded_in_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], break_it: Callable[[Path], None] | None, needle: str
) -> None:
    assert _run(tmp_path, "--max-epochs-per-run", "0.5") == EXIT_TEMPFAIL
    if break_it is not None:
        break_it(tmp_path)
        code = _run(tmp_path)
    else:
        code = _run(tmp_path, "--num-samples", "200")
    assert code == EXIT_FAILED
    err = capsys.readouterr().err
    assert "Traceback" in err and needle in err
    assert f"FAILED: {needle}" in err and str(tmp_path) in err
    history = _history(tmp_path)
    assert history["status"] == "failed" and history["complete"] is False
    assert needle in history["last_error"]


# -- progress output ---------------------------------------------------------------------------------


def test_progress_bar_on_a_terminal_and_plain_log_lines_otherwise(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    bar = Progress(total=6, initial=2, enabled=True, log_every=1, bar=True)
    for micro in range(3, 7):
        bar.update(micro=micro, opt_steps=micro, epoch=micro / 6, loss=0.5, lr=1e-3, samples=8)
    bar.close()
    assert "6/6" in capsys.readouterr().err
    caplog.set_level(logging.INFO, logger="reference_trainer")
    plain = Progress(total=6, initial=0, enabled=True, log_every=2, bar=False)
    for micro in range(1, 7):
        plain.update(micro=micro, opt_steps=micro, epoch=micro / 6, loss=0.25, lr=1e-3, samples=8)
    lines = [r.getMessage() for r in caplog.records if "samples/s" in r.getMessage()]
    assert [line.split("  ")[1] for line in lines] == ["step 2", "step 4", "step 6"]
    assert all("loss 0.25" in line for line in lines)


def test_run_exits_with_mains_status(monkeypatch: pytest.MonkeyPatch) -> None:
    import reference_trainer.cli as cli

    monkeypatch.setattr(cli, "main", lambda argv=None: EXIT_TEMPFAIL)
    with pytest.raises(SystemExit) as exited:
        cli.run([])
    assert exited.value.code == EXIT_TEMPFAIL


def test_run_leaves_at_once_after_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """After leaving a process group, the process skips the interpreter's teardown (where gloo can
    abort it) and still exits with main's status."""
    import reference_trainer.cli as cli
    import reference_trainer.devices as devices

    left: list[int] = []

    class _Left(Exception):
        pass

    def fake_exit(code: int) -> None:
        left.append(code)
        raise _Left

    monkeypatch.setattr(cli, "main", lambda argv=None: EXIT_TEMPFAIL)
    monkeypatch.setattr(devices, "_left_group", True)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    with pytest.raises(_Left):
        cli.run([])
    assert left == [EXIT_TEMPFAIL]
