"""``python -m reference_trainer``: the same as the ``resumekit-pretrain`` console script."""

from __future__ import annotations

from reference_trainer.cli import run

if __name__ == "__main__":
    run()
