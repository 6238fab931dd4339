"""resumekit's compliance suite: check that your own training state survives a checkpoint exactly.

Requires ``hypothesis`` (``pip install "resumekit[testing]"``). Importing ``resumekit`` never imports
this package.
"""

from __future__ import annotations

from .strategies import assert_identical, nested_states, tensors

__all__ = ["assert_identical", "nested_states", "tensors"]
