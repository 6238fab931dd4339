"""resumekit.testing on the core: the compliance suite passes on a complete state, and catches a
state that forgot its random streams."""

from __future__ import annotations

import pytest

from resumekit.testing import ComplianceError, check_resume, check_roundtrip

from . import loops


def test_roundtrip_of_a_trained_state() -> None:
    check_roundtrip(loops.make_state, loops.train, steps=7)


def test_resume_in_fresh_processes_equals_straight_run() -> None:
    check_resume(loops.make_state, loops.train, total_steps=12, max_examples=3)


def test_resume_check_catches_missing_rng() -> None:
    with pytest.raises(ComplianceError, match="differs from the uninterrupted run"):
        check_resume(
            loops.make_state_without_rng, loops.train, total_steps=12, max_examples=2, fresh_process=False
        )


def test_functions_must_be_importable() -> None:
    with pytest.raises(TypeError, match="module-level function"):
        check_resume(lambda: {}, loops.train, total_steps=3)
