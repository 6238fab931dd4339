"""``python -m reference_trainer.demo`` (``make demo``): kill a training run, resume it, get the same model.

1. A straight run of the pretrainer, uninterrupted, in ``./demo-output/straight``.
2. The same command in ``./demo-output/interrupted``, SIGKILLed at a random instant after its first
   checkpoint (nothing is saved on the way out: it is a hard kill), then resubmitted unchanged
   (``--resume-from auto``) until it exits 0.
3. A byte-for-byte comparison of the two ``final/model.safetensors``.

Exit status 0 when they are identical, 1 otherwise. ``./demo-output`` is recreated on every run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["TRAIN_ARGS", "main"]

#: A small configuration: a few seconds of training on 2 CPU cores.
TRAIN_ARGS: tuple[str, ...] = (
    "--num-samples", "2048", "--num-features", "64", "--epochs", "5", "--batch-size", "32",
    "--grad-accumulation", "2", "--save-every-steps", "4", "--warmup-steps", "10", "--lr", "2e-3",
    "--seed", "0",
)  # fmt: skip
MAX_SUBMISSIONS = 10


def _command(out: Path) -> list[str]:
    return [sys.executable, "-m", "reference_trainer", "--output-dir", str(out), *TRAIN_ARGS]


def _env() -> dict[str, str]:
    # One thread per process: the model is tiny, and on a busy 2-core machine more threads only contend.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _first_checkpoint(out: Path) -> bool:
    return any((out / "checkpoints").glob("step-*/manifest.json"))


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _straight(out: Path) -> tuple[int, float]:
    """Run to the end; return the exit status and the seconds from the first checkpoint to the end."""
    proc = subprocess.Popen(_command(out), env=_env())
    first: Optional[float] = None
    while proc.poll() is None:
        if first is None and _first_checkpoint(out):
            first = time.monotonic()
        time.sleep(0.02)
    return proc.returncode, time.monotonic() - (first or time.monotonic())


def _killed(out: Path, window: float, rng: random.Random) -> bool:
    """Start the run, SIGKILL it at a random instant after its first checkpoint; True if it was killed."""
    proc = subprocess.Popen(_command(out), env=_env())
    while proc.poll() is None and not _first_checkpoint(out):
        time.sleep(0.02)
    delay = rng.uniform(0.1, 0.6) * window
    deadline = time.monotonic() + delay
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        print(f"(the run finished before the kill, exit {proc.returncode})", flush=True)
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    print(
        f"\n*** SIGKILL after {delay:.2f} s past the first checkpoint (exit {proc.returncode}) ***",
        flush=True,
    )
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; return 0 when the interrupted run's final weights equal the straight run's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--output-dir", default="demo-output", help="recreated on every run (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill instant (default: random)")
    args = parser.parse_args(argv)
    root = Path(args.output_dir).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    kill_seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(kill_seed)
    straight, interrupted = root / "straight", root / "interrupted"
    t0 = time.monotonic()

    _banner(f"1/3 straight run -> {straight}")
    code, window = _straight(straight)
    if code != 0:
        print(f"the straight run failed with exit {code}; see its log above", file=sys.stderr)
        return 1

    _banner(f"2/3 the same run, killed at a random instant (kill seed {kill_seed}), then resubmitted")
    _killed(interrupted, window, rng)
    for attempt in range(1, MAX_SUBMISSIONS + 1):
        _banner(f"resubmission {attempt}: the same command (--resume-from auto is the default)")
        code = subprocess.run(_command(interrupted), env=_env()).returncode
        if code == 0:
            break
        if code != 75:
            print(f"resubmission failed with exit {code}; see its log above", file=sys.stderr)
            return 1
    else:
        print(f"still not complete after {MAX_SUBMISSIONS} submissions", file=sys.stderr)
        return 1

    _banner("3/3 comparison")
    a = (straight / "final" / "model.safetensors").read_bytes()
    b = (interrupted / "final" / "model.safetensors").read_bytes()
    equal = a == b
    print(f"straight    : {straight / 'final' / 'model.safetensors'} ({len(a)} bytes)")
    print(f"interrupted : {interrupted / 'final' / 'model.safetensors'} ({len(b)} bytes)")
    print(f"bitwise equal: {'YES' if equal else 'NO'}")
    print(f"loss curves with the resume point marked: {interrupted / 'loss_curves.png'}")
    print(f"history: {interrupted / 'history.json'}")
    print(f"demo took {time.monotonic() - t0:.0f} s")
    return 0 if equal else 1


def _main_interruptible() -> int:
    try:
        return main()
    except KeyboardInterrupt:
        # The trainer got the same Ctrl-C: it checkpoints and exits 75 on its own.
        print("\ndemo interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(_main_interruptible())
