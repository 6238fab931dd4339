"""Crash-test helper: a writer that SIGKILLs itself at a chosen point of a save, and a fresh verifier.

Run as a script by tests/faults/test_crash.py (never imported by pytest as a test module):

    python crash_writer.py run JOBS.json RESULTS.json
    python crash_writer.py verify ROOTS.json RESULTS.json

``run`` imports torch and resumekit once, then forks one child per job. Each child installs its fault
(``os.kill(os.getpid(), SIGKILL)`` right before the n-th call of an operation, or once n bytes of a
given file have been written), runs :func:`scenario` against its own root, and is killed for real. The parent
records how each child ended. A ``trace`` job instead records every operation, in order, with the bytes
written so far, so the test knows exactly which operations ran before each kill.

``verify`` runs in a fresh process: for each root it lists the committed steps, restores the newest and
every other committed step into fresh objects, compares them bit for bit with what the writer saved,
saves the step that was being written (or the next one), and checks that leftovers were cleaned up.
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import sys
import traceback
from typing import Any

import torch
from torch import nn

import resumekit as rk

STEPS = (1, 2, 3)
KEEP_LAST = 2
# Operations a kill can precede; "open-w" is open() for writing.
OPS = ("open-w", "write", "fsync", "rename", "unlink", "rmdir", "mkdir")


def make_state(step: int) -> dict[str, Any]:
    """The state the writer saves at ``step``: a pure function of ``step``."""
    gen = torch.Generator().manual_seed(1000 + step)
    model = nn.Sequential(nn.Linear(16, 24), nn.BatchNorm1d(24), nn.Linear(24, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        bn: Any = model[1]
        bn.running_mean.copy_(torch.randn(24, generator=gen))
        bn.num_batches_tracked.fill_(step)
    meta = {"step": step, "loss": 1.0 / (step + 1), "tokens": torch.arange(step * 10, dtype=torch.int64)}
    return {"model": model, "meta": meta}


def _bits(obj: Any) -> Any:
    """A comparable, bit-exact rendering of a state (tensors as dtype/shape/bytes)."""
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().contiguous().reshape(-1)
        return [
            str(obj.dtype),
            list(obj.shape),
            flat.view(torch.uint8).numpy().tobytes().hex() if flat.numel() else "",
        ]
    if isinstance(obj, dict):
        return [[repr(k), type(k).__name__, _bits(v)] for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [type(obj).__name__, [_bits(v) for v in obj]]
    if isinstance(obj, float):
        return ["float", obj.hex()]
    return [type(obj).__name__, repr(obj)]


def state_bits(state: dict[str, Any]) -> Any:
    """Bit-exact rendering of what ``state`` would save."""
    return {
        name: _bits(obj.state_dict() if hasattr(obj, "state_dict") else obj) for name, obj in state.items()
    }


def fresh_target() -> dict[str, Any]:
    """Objects to restore into: deliberately different from any saved state."""
    state = make_state(999)
    state["meta"] = {"stale": True}
    return state


def scenario(root: str, log: list[Any]) -> None:
    """What the writer does: save STEPS in order with retention (so deletion is exercised too)."""
    ckpt = rk.Checkpointer(root, keep_last=KEEP_LAST)
    for step in STEPS:
        log.append(["begin-save", step])
        ckpt.save(make_state(step), step=step)
        log.append(["end-save", step])


class _Faults:
    """Counts operations; kills this process at the configured one."""

    def __init__(
        self, kill_op: str | None, kill_n: int, kill_file: str | None, kill_byte: int, trace: list[Any] | None
    ) -> None:
        self.kill_op, self.kill_n = kill_op, kill_n
        self.kill_file, self.kill_byte = kill_file, kill_byte
        self.trace = trace
        self.counts = dict.fromkeys(OPS, 0)
        self.file_bytes: dict[str, int] = {}

    def hit(self, op: str, detail: str) -> None:
        self.counts[op] += 1
        if self.trace is not None:
            self.trace.append([op, detail])
        if op == self.kill_op and self.counts[op] == self.kill_n:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrote(self, f: Any, path: str, data: Any) -> int:
        """Write ``data``; die once ``kill_byte`` bytes of ``kill_file`` are on disk."""
        name = stable_name(path)
        done = self.file_bytes.get(name, 0)
        n = memoryview(data).nbytes
        if name == self.kill_file and done + n > self.kill_byte:
            f.write(memoryview(data).cast("B")[: self.kill_byte - done])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        written: int = f.write(data)
        self.file_bytes[name] = done + n
        if self.trace is not None:
            self.trace.append(["wrote", name, done, done + n])
        return written


def stable_name(path: str) -> str:
    """A written file's name with the random writer id of its staging folder removed."""
    head, _, rest = path.partition("/")
    if head.startswith(".tmp-step-"):
        head = head.removeprefix(".tmp-")[: len("step-000000000000")]
    return f"{head}/{rest}" if rest else head


