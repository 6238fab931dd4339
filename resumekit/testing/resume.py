"""Compliance checks for a user's own training state: round trip, and kill-and-resume equivalence.

``check_resume(make_state, train, total_steps=N)`` asserts, for interruption points hypothesis chooses,
that training k steps, saving, restoring into fresh objects in a fresh process, and training the remaining
N - k steps ends in exactly the state of training N steps straight: every entry's files byte for byte
(weights, optimizer moments, scheduler, sampler position, RNG of every source).

``make_state`` and ``train`` must be module-level functions (importable by the fresh process).
``make_state`` seeds every random source a straight run would (``random``, NumPy, torch), so that the
straight run is itself reproducible; ``train`` must then be deterministic given the state: put a
:class:`~resumekit.RNGState` in the state if training draws random numbers. That is what the check is for.

A killed loop is checkpointed inside its data iteration, and the resumed run recreates the iterator. To check
that, ``train`` should keep its data iterator open between calls within a process (for instance in a
module-level dict keyed by the sampler) rather than build a new one on every call. On a failure the message
lists likely causes: a data position that differs (skipped or repeated samples), random streams that
diverged (a hidden consumer such as a DataLoader iterator's base-seed draw), and the warnings resumekit
raised in the interrupted and resumed segments.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from resumekit.checkpointer import Checkpointer
from resumekit.errors import ResumeKitError
from resumekit.format.layout import MANIFEST, skeleton_of, step_dir

__all__ = ["ComplianceError", "check_resume", "check_roundtrip"]

MakeState = Callable[[], Mapping[str, Any]]
Train = Callable[[Mapping[str, Any], int], None]


class ComplianceError(ResumeKitError, AssertionError):
    """The training state did not survive a checkpoint exactly; the message names what differs."""


def _ref(fn: Callable[..., Any]) -> str:
    module, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qual:
        raise TypeError(
            f"{fn!r} must be a module-level function so a fresh process can import it "
            "(not a lambda or a nested function); or pass fresh_process=False."
        )
    if module == "__main__":
        main = sys.modules["__main__"]
        path = getattr(main, "__file__", None)
        if not path:
            raise TypeError(f"{fn!r} is defined in an interactive __main__; move it into a module file")
        return f"{Path(path).resolve()}::{qual}"
    return f"{module}:{qual}"


def _resolve(ref: str) -> Callable[..., Any]:
    if "::" in ref:
        path, qual = ref.split("::", 1)
        spec = importlib.util.spec_from_file_location("_resumekit_user_main", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules["_resumekit_user_main"] = module
        spec.loader.exec_module(module)
    else:
        mod_name, qual = ref.split(":", 1)
        module = importlib.import_module(mod_name)
    obj: Any = module
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _warnings_path(out: str) -> Path:
    return Path(out + ".warnings.json")


def _segment(make_state: MakeState, train: Train, steps: int, resume_from: str | None, out: str) -> None:
    """Build fresh state, optionally restore it, train ``steps``, and save the result as step 0 in ``out``.

    The warnings the segment raised are written beside ``out`` (``<out>.warnings.json``): a failed comparison
    quotes them, since resumekit warns where it knows a resume will not be exact.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _segment_body(make_state, train, steps, resume_from, out)
        finally:
            seen = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
            _warnings_path(out).write_text(json.dumps(seen))


def _segment_body(make_state: MakeState, train: Train, steps: int, resume_from: str | None, out: str) -> None:
    state = make_state()
    if resume_from is not None:
        restored = Checkpointer(resume_from).restore(state)
        if restored is None:
            raise ComplianceError(f"nothing to restore in {resume_from}")
    if steps:
        train(state, steps)
    Checkpointer(out).save(state, step=0)


