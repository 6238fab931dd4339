"""A real Lightning Trainer, SIGKILLed mid-epoch and resumed, ends bit for bit where an uninterrupted run ends.

The training script is this file run as ``__main__`` in a subprocess (Lightning's DDP launcher re-runs the
same command for rank 1). Dropout and shuffling are on; checkpoints are taken every 5 optimizer steps by
``ModelCheckpoint`` through the ResumeKit callback; the kill lands between two checkpoints in the middle
of an epoch, so the resumed run must replay a few batches exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.lightning

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
N_SAMPLES, BATCH, EPOCHS, EVERY = 44, 4, 3, 5  # 11 batches an epoch on 1 process, 6 per rank on 2


# ------------------------------------------------------------------------------------------ the script


def _script(out: Path, kill_at: int, resume: bool, devices: int) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch import nn
    from torch.utils.data import DataLoader

    from resumekit.sampler import ResumableSampler
    from resumekit_lightning import ResumeKit, StatefulLoader

    class Lit(pl.LightningModule):
        def __init__(self, width: int = 16) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Dropout(0.3), nn.Linear(width, 1))

        def setup(self, stage: str) -> None:
            # Each rank draws its own dropout masks: restoring rank 0's streams on every rank would show.
            torch.manual_seed(17 + self.global_rank)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            # One line per rank and step: every loss the run logged, as exact float bits.
            with open(out / f"losses-rank{self.global_rank}.jsonl", "a") as f:
                f.write(
                    json.dumps([self.global_step, self.current_epoch, batch_idx, float(loss).hex()]) + "\n"
                )
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 7, gamma=0.5)}

        def train_dataloader(self) -> Any:
            ds = _dataset(torch)
            return StatefulLoader(DataLoader(ds, batch_size=BATCH, sampler=ResumableSampler(ds, seed=3)))

        def val_dataloader(self) -> Any:
            return DataLoader(_dataset(torch, 1), batch_size=8)

    class Kill(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == kill_at:
                # Every process of the job at once, no clean-up, no flush: a real preemption.
                os.killpg(os.getpgid(0), signal.SIGKILL)

    pl.seed_everything(0, verbose=False)
    ckpt_dir = out / "ckpt"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=EPOCHS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        limit_val_batches=2,
        val_check_interval=5,  # validation falls on checkpoint steps too (10, 20 on one process)
        callbacks=[
            ResumeKit(config={"batch_size": BATCH}),
            ModelCheckpoint(
                dirpath=ckpt_dir,
                every_n_train_steps=EVERY,
                save_last=True,
                save_top_k=2,
                monitor="train_loss",
            ),
            Kill(),
        ],
    )
    model = Lit()
    trainer.fit(model, ckpt_path="last" if resume else None)
    if trainer.global_rank == 0:
        state = {k: v.tolist() for k, v in model.state_dict().items()}
        (out / "final.json").write_text(json.dumps({"weights": _bits(state), "step": trainer.global_step}))


def _dataset(torch: Any, salt: int = 0) -> Any:
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(100 + salt)
    x = torch.randn(N_SAMPLES, 8, generator=g)
    return TensorDataset(x, x.sum(dim=1, keepdim=True).sin())


def _bits(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj.hex()
    if isinstance(obj, list):
        return [_bits(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _bits(v) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------------------ helpers


def _start(out: Path, *, kill_at: int = -1, resume: bool = False, devices: int = 1) -> subprocess.Popen[str]:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "adapters"), env.get("PYTHONPATH", "")])
    env.pop("LOCAL_RANK", None)
    args = [sys.executable, str(HERE), str(out), str(kill_at), "1" if resume else "0", str(devices)]
    # A session of its own: the kill takes the whole process group (both DDP ranks), never pytest.
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _wait(proc: subprocess.Popen[str]) -> int:
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(
            f"training script failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
        )
    return proc.returncode


def _losses(out: Path, rank: int = 0) -> dict[int, str]:
    """Step -> loss bits; a replayed step keeps its last value (the resumed run's)."""
    merged: dict[int, str] = {}
    for line in (out / f"losses-rank{rank}.jsonl").read_text().splitlines():
        step, _epoch, _idx, bits = json.loads(line)
        merged[step] = bits
    return merged


def _replayed(out: Path, rank: int = 0) -> dict[int, list[str]]:
    seen: dict[int, list[str]] = {}
    for line in (out / f"losses-rank{rank}.jsonl").read_text().splitlines():
        step, _epoch, _idx, bits = json.loads(line)
        seen.setdefault(step, []).append(bits)
    return {s: v for s, v in seen.items() if len(v) > 1}


def _no_pickle(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:2]
            assert path.suffix in (".json", ".safetensors"), f"unexpected file {path}"
            assert head[:1] != b"\x80", f"{path} looks like a pickle"


# ------------------------------------------------------------------------------------------ tests


def _kill_resume_equal(tmp_path: Path, devices: int) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # Between two checkpoints, in the epoch after the last one: the resumed run replays an epoch end.
    kill_at = {1: 24, 2: 14}[devices]
    # The two runs are independent: run them side by side to halve the wall time.
    procs = [_start(straight, devices=devices), _start(killed, kill_at=kill_at, devices=devices)]
    codes = [_wait(p) for p in procs]
    assert codes == [0, -signal.SIGKILL]
    assert not (killed / "final.json").exists()
    assert _wait(_start(killed, resume=True, devices=devices)) == 0

    a, b = json.loads((straight / "final.json").read_text()), json.loads((killed / "final.json").read_text())
    assert a["step"] == b["step"] == EPOCHS * -(-N_SAMPLES // (BATCH * devices))
    assert b["weights"] == a["weights"]
    for rank in range(devices):
        assert _losses(killed, rank) == _losses(straight, rank)
        replay = _replayed(killed, rank)
        # The kill lost the steps after the last checkpoint; the resumed run redid them identically.
        assert replay, "the resumed run replayed nothing: the kill did not land between checkpoints"
        assert all(len(set(v)) == 1 for v in replay.values()), replay
    _no_pickle(killed / "ckpt")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    _kill_resume_equal(tmp_path, devices=1)


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_processes_sigkill_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    _kill_resume_equal(tmp_path, devices=2)


if __name__ == "__main__":
    _script(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]))
