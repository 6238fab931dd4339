"""``resumekit-pretrain`` / ``python -m reference_trainer``: run (or continue) a pretraining run.

Exit status:

* ``0``: training is complete (all epochs, or early stopping); ``final/model.safetensors`` is written.
* ``75`` (``EX_TEMPFAIL``): stopped early with a checkpoint (``--max-epochs-per-run``,
  ``--time-budget``, SIGTERM, SIGUSR1, Ctrl-C). Run the same command again to continue.
* ``1``: an error; the log says what failed and where, and the newest checkpoint is intact.
* ``2``: unusable flags (the message names them).
* ``130``: a second Ctrl-C stopped it without a checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
import warnings
from typing import NoReturn, Optional, Sequence

from reference_trainer.config import UsageError, parse_config
from reference_trainer.progress import configure_logging, reset_logging
from reference_trainer.signals import StopSignals

__all__ = ["EXIT_COMPLETE", "EXIT_FAILED", "EXIT_FORCED", "EXIT_TEMPFAIL", "EXIT_USAGE", "main", "run"]

EXIT_COMPLETE = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75  # sysexits.h EX_TEMPFAIL: try again later
EXIT_FORCED = 130

log = logging.getLogger("reference_trainer")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the pretrainer with ``argv`` (default: the command line) and return the exit status."""
    started = time.monotonic()
    # catch_warnings: the warning filters set for the run are undone when main() returns.
    with warnings.catch_warnings():
        configure_logging(int(os.environ.get("RANK", "0")))
        try:
            try:
                cfg = parse_config(argv)
            except UsageError as exc:
                log.error("%s", exc)
                return EXIT_USAGE
            with StopSignals() as signals:
                return _run(cfg, signals, started)
        finally:
            reset_logging()


def run(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Run :func:`main` and exit the process with its status (the console script and ``-m`` entry).

    A process that left a torch.distributed group exits at once (``os._exit``) after flushing its
    logs and streams. Once a ``DistributedDataParallel`` module has existed, gloo's threads outlive
    ``destroy_process_group()`` (torch 2.13), and the interpreter's normal teardown then aborts now
    and then (``terminate called without an active exception``, SIGABRT): torchrun would report a
    finished run (status 0 or 75) as failed, and a requeue script would act on the wrong status.
    Everything that matters is done by then: checkpoints are committed, outputs written, the group left.
    """
    code = main(argv)
    from reference_trainer.devices import left_process_group

    if left_process_group():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _run(cfg: object, signals: StopSignals, started: float) -> int:
    # Heavy imports (torch, resumekit) happen here, after the flags were checked and the handlers set.
    from reference_trainer.config import PretrainConfig
    from reference_trainer.devices import barrier, resolve_placement, shutdown
    from reference_trainer.train import Run

    if not isinstance(cfg, PretrainConfig):
        raise TypeError(f"expected a PretrainConfig, got {type(cfg).__name__}")
    placement = None
    run: Optional[Run] = None
    try:
        placement = resolve_placement(cfg)
        configure_logging(placement.rank)
        run = Run(cfg, placement, signals, started)
        result = run.execute()
        # torchrun tears the job down as soon as one worker exits non-zero: leave together.
        barrier(placement)
        return EXIT_COMPLETE if result.complete else EXIT_TEMPFAIL
    except UsageError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except KeyboardInterrupt:
        log.error(
            "interrupted twice: stopped at once, WITHOUT a new checkpoint. The newest checkpoint in %s is "
            "intact; run the same command again to continue from it.",
            cfg.output_dir,
        )
        return EXIT_FORCED
    except Exception as exc:
        log.error("%s", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())
        if run is not None:
            run.record_failure(exc)
        log.error(
            "FAILED: %s: %s. Output dir: %s. Checkpoints already committed there are intact; fix the cause "
            "and run the same command again to continue from the newest one.",
            type(exc).__name__, exc, cfg.output_dir,
        )  # fmt: skip
        return EXIT_FAILED
    finally:
        if placement is not None:
            try:
                shutdown(placement)
            except Exception as exc:
                log.warning("leaving the process group failed: %s", exc)


if __name__ == "__main__":
    run()