def _run_segment(
    make_state: MakeState, train: Train, steps: int, resume_from: str | None, out: str, fresh: bool
) -> None:
    if not fresh:
        _segment(make_state, train, steps, resume_from, out)
        return
    args = {"make": _ref(make_state), "train": _ref(train), "steps": steps, "resume": resume_from, "out": out}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-m", "resumekit.testing._worker", json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if proc.returncode != 0:
        raise ComplianceError(f"the fresh process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def _files(root: str) -> tuple[dict[str, Any], dict[str, str]]:
    manifest = json.loads((Path(root) / step_dir(0) / MANIFEST).read_text())
    crcs = {p: rec["crc32c"] for p, rec in manifest["files"].items()}
    return manifest["entries"], crcs


def _skeleton(root: str, path: str) -> Any:
    try:
        return json.loads((Path(root) / step_dir(0) / path).read_text())
    except (OSError, ValueError):
        return None


def _causes(expected_root: str, actual_root: str, differing: list[str], notes: list[str]) -> list[str]:
    """Likely causes of a difference, from the entries' records and the segments' warnings."""
    causes = []
    skeletons = dict.fromkeys(skeleton_of(p) for p in differing)
    for path in skeletons:
        e, a = _skeleton(expected_root, path), _skeleton(actual_root, path)
        positions = isinstance(e, dict) and isinstance(a, dict) and {"epoch", "consumed"} <= set(e) & set(a)
        if positions and (e["epoch"], e["consumed"]) != (a["epoch"], a["consumed"]):
            causes.append(
                f"the data position in {path} differs: the uninterrupted run ended at epoch {e['epoch']}, "
                f"sample {e['consumed']}, the resumed run at epoch {a['epoch']}, sample {a['consumed']}: "
                "the resume skipped or repeated samples (a position that counts what DataLoader workers "
                "prefetched rather than what the loop consumed; use resumekit.ResumableSampler in the "
                "state and resumekit.ResumableLoader around the DataLoader)"
            )
        if isinstance(e, dict) and "torch_cpu" in e:
            causes.append(
                f"the random streams in {path} diverged: the resumed run drew a different amount of random "
                "numbers than the uninterrupted run. A common cause is a hidden consumer after the restore: "
                "each iter(DataLoader) draws its base seed from the global torch generator (a sampler other "
                "than resumekit.ResumableSampler, or a DataLoader's own RandomSampler, cannot give that draw "
                "back; resumekit.ResumableLoader removes it)"
            )
    causes += [f"resumekit warned in the resumed run: {note}" for note in notes]
    return causes


def _compare(expected_root: str, actual_root: str, what: str, notes: list[str] | None = None) -> None:
    e_entries, e_files = _files(expected_root)
    a_entries, a_files = _files(actual_root)
    if e_entries != a_entries:
        raise ComplianceError(f"{what}: entries differ: {sorted(e_entries)} vs {sorted(a_entries)}")
    differing = sorted(p for p in set(e_files) | set(a_files) if e_files.get(p) != a_files.get(p))
    if differing:
        names = sorted({p.split("/")[-1].split(".")[0] for p in differing})
        causes = _causes(expected_root, actual_root, differing, notes or [])
        because = (
            "".join(f"\n  - {c}" for c in causes)
            if causes
            else (
                " Something in those entries' state_dict() is missing, or a random stream is not in the "
                "checkpointed state (add resumekit.RNGState()), or training is not deterministic."
            )
        )
        raise ComplianceError(
            f"{what}: the state differs from the uninterrupted run in entries {names} (files {differing})."
            + (f" Likely causes:{because}" if causes else because)
        )


def _resumekit_notes(*outs: str) -> list[str]:
    notes: list[str] = []
    for out in outs:
        try:
            seen = json.loads(_warnings_path(out).read_text())
        except (OSError, ValueError):
            continue
        notes += [n for n in seen if "resumekit" in n or n.split(": ", 1)[-1].startswith(_OUR_CLASSES)]
    return list(dict.fromkeys(notes))


_OUR_CLASSES = ("ResumableSampler", "ResumableLoader", "RNGState", "Checkpointer")


def check_roundtrip(make_state: MakeState, train: Train | None = None, *, steps: int = 1) -> None:
    """Save a state (after ``train(state, steps)``, if given), restore it into fresh objects, save again:
    both checkpoints must be identical, file for file.

    Raises:
        ComplianceError: naming the entries whose state did not survive.
    """
    with tempfile.TemporaryDirectory() as tmp:
        first, second = os.path.join(tmp, "first"), os.path.join(tmp, "second")
        _segment(make_state, train or (lambda s, n: None), steps if train else 0, None, first)
        _segment(make_state, lambda s, n: None, 0, first, second)
        _compare(first, second, "round trip")


def check_resume(
    make_state: MakeState,
    train: Train,
    *,
    total_steps: int,
    max_examples: int = 5,
    fresh_process: bool = True,
) -> None:
    """Assert that an interrupted and resumed run equals the straight run, for hypothesis-chosen
    interruption points.

    Args:
        make_state: builds the complete training state from scratch (seeded as the real run is).
        train: ``train(state, steps)`` trains ``steps`` steps, continuing from whatever ``state`` holds.
        total_steps: the length of the straight run (at least 2).
        max_examples: how many interruption points hypothesis tries.
        fresh_process: run every segment in a new Python process (the real kill-and-resume setting).

    Raises:
        ComplianceError: naming the entries that differ, with the interruption point (hypothesis
            shrinks it to the smallest failing one).
    """
    from hypothesis import Phase, given, settings
    from hypothesis import strategies as st

    if total_steps < 2:
        raise ValueError("total_steps must be at least 2 to leave room for an interruption")
    with tempfile.TemporaryDirectory() as tmp:
        straight = os.path.join(tmp, "straight")
        _run_segment(make_state, train, total_steps, None, straight, fresh_process)
        counter = iter(range(10**6))

        # No shrinking: every example is several fresh processes; the failing k is reported as found.
        @settings(
            max_examples=max_examples,
            deadline=None,
            database=None,
            phases=(Phase.explicit, Phase.generate),
        )
        @given(k=st.integers(min_value=1, max_value=total_steps - 1))
        def interrupted_at(k: int) -> None:
            run = os.path.join(tmp, f"run-{next(counter)}")
            before, after = run + "-before", run + "-after"
            _run_segment(make_state, train, k, None, before, fresh_process)
            _run_segment(make_state, train, total_steps - k, before, after, fresh_process)
            notes = _resumekit_notes(before, after)
            _compare(straight, after, f"interrupted after {k} of {total_steps} steps", notes)

        interrupted_at()
