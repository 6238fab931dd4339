"""``python -m reference_trainer``: the same as the ``resumekit-pretrain`` console script."""

from __future__ import annotations

import sys

from reference_trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