class _CountingFile:
    def __init__(self, f: Any, faults: _Faults, path: str) -> None:
        self._f, self._faults, self._path = f, faults, path

    def write(self, data: Any) -> int:
        self._faults.hit("write", self._path)
        return self._faults.wrote(self._f, self._path, data)

    def __enter__(self) -> _CountingFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def install(faults: _Faults, root: str) -> None:
    """Patch the OS operations the commit protocol uses; only calls under ``root`` count."""
    real_open, real_fsync = builtins.open, os.fsync
    real: dict[str, Any] = {"rename": os.rename, "unlink": os.unlink, "rmdir": os.rmdir, "mkdir": os.mkdir}
    fd_paths: dict[int, str] = {}

    def under(path: Any, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("dir_fd") is not None or str(path).startswith(root)

    def rel(path: Any) -> str:
        return os.path.relpath(str(path), root) if str(path).startswith(root) else str(path)

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and str(file).startswith(root) and set(mode) & set("wax+"):
            faults.hit("open-w", rel(file))
            f = real_open(file, mode, *args, **kwargs)
            fd_paths[f.fileno()] = rel(file)
            return _CountingFile(f, faults, rel(file))
        return real_open(file, mode, *args, **kwargs)

    def fsync(fd: Any) -> None:
        faults.hit("fsync", fd_paths.get(fd, "<dir>"))
        real_fsync(fd)

    def wrap(op: str) -> Any:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if under(path, kwargs):
                detail = rel(path) + (" -> " + rel(args[0]) if op == "rename" else "")
                faults.hit(op, detail)
            return real[op](path, *args, **kwargs)

        return call

    builtins.open = open_
    os.fsync = fsync
    os.rename, os.unlink, os.rmdir, os.mkdir = wrap("rename"), wrap("unlink"), wrap("rmdir"), wrap("mkdir")
    os.remove = os.unlink


def run_job(job: dict[str, Any]) -> None:
    """Child process body: run the scenario under the job's fault; exit 0 if it was not killed."""
    torch.set_num_threads(1)
    root = os.path.realpath(job["root"])
    os.makedirs(root, exist_ok=True)
    trace: list[Any] | None = [] if job["mode"] == "trace" else None
    faults = _Faults(job.get("op"), int(job.get("n", 0)), job.get("file"), int(job.get("byte", 0)), trace)
    install(faults, root)
    log = trace if trace is not None else []
    scenario(root, log)
    if trace is not None:
        with builtins.open(job["trace_out"], "w") as f:  # patched open: root is not a prefix of trace_out
            json.dump(trace, f)


def cmd_run(jobs_path: str, results_path: str) -> None:
    with open(jobs_path) as f:
        jobs = json.load(f)
    results = []
    for job in jobs:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the writer: a real process that dies by a real SIGKILL
            code = 0
            try:
                run_job(job)
            except BaseException:
                traceback.print_exc()
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        results.append({"killed": killed, "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None})
    with open(results_path, "w") as f:
        json.dump(results, f)


def verify_root(root: str, writing: int) -> dict[str, Any]:
    """What a fresh process finds in ``root`` after a writer died while saving step ``writing``."""
    out: dict[str, Any] = {"root": root}
    ckpt = rk.Checkpointer(root, keep_last=KEEP_LAST, orphan_grace_seconds=0)
    out["steps"] = ckpt.steps()
    out["latest"] = ckpt.latest_step()
    target = fresh_target()
    try:
        result = ckpt.restore(target)
        out["restored"] = None if result is None else result.step
        out["restored_exact"] = result is None or state_bits(target) == state_bits(make_state(result.step))
    except Exception as exc:  # reported, the test fails on it
        out["restore_error"] = f"{type(exc).__name__}: {exc}"
    out["every_step_exact"] = {}
    for s in out["steps"]:
        t = fresh_target()
        try:
            ckpt.restore(t, step=s)
            out["every_step_exact"][str(s)] = state_bits(t) == state_bits(make_state(s))
        except Exception as exc:
            out["every_step_exact"][str(s)] = f"{type(exc).__name__}: {exc}"
    next_step = writing if writing not in out["steps"] else writing + 1
    out["next_step"] = next_step
    try:
        ckpt.save(make_state(next_step), step=next_step)
        t = fresh_target()
        result = ckpt.restore(t)
        out["next_ok"] = result is not None and result.step == next_step
        out["next_exact"] = state_bits(t) == state_bits(make_state(next_step))
    except Exception as exc:
        out["next_error"] = f"{type(exc).__name__}: {exc}"
    if writing in out["steps"]:
        try:
            ckpt.save(make_state(writing), step=writing)
            out["resave_committed"] = "saved over a committed step"
        except rk.ResumeKitError as exc:
            out["resave_committed"] = type(exc).__name__
    names = sorted(os.listdir(root))
    out["debris"] = [n for n in names if not os.path.exists(os.path.join(root, n, "manifest.json"))]
    return out


def cmd_verify(roots_path: str, results_path: str) -> None:
    torch.set_num_threads(1)
    with open(roots_path) as f:
        roots = json.load(f)
    with open(results_path, "w") as f:
        json.dump([verify_root(r["root"], r["writing"]) for r in roots], f)


if __name__ == "__main__":
    command, a, b = sys.argv[1:4]
    {"run": cmd_run, "verify": cmd_verify}[command](a, b)
