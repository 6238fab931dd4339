"""``python -m resumekit``: the same command line as the ``resumekit`` console script."""

from __future__ import annotations

import sys

from resumekit.cli import main

if __name__ == "__main__":
    sys.exit(main())
