"""Crash tests with real processes: a writer is SIGKILLed at every named point of the local commit
protocol and at sampled byte offsets inside the files it writes; a fresh process then finds the newest
committed checkpoint intact, never a partial one, and the next save succeeds.

The writer (tests/faults/crash_writer.py) first runs once with tracing to learn the exact sequence of
operations of three saves with retention; every kill is then placed on that sequence, so the test knows
which checkpoints must be committed at the moment of death.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork"), reason="the crash writer forks one child per kill (POSIX)"
)

HELPER = str(Path(__file__).with_name("crash_writer.py"))
KILL_OPS = ("open-w", "write", "fsync", "rename", "unlink", "rmdir", "mkdir")
N_RANDOM_OFFSETS = 40


@pytest.fixture(scope="module")
def crash_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the writers' roots live: tmpfs when available.

    A SIGKILL (unlike a power cut) loses nothing the kernel already accepted, so the outcome does not
    depend on the filesystem; tmpfs only makes the ~150 writers' fsync calls free.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="resumekit-crash-", dir=shm))
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("crash")


@pytest.fixture
def crash_dir(crash_base: Path, request: pytest.FixtureRequest) -> Path:
    d = crash_base / request.node.name
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def trace(crash_base: Path) -> list[list[Any]]:
    """The writer's operations in order, recorded once without faults."""
    (crash_base / "trace").mkdir()
    return _trace(crash_base / "trace")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _helper(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, HELPER, *args], capture_output=True, text=True, env=_env(), timeout=600
    )
    assert proc.returncode == 0, f"crash_writer {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stderr


def _trace(base: Path) -> list[list[Any]]:
    root = base / "trace-root"
    jobs = [{"mode": "trace", "root": str(root), "trace_out": str(base / "trace.json")}]
    (base / "trace-jobs.json").write_text(json.dumps(jobs))
    stderr = _helper("run", str(base / "trace-jobs.json"), str(base / "trace-results.json"))
    assert json.loads((base / "trace-results.json").read_text()) == [{"killed": False, "exit": 0}], stderr
    trace: list[list[Any]] = json.loads((base / "trace.json").read_text())
    return trace


def _committed_before(trace: list[list[Any]], k: int) -> tuple[set[int], int]:
    """Steps committed once trace[:k] ran, and the step being saved at trace[k]."""
    committed: set[int] = set()
    writing = 0
    for event in trace[:k]:
        op, detail = event[0], str(event[1])
        if op == "begin-save":
            writing = int(event[1])
        elif op == "rename":
            dst = detail.split(" -> ")[1]
            if dst.startswith("step-"):
                committed.add(int(dst.removeprefix("step-")))
        elif op == "unlink" and detail.endswith("/manifest.json") and detail.startswith("step-"):
            committed.discard(int(detail.split("/")[0].removeprefix("step-")))
    return committed, writing


def _write_spans(trace: list[list[Any]]) -> list[tuple[int, str, int, int]]:
    """(trace index of the write call, stable file name, first byte, end byte) of every write."""
    spans = []
    for i, event in enumerate(trace):
        if event[0] == "wrote" and event[3] > event[2]:
            assert trace[i - 1][0] == "write"
            spans.append((i - 1, str(event[1]), int(event[2]), int(event[3])))
    return spans


def _run_and_verify(base: Path, jobs: list[dict[str, Any]], expectations: list[dict[str, Any]]) -> None:
    (base / "jobs.json").write_text(json.dumps(jobs))
    stderr = _helper("run", str(base / "jobs.json"), str(base / "results.json"))
    results = json.loads((base / "results.json").read_text())
    not_killed = [j for j, r in zip(jobs, results) if not r["killed"]]
    assert not not_killed, f"writers that were not killed as planned: {not_killed[:3]}\n{stderr[-3000:]}"

    roots = [{"root": j["root"], "writing": e["writing"]} for j, e in zip(jobs, expectations)]
    (base / "roots.json").write_text(json.dumps(roots))
    _helper("verify", str(base / "roots.json"), str(base / "verified.json"))
    found = json.loads((base / "verified.json").read_text())

    failures = []
    for exp, got in zip(expectations, found):
        committed = sorted(exp["committed"])
        want = {
            "steps": committed,
            "latest": committed[-1] if committed else None,
            "restored": committed[-1] if committed else None,
            "restored_exact": True,
            "every_step_exact": {str(s): True for s in committed},
            "next_ok": True,
            "next_exact": True,
            "debris": [],
        }
        if exp["writing"] in committed:
            want["resave_committed"] = "StepExistsError"
        diff = {k: got.get(k) for k, v in want.items() if got.get(k) != v}
        for k in ("restore_error", "next_error"):
            if k in got:
                diff[k] = got[k]
        if diff:
            failures.append({"kill": exp["label"], "expected": want, "differs": diff})
    assert not failures, json.dumps(failures[:5], indent=1)


