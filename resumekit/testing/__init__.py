"""resumekit's compliance suite: check that your own training state survives a checkpoint exactly.

Requires ``hypothesis`` (``pip install "resumekit[testing]"``). Importing ``resumekit`` never imports
this package.
"""

from __future__ import annotations

from resumekit.testing.resume import ComplianceError, check_resume, check_roundtrip
from resumekit.testing.strategies import assert_identical, nested_states, tensors

__all__ = [
    "ComplianceError",
    "assert_identical",
    "check_resume",
    "check_roundtrip",
    "nested_states",
    "tensors",
]