def test_sigkill_at_every_commit_protocol_operation(crash_dir: Path, trace: list[list[Any]]) -> None:
    counts = {op: sum(1 for e in trace if e[0] == op) for op in KILL_OPS}
    # The protocol really exercises every named operation (otherwise the test proves little).
    for op in ("open-w", "fsync", "rename", "unlink", "rmdir", "mkdir"):
        assert counts[op] > 0, f"the writer never called {op}: {counts}"
    assert any(str(e[1]).endswith("manifest.json") for e in trace if e[0] == "unlink"), "retention never ran"

    jobs: list[dict[str, Any]] = []
    expectations: list[dict[str, Any]] = []
    for op in KILL_OPS:
        indices = [i for i, e in enumerate(trace) if e[0] == op]
        for n, k in enumerate(indices, start=1):
            if op == "write" and n % 3:
                continue  # every write is also covered at byte granularity below; sample these
            root = os.path.realpath(crash_dir / f"{op}-{n}")
            committed, writing = _committed_before(trace, k)
            jobs.append({"mode": "kill", "root": root, "op": op, "n": n})
            expectations.append(
                {"label": f"before {op} #{n} ({trace[k][1]})", "committed": committed, "writing": writing}
            )
    # Both sides of the commit point are covered: some kills leave the step invisible, some visible.
    assert {len(e["committed"]) for e in expectations} >= {0, 1, 2}
    _run_and_verify(crash_dir, jobs, expectations)


def test_sigkill_at_byte_offsets_inside_written_files(crash_dir: Path, trace: list[list[Any]]) -> None:
    spans = _write_spans(trace)
    sizes: dict[str, int] = {}
    for _, f, _, end in spans:
        sizes[f] = max(sizes.get(f, 0), end)
    assert any(f.endswith(".safetensors") for f in sizes) and any(f.endswith("manifest.json") for f in sizes)
    # (file, offset) pairs: the first and last byte of every data file (a kill right at a boundary is the
    # classic torn write), then seeded random offsets over all bytes written. A manifest's length varies
    # by a few bytes between runs (its timestamp), so its offsets stay clear of its end.
    usable = {f: (n - 40 if f.endswith("manifest.json") else n) for f, n in sizes.items()}
    targets = {(f, 0) for f in usable} | {(f, n - 1) for f, n in usable.items()}
    rng = random.Random(20260)
    flat = [(f, i) for f, n in sorted(usable.items()) for i in range(n)]
    targets.update(rng.sample(flat, N_RANDOM_OFFSETS))

    jobs, expectations = [], []
    for f, offset in sorted(targets):
        k = next(i for i, name, begin, end in spans if name == f and begin <= offset < end)
        committed, writing = _committed_before(trace, k)
        root = os.path.realpath(crash_dir / f"byte-{f.replace('/', '_')}-{offset}")
        jobs.append({"mode": "kill", "root": root, "file": f, "byte": offset})
        expectations.append(
            {"label": f"after {offset} bytes of {f}", "committed": committed, "writing": writing}
        )
    _run_and_verify(crash_dir, jobs, expectations)


def test_trace_is_deterministic(crash_dir: Path, trace: list[list[Any]]) -> None:
    # Kill placement relies on every run making the same calls in the same order, and writing the same
    # bytes to every data file (manifests differ in their timestamp and writer id only).
    def shape(t: list[list[Any]]) -> list[Any]:
        return [e[0] if e[0] != "wrote" or str(e[1]).endswith("manifest.json") else e for e in t]

    assert shape(_trace(crash_dir)) == shape(trace)
