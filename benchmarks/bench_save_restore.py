"""How fast does resumekit save and restore a model plus its Adam state, fsync included, next to the alternatives?

One process, one run: every method saves and restores the same live state (a stack of ``nn.Linear``
layers and the Adam state filled by one optimizer step; ~1 GiB of parameters gives ~3 GiB in all) to
the same local-disk folder, repetitions interleaved across methods so that drift of the disk hits every
method alike. Medians are reported.

Methods (save / restore):

- ``raw``: one sequential ``write`` of every tensor's bytes into one file + fsync / ``readinto`` the same
  tensors from that file. No format, no checksum: the physical limit of this disk.
- ``resumekit``: ``Checkpointer.save`` / ``Checkpointer.restore`` into the existing model and optimizer.
- ``torch.save``: ``torch.save`` + fsync / ``torch.load(weights_only=True)`` + ``load_state_dict``.
- ``safetensors``: ``safetensors.torch.save_file`` (model + flattened optimizer tensors) + fsync /
  ``load_file`` + ``load_state_dict``.
- ``dcp``: ``torch.distributed.checkpoint.save`` with ``FileSystemWriter(sync_files=True)`` (one process)
  / ``dcp.load`` in place + ``set_state_dict``.
- ``lightning``: ``Trainer.save_checkpoint`` (one ``torch.save`` file of ``state_dict``, ``optimizer_states``,
  loops and callbacks, serialized into memory first, then written through an fsspec transaction) + fsync of
  the file / what ``fit(ckpt_path=...)`` does for model and optimizer: ``strategy.load_checkpoint``
  (``torch.load``, ``weights_only`` left to torch's default, True) + ``strategy.load_model_state_dict`` +
  ``strategy.load_optimizer_state_dict``. The Trainer wraps the same model and optimizer in a
  ``LightningModule``; a ``fit`` with ``max_steps=0`` attaches them once, outside the clock.
- ``accelerate``: ``Accelerator.save_state`` (model in ``model.safetensors``, optimizer in ``optimizer.bin``
  through ``torch.save``, RNG states in a pickle) + fsync of every file / ``Accelerator.load_state``. One
  ``Accelerator(cpu=True)`` has prepared the same model and optimizer once, outside the clock.

Save time includes every fsync the method does (``raw``, ``torch.save``, ``safetensors``, ``lightning``
and ``accelerate`` are fsynced by this script, because neither Lightning nor Accelerate calls fsync;
resumekit and DCP fsync themselves). Restore time is "state back in the live objects".
Before every timed restore the page cache is dropped (``echo 3 > /proc/sys/vm/drop_caches``) when the
process may; the report says whether it could. Peak extra memory is the highest resident set size
(``VmRSS`` sampled every few ms by a thread, and the kernel's ``VmHWM`` reset before each measurement)
minus the resident set size just before the call; ``tracemalloc`` would not see torch's allocations.

Usage::

    .venv/bin/python benchmarks/bench_save_restore.py               # ~1 GiB params, 3 reps
    .venv/bin/python benchmarks/bench_save_restore.py --size-gb 0.1 --reps 1 --no-write  # quick look
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

GIB = 1 << 30
_CHUNK = 64 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
ALL_METHODS = (
    "raw",
    "resumekit",
    "resumekit-async",
    "torch.save",
    "safetensors",
    "dcp",
    "lightning",
    "accelerate",
)
#: Seconds each ``save_async`` call blocked the caller, in call order.
BLOCKING: list[float] = []


# -- the state ----------------------------------------------------------------------------------------


def build_state(size_gb: float, seed: int = 0) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    """A stack of ``nn.Linear`` layers with ``size_gb`` GiB of float32 parameters, and Adam after one step."""
    torch.manual_seed(seed)
    target = size_gb * GIB
    width = 4096
    layer_bytes = (width * width + width) * 4
    if target < 4 * layer_bytes:  # small sizes: four square layers of the right width
        width = max(8, int((target / 4 / 4) ** 0.5))
        layer_bytes = (width * width + width) * 4
    n_layers = max(1, round(target / layer_bytes))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(n_layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def state_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of the state (parameters, then each parameter's Adam state), in a stable order."""
    out = [p.detach() for p in model.parameters()]
    for p in model.parameters():
        st = opt.state[p]
        out.extend(st[k] for k in sorted(st) if isinstance(st[k], torch.Tensor))
    return out


def nbytes_of(tensors: list[torch.Tensor]) -> int:
    """Total bytes of ``tensors``."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _bytes_view(t: torch.Tensor) -> memoryview:
    arr: Any = t.detach().reshape(-1).view(torch.uint8).numpy()
    return memoryview(arr)


# -- measurement --------------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(field_name.encode()):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (independent of how busy the machine is)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def rss_bytes() -> int:
    """This process's resident set size (``VmRSS``)."""
    return _status_kib("VmRSS:") * 1024


def _reset_hwm() -> bool:
    """Reset ``VmHWM`` (peak RSS) to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak resident set size while the block runs: a sampling thread plus the kernel's ``VmHWM``."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._hwm_ok = False

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self._hwm_ok = _reset_hwm()
        self.baseline = rss_bytes()
        self.peak = self.baseline
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        if self._hwm_ok:
            self.peak = max(self.peak, _status_kib("VmHWM:") * 1024)

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.baseline)


class ForeignIO:
    """Bytes other processes moved on the disk under test while the block ran.

    The machine may be shared: the device's counters (``/proc/diskstats``) minus this process's own
    (``/proc/self/io``) show how much of the disk someone else used during a measurement.
    """

    def __init__(self, device: str) -> None:
        self.device = os.path.basename(device)
        self.bytes = 0

    def _disk(self) -> int:
        with open("/proc/diskstats") as f:
            for line in f:
                parts = line.split()
                if parts[2] == self.device:
                    return (int(parts[5]) + int(parts[9])) * 512
        return 0

    @staticmethod
    def _own() -> int:
        with open("/proc/self/io") as f:
            io = dict(line.split(": ") for line in f.read().splitlines())
        return int(io["read_bytes"]) + int(io["write_bytes"])

    def __enter__(self) -> ForeignIO:
        self._start = (self._disk(), self._own())
        return self

    def __exit__(self, *exc: object) -> None:
        disk, own = self._disk() - self._start[0], self._own() - self._start[1]
        self.bytes = max(0, disk - own)


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache; False when not permitted (not root, container)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tree_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# -- methods ------------------------------------------------------------------------------------------


@dataclass
class Method:
    """One way to save and restore the state: ``save(path)`` then ``restore(path)`` into the live objects."""

    name: str
    label: str
    save: Callable[[str], None]
    restore: Callable[[str], None] | None  # None: same restore path as another method, not repeated


def make_methods(model: nn.Module, opt: torch.optim.Optimizer, names: list[str]) -> list[Method]:
    """The methods named in ``names``, each bound to the live ``model`` and ``opt``."""
    tensors = state_tensors(model, opt)
    methods: list[Method] = []

    # raw: the physical limit. Writes and reads straight from/into the live tensors' memory.
    def raw_save(path: str) -> None:
        with open(path, "wb", buffering=0) as f:
            for t in state_tensors(model, opt):
                mv = _bytes_view(t)
                for i in range(0, len(mv), _CHUNK):
                    f.write(mv[i : i + _CHUNK])
            os.fsync(f.fileno())

    def raw_restore(path: str) -> None:
        with open(path, "rb", buffering=0) as f:
            for t in state_tensors(model, opt):
                mv = _bytes_view(t)
                got = 0
                while got < len(mv):
                    n = f.readinto(mv[got:])
                    if not n:
                        raise EOFError(path)
                    got += n

    methods.append(Method("raw", "raw write/read", raw_save, raw_restore))

    # resumekit
    import resumekit

    step_counter = iter(range(1, 1 << 30))
    blocking = BLOCKING
    live = {"model": model, "optimizer": opt}

    def rk_save(path: str) -> None:
        resumekit.Checkpointer(path).save(live, step=next(step_counter))

    def rk_restore(path: str) -> None:
        if resumekit.Checkpointer(path).restore(live) is None:
            raise RuntimeError(f"resumekit found no checkpoint in {path}")

    methods.append(Method("resumekit", "resumekit", rk_save, rk_restore))

    # resumekit async: one Checkpointer for every repetition, so its staging buffers are reused as in a
    # training loop. "save" is save_async + wait (until durable); the blocking part is kept apart.
    if hasattr(resumekit.Checkpointer, "save_async"):
        async_ckpt: dict[str, Any] = {}

        def rk_async_save(path: str) -> None:
            ckpt = async_ckpt.get(path)
            if ckpt is None:
                async_ckpt.clear()
                ckpt = async_ckpt[path] = resumekit.Checkpointer(path)
            t0 = time.perf_counter()
            ckpt.save_async(live, step=next(step_counter))
            blocking.append(time.perf_counter() - t0)
            ckpt.wait()

        methods.append(Method("resumekit-async", "resumekit async", rk_async_save, None))

    # torch.save / torch.load(weights_only=True)
    def ts_save(path: str) -> None:
        with open(path, "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())

    def ts_restore(path: str) -> None:
        sd = torch.load(path, weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])

    methods.append(Method("torch.save", "torch.save/load", ts_save, ts_restore))

    # safetensors: model + flattened optimizer tensors, param_groups in the metadata
    def st_flat() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        flat = {f"model.{k}": v for k, v in model.state_dict().items()}
        osd = opt.state_dict()
        for pid, st in osd["state"].items():
            for k, v in st.items():
                flat[f"optim.{pid}.{k}"] = v
        return flat, {"param_groups": json.dumps(osd["param_groups"])}

    def st_save(path: str) -> None:
        from safetensors.torch import save_file

        flat, meta = st_flat()
        save_file(flat, path, metadata=meta)
        _fsync_path(path)

    def st_restore(path: str) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        flat = load_file(path)
        with safe_open(path, framework="pt") as f:
            groups = json.loads(f.metadata()["param_groups"])
        model.load_state_dict({k[6:]: v for k, v in flat.items() if k.startswith("model.")})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in flat.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": groups})

    methods.append(Method("safetensors", "safetensors", st_save, st_restore))

    # torch.distributed.checkpoint, one process
    def dcp_save(path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, storage_writer=dcp.FileSystemWriter(path, sync_files=True))

    def dcp_restore(path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, opt)
        dcp.load({"model": msd, "optim": osd}, storage_reader=dcp.FileSystemReader(path))
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)

    methods.append(Method("dcp", "torch DCP", dcp_save, dcp_restore))
    # The frameworks are set up only when asked for: their imports and setup cost seconds.
    if "lightning" in names:
        methods.append(_lightning_method(model, opt))
    if "accelerate" in names:
        methods.append(_accelerate_method(model, opt))
    del tensors
    return [m for m in methods if m.name in names]


def _lightning_method(model: nn.Module, opt: torch.optim.Optimizer) -> Method:
    """Lightning's ``Trainer.save_checkpoint`` + fsync, and its resume path for model and optimizer.

    A ``fit`` with ``max_steps=0`` (done here, outside the clock) runs the Trainer's setup, which attaches
    the module and takes the optimizer from ``configure_optimizers``, and trains nothing: the live state is
    unchanged (the benchmark's fingerprint check would catch a change). Lightning does not fsync: its
    ``_atomic_save`` serializes the whole checkpoint into a ``BytesIO`` and writes a copy of it through an
    fsspec transaction (temporary file renamed into place), so this method fsyncs the file afterwards.
    """
    import logging

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Wrapped(pl.LightningModule):
        """The benchmark's model and optimizer as a LightningModule (``state_dict`` keys ``net.*``)."""

        def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
            super().__init__()
            self.net = net
            self.bench_optimizer = optimizer

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return self.bench_optimizer

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    module = Wrapped(model, opt)
    width = next(model.parameters()).shape[-1]
    loader: DataLoader[tuple[torch.Tensor, ...]] = DataLoader(
        TensorDataset(torch.zeros(1, width)), batch_size=1
    )
    with tempfile.TemporaryDirectory(prefix=".bench-lightning-") as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        trainer.fit(module, train_dataloaders=loader)
    if len(trainer.optimizers) != 1 or trainer.optimizers[0] is not opt:
        raise RuntimeError(
            "lightning: the Trainer did not attach the benchmark's optimizer after fit(max_steps=0)"
        )

    def save(path: str) -> None:
        trainer.save_checkpoint(path)
        _fsync_path(path)

    def restore(path: str) -> None:
        # The steps of trainer._checkpoint_connector.restore() that load model and optimizer states; the
        # loops, callbacks and (absent) schedulers it also restores are a few bytes and are not needed here.
        checkpoint = trainer.strategy.load_checkpoint(path)
        trainer.strategy.load_model_state_dict(checkpoint)
        trainer.strategy.load_optimizer_state_dict(checkpoint)

    return Method("lightning", "Lightning", save, restore)


def _accelerate_method(model: nn.Module, opt: torch.optim.Optimizer) -> Method:
    """Accelerate's ``save_state`` + fsync of every file written, and ``load_state``.

    ``Accelerator(cpu=True).prepare(model, opt)`` runs once, here, outside the clock; on one CPU process it
    returns the same model and wraps the same optimizer. Accelerate does not fsync: ``save_state`` writes
    ``model.safetensors`` (``safetensors.torch.save_file``), ``optimizer.bin`` (``torch.save``, pickle) and
    ``random_states_0.pkl`` and returns, so this method fsyncs each of those files afterwards.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    prepared_model, prepared_opt = accelerator.prepare(model, opt)
    if prepared_model is not model or getattr(prepared_opt, "optimizer", None) is not opt:
        raise RuntimeError("accelerate: prepare() replaced the model or optimizer; the state would diverge")

    def save(path: str) -> None:
        accelerator.save_state(path)
        for folder, _, files in os.walk(path):
            for name in files:
                _fsync_path(os.path.join(folder, name))

    def restore(path: str) -> None:
        accelerator.load_state(path)

    return Method("accelerate", "Accelerate", save, restore)


# -- the run ------------------------------------------------------------------------------------------


@dataclass
class Result:
    """Every repetition's measurements of one method."""

    name: str
    label: str
    save_s: list[float] = field(default_factory=list)
    restore_s: list[float] = field(default_factory=list)
    save_mem: list[int] = field(default_factory=list)
    restore_mem: list[int] = field(default_factory=list)
    blocking_s: list[float] = field(default_factory=list)
    save_cpu: list[float] = field(default_factory=list)  # user + system seconds, all threads
    restore_cpu: list[float] = field(default_factory=list)
    foreign_io: list[int] = field(default_factory=list)  # other processes' disk bytes per measurement
    disk_bytes: int = 0

    def med(self, attr: str) -> float:
        """Median of a list attribute; NaN when it is empty (e.g. no restore for this method)."""
        values = getattr(self, attr)
        return float(statistics.median(values)) if values else float("nan")

    def span(self, attr: str) -> str:
        values = getattr(self, attr)
        return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def _fingerprint(tensors: list[torch.Tensor]) -> list[float]:
    return [float(t.reshape(-1)[:: max(1, t.numel() // 64)].double().sum()) for t in tensors]


def _renew(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Give every state tensor private, resident memory again, as in a training process.

    A restore may leave tensors backed by something else (a file mapping, a read buffer); the next
    measurement must not pay, or gain, for what the previous method left behind.
    """
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
        for st in opt.state.values():
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor):
                    st[k] = v.clone()
    gc.collect()


def _perturb(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Overwrite part of the live state so that a restore that loads nothing is caught."""
    with torch.no_grad():
        for t in state_tensors(model, opt)[::3]:
            t.reshape(-1)[:: max(1, t.numel() // 64)] = -1.0


def run(args: argparse.Namespace) -> tuple[list[Result], dict[str, Any]]:
    """Build the state, run every method ``args.reps`` times, and return the results and run facts."""
    t_start = time.perf_counter()
    model, opt = build_state(args.size_gb)
    tensors = state_tensors(model, opt)
    state_bytes = nbytes_of(tensors)
    reference = _fingerprint(tensors)
    del tensors
    methods = make_methods(model, opt, args.methods)
    results = {m.name: Result(m.name, m.label) for m in methods}
    workdir = tempfile.mkdtemp(prefix=".bench-save-restore-", dir=args.workdir)
    can_drop = not args.no_drop_caches and drop_caches()
    device = _mount_of(os.path.realpath(workdir))[1]
    loads: list[float] = []
    info: dict[str, Any] = {
        "state_bytes": state_bytes,
        "drop_caches": can_drop,
        "workdir": workdir,
        "n_params": sum(p.numel() for p in model.parameters()),
        "layers": len(model),
        "width": model[0].in_features,
    }
    print(
        f"state: {len(model)} x Linear({model[0].in_features}, {model[0].out_features}) + Adam = "
        f"{state_bytes / GIB:.2f} GiB; folder {workdir} ({describe_disk(workdir)}); "
        f"page cache dropped before reads: {'yes' if can_drop else 'NO'}",
        flush=True,
    )
    try:
        for rep in range(args.reps):
            # Rotate the order each repetition so no method always follows the same neighbour.
            order = methods[rep % len(methods) :] + methods[: rep % len(methods)]
            for m in order:
                r = results[m.name]
                # One path per method: the async Checkpointer is kept across repetitions (see above).
                path = os.path.join(workdir, m.name)
                os.sync()  # earlier writeback must not be billed to this save
                with PeakRSS() as mem, ForeignIO(device) as other:
                    t0, c0 = time.perf_counter(), cpu_seconds()
                    m.save(path)
                    r.save_s.append(time.perf_counter() - t0)
                    r.save_cpu.append(cpu_seconds() - c0)
                r.save_mem.append(mem.extra)
                r.foreign_io.append(other.bytes)
                foreign = other.bytes
                r.disk_bytes = _tree_bytes(path)
                line = (
                    f"  rep {rep + 1}/{args.reps} {m.label:16s} save {r.save_s[-1]:6.2f} s "
                    f"(+{r.save_mem[-1] / 2**20:6.0f} MiB)"
                )
                if m.restore is not None:
                    _perturb(model, opt)
                    if can_drop:
                        drop_caches()
                    else:
                        os.sync()
                    with PeakRSS() as mem, ForeignIO(device) as other:
                        t0, c0 = time.perf_counter(), cpu_seconds()
                        m.restore(path)
                        r.restore_s.append(time.perf_counter() - t0)
                        r.restore_cpu.append(cpu_seconds() - c0)
                    r.restore_mem.append(mem.extra)
                    r.foreign_io.append(other.bytes)
                    foreign += other.bytes
                    if _fingerprint(state_tensors(model, opt)) != reference:
                        raise RuntimeError(f"{m.name}: the restored state differs from the saved one")
                    _renew(model, opt)
                    line += f"  restore {r.restore_s[-1]:6.2f} s (+{r.restore_mem[-1] / 2**20:6.0f} MiB)"
                if m.name == "resumekit-async":
                    r.blocking_s.append(BLOCKING[-1])
                    line += f"  (blocked {BLOCKING[-1]:.2f} s)"
                line += f"  load {os.getloadavg()[0]:.1f}, others' disk I/O {foreign / 1e9:.1f} GB"
                loads.append(os.getloadavg()[0])
                print(line, flush=True)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    info["wall_s"] = time.perf_counter() - t_start
    info["load"] = loads
    info["foreign_io"] = sum(sum(r.foreign_io) for r in results.values())
    return list(results.values()), info


# -- machine description ------------------------------------------------------------------------------


def _mount_of(path: str) -> tuple[str, str, str]:
    best = ("", "?", "?")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, dev, fstype)
    return best


def describe_disk(path: str) -> str:
    """The device, filesystem and mount point holding ``path``."""
    mnt, dev, fstype = _mount_of(os.path.realpath(path))
    extra = ""
    name = os.path.basename(dev)
    rot = f"/sys/block/{name}/queue/rotational"
    if os.path.exists(rot):
        with open(rot) as f:
            extra = ", rotational" if f.read().strip() == "1" else ", non-rotational"
    return f"{dev} {fstype} mounted on {mnt}{extra}"


def describe_machine(path: str) -> dict[str, str]:
    """CPU, RAM, the disk under ``path`` and software versions, for the results file."""
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import safetensors

    import resumekit

    rk_dir = os.path.dirname(os.path.dirname(os.path.abspath(resumekit.__file__)))
    rev = "?"
    with contextlib.suppress(Exception):
        import subprocess

        rev = subprocess.run(
            ["git", "-C", rk_dir, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", rk_dir, "status", "--porcelain", "--", "resumekit"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        rev += " + uncommitted changes in resumekit/" if dirty else ""
    return {
        "resumekit": f"{rk_dir} at {rev}",
        "cpu": f"{cpu}, nproc={os.cpu_count()}",
        "ram": f"{mem_kib / 2**20:.1f} GiB",
        "disk": describe_disk(path),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "lightning": _version_of("lightning"),
        "accelerate": _version_of("accelerate"),
    }


def _version_of(dist: str) -> str:
    """The installed version of distribution ``dist``, without importing it; "not installed" if absent."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


# -- report -------------------------------------------------------------------------------------------


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b and a == a else "-"


def _mib(x: float, state_bytes: int, digits: int = 1) -> str:
    return f"{x / 2**20:.0f} MiB ({x / state_bytes:.{digits}%})" if x == x else "-"


def _max_note(values: list[int], state_bytes: int) -> str:
    """The maximum, when it differs from the median by more than 1% of the state (e.g. a first call)."""
    if values and max(values) - statistics.median(values) > 0.01 * state_bytes:
        return f"; max {max(values) / 2**20:.0f} MiB"
    return ""


def table(results: list[Result], state_bytes: int) -> str:
    """The results as two markdown tables (save, restore): medians, (min-max), GB/s and ratios."""
    by = {r.name: r for r in results}
    raw, ts = by.get("raw"), by.get("torch.save")
    gb = state_bytes / 1e9
    out: list[str] = []
    for kind, ref_raw, ref_ts in (("save", "raw write", "torch.save"), ("restore", "raw read", "torch.load")):
        wall, cpu, mem = f"{kind}_s", f"{kind}_cpu", f"{kind}_mem"
        r_raw = raw.med(wall) if raw else None
        r_ts = ts.med(wall) if ts else None
        out += [
            f"**{kind.capitalize()}**"
            + (" (fsync included)" if kind == "save" else " (into the live model and optimizer)"),
            "",
            f"| method | seconds, median (min-max) | GB/s | / {ref_raw} | / {ref_ts} | CPU s | peak extra memory |"
            + (" on disk |" if kind == "save" else ""),
            "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if kind == "save" else ""),
        ]
        for r in results:
            if not getattr(r, wall):
                continue
            t = r.med(wall)
            label = r.label + (
                f" (blocked {r.med('blocking_s'):.2f} s)" if kind == "save" and r.blocking_s else ""
            )
            row = (
                f"| {label} | {t:.2f} ({r.span(wall)}) | {gb / t:.3f} | {_ratio(t, r_raw)} | {_ratio(t, r_ts)} "
                f"| {r.med(cpu):.2f} | {_mib(r.med(mem), state_bytes)}{_max_note(getattr(r, mem), state_bytes)} |"
            )
            out.append(row + (f" {r.disk_bytes / 1e9:.3f} GB |" if kind == "save" else ""))
        out.append("")
    return "\n".join(out).rstrip()


def targets(results: list[Result], state_bytes: int) -> list[tuple[str, str, bool]]:
    """Each target of issues 2 and 8 for resumekit: (target, measured, met), judged on medians.

    The measured column also gives the ratio of the fastest repetitions ("best"), which is less
    sensitive to other processes using the machine at the same time.
    """
    by = {r.name: r for r in results}
    rk = by.get("resumekit")
    if rk is None:
        return []
    out: list[tuple[str, str, bool]] = []

    def ratio(attr: str, other: str, limit: float, name: str, strict: bool = False) -> None:
        if other not in by or not getattr(by[other], attr):
            return
        med = rk.med(attr) / by[other].med(attr)
        best = min(getattr(rk, attr)) / min(getattr(by[other], attr))
        ok = med < limit if strict else med <= limit
        out.append((name, f"{med:.2f}x (best {best:.2f}x)", ok))

    ratio("save_s", "raw", 1.3, "save <= 1.3x raw write (issue 2)")
    ratio("save_s", "raw", 1.15, "save <= 1.15x raw write (issue 8)")
    ratio("save_s", "torch.save", 1.0, "save faster than torch.save + fsync (issue 8)", strict=True)
    ratio("save_s", "dcp", 1.0, "save faster than DCP (issue 8)", strict=True)
    ratio(
        "restore_s", "torch.save", 1.0, "restore no slower than torch.load(weights_only=True) (issues 2, 8)"
    )
    ratio("restore_s", "raw", 1.2, "restore <= 1.2x raw read (issue 8)")
    mem = rk.med("save_mem")
    out.append(
        (
            "peak extra memory during save < 10% of the state (issues 2, 8)",
            f"{mem / state_bytes:.1%} (max {max(rk.save_mem) / state_bytes:.1%})",
            mem < 0.1 * state_bytes,
        )
    )
    return out


def write_markdown(
    path: str,
    command: str,
    results: list[Result],
    info: dict[str, Any],
    machine: dict[str, str],
    args: argparse.Namespace,
) -> None:
    """The results file: command, machine, method notes, the table, the targets and every repetition."""
    sb = info["state_bytes"]
    lines = [
        "# Save and restore: resumekit next to the alternatives",
        "",
        "Produced by (from the repository root):",
        "",
        f"```\n{command}\n```",
        "",
        f"- Date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}; whole run {info['wall_s']:.0f} s.",
        f"- Shared machine: 1-minute load average during the run {min(info['load']):.1f}-{max(info['load']):.1f} "
        f"on {os.cpu_count()} CPUs; other processes moved {info['foreign_io'] / 1e9:.1f} GB on this disk while "
        "the measurements ran (device counters minus this process's own I/O). Absolute times and spreads "
        "reflect that; ratios within one run are the meaningful numbers.",
        f"- State: {info['layers']} x `nn.Linear({info['width']}, {info['width']})` float32 "
        f"({info['n_params'] / 1e6:.0f} M parameters) + Adam `exp_avg`, `exp_avg_sq`, `step` after one step = "
        f"{sb / GIB:.3f} GiB ({sb / 1e9:.3f} GB).",
        f"- Machine: {machine['cpu']}; RAM {machine['ram']}; disk {machine['disk']}; kernel {machine['kernel']}.",
        f"- Software: Python {machine['python']}, torch {machine['torch']}, safetensors {machine['safetensors']}"
        + "".join(f", {k} {machine[k]}" for k in ("lightning", "accelerate") if k in machine)
        + "; "
        f"resumekit from {machine['resumekit']}.",
        f"- {args.reps} repetitions, interleaved across methods; median shown, (min-max) beside it. GB = 1e9 bytes; "
        "GB/s are state bytes over seconds.",
        "- Save includes every fsync (of every file; resumekit also fsyncs its folders). Restore = state back in the "
        "live model and optimizer, checksums verified where the method has them (resumekit only).",
        "- Page cache before each restore: "
        + (
            "**dropped** (`echo 3 > /proc/sys/vm/drop_caches`), so every restore reads from the disk."
            if info["drop_caches"]
            else "**not dropped** (not permitted here): every restore reads from the page cache, for every method alike."
        ),
        "- Peak extra memory: highest RSS during the call (VmRSS sampled every 2 ms plus the kernel's VmHWM, "
        "reset before the call) minus RSS just before it; the percentage is of the state's bytes.",
        "",
        table(results, sb),
        "",
        "## Targets (resumekit, this run)",
        "",
        "| target | measured | met |",
        "|---|---:|:---:|",
    ]
    for name, value, ok in targets(results, sb):
        lines.append(f"| {name} | {value} | {'yes' if ok else '**no**'} |")
    lines += [
        "",
        "## Every repetition (seconds, in run order)",
        "",
        "| method | save | restore |",
        "|---|---|---|",
    ]
    for r in results:
        save = ", ".join(f"{v:.2f}" for v in r.save_s)
        if r.blocking_s:
            save += " (blocked " + ", ".join(f"{v:.2f}" for v in r.blocking_s) + ")"
        lines.append(f"| {r.label} | {save} | {', '.join(f'{v:.2f}' for v in r.restore_s) or '-'} |")
    if args.notes and os.path.exists(args.notes):
        with open(args.notes) as f:
            lines += ["", f.read().rstrip()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_chart(path: str, results: list[Result], info: dict[str, Any]) -> None:
    """A PNG with save time, restore time and peak save memory per method (medians, min-max bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def color(r: Result) -> str:
        return {"raw": "#888888", "resumekit": "#d62728", "resumekit-async": "#ff9896"}.get(r.name, "#1f77b4")

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    panels = (
        ("save_s", "save, fsync included (s)", 1.0),
        ("restore_s", "restore into the live objects (s)", 1.0),
        ("save_mem", "peak extra memory during save (MiB)", 1 / 2**20),
    )
    for ax, (attr, title, scale) in zip(axes, panels):
        shown = [r for r in results if getattr(r, attr)]
        meds = [r.med(attr) * scale for r in shown]
        lo = [m - min(getattr(r, attr)) * scale for m, r in zip(meds, shown)]
        hi = [max(getattr(r, attr)) * scale - m for m, r in zip(meds, shown)]
        bars = ax.bar(
            [r.label for r in shown], meds, color=[color(r) for r in shown], yerr=[lo, hi], capsize=4
        )
        ax.bar_label(bars, fmt="%.2f" if scale == 1.0 else "%.0f", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[2].axhline(0.1 * info["state_bytes"] / 2**20, color="k", ls="--", lw=1, label="10% of state")
    axes[2].legend(fontsize=8)
    cache = "cold page cache" if info["drop_caches"] else "page cache NOT dropped"
    fig.suptitle(
        f"{info['state_bytes'] / GIB:.2f} GiB model + Adam state, local disk, median of reps "
        f"(bars: min-max), {cache}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print the table and write ``results/``."""
    # A SIGTERM unwinds like Ctrl-C, so the multi-GB scratch folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--size-gb", type=float, default=1.0, help="GiB of float32 parameters (x3 with Adam); default 1"
    )
    p.add_argument(
        "--reps", type=int, default=3, help="repetitions of each method (median reported); default 3"
    )
    p.add_argument(
        "--methods", default=",".join(ALL_METHODS), help=f"comma-separated subset of {','.join(ALL_METHODS)}"
    )
    p.add_argument(
        "--workdir",
        default=REPO,
        help="folder on the disk under test (a temporary subfolder is "
        "created and removed); default: the repository",
    )
    p.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache before restores")
    p.add_argument("--no-write", action="store_true", help="print only; do not write results/")
    p.add_argument(
        "--out",
        default="save_restore",
        help="base name of the files written in results/ (.md, .png, .json); default save_restore",
    )
    p.add_argument(
        "--notes",
        default=None,
        help="markdown appended to the results file (analysis written by hand); default results/<out>_notes.md",
    )
    p.add_argument(
        "--render",
        action="store_true",
        help="do not measure: rewrite results/<out>.md and .png from results/<out>.json and the notes",
    )
    args = p.parse_args(argv)
    if args.notes is None:
        args.notes = os.path.join(RESULTS, f"{args.out}_notes.md")
    base = os.path.join(RESULTS, args.out)
    if args.render:
        with open(base + ".json") as f:
            saved = json.load(f)
        results = [Result(**r) for r in saved["results"]]
        args.reps = saved["reps"]
        write_markdown(base + ".md", saved["command"], results, saved["info"], saved["machine"], args)
        write_chart(base + ".png", results, saved["info"])
        print(f"rewrote {base}.md and {base}.png from {base}.json")
        return 0
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(ALL_METHODS)
    if unknown or args.reps < 1 or args.size_gb <= 0:
        p.error(f"unknown methods {sorted(unknown)}" if unknown else "--reps and --size-gb must be positive")
    if _mount_of(os.path.realpath(args.workdir))[2] in ("tmpfs", "ramfs"):
        p.error(
            f"--workdir {args.workdir} is in memory ({describe_disk(args.workdir)}); pick a folder on disk"
        )
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    command = (  # run from the repository root, as the results file says
        ".venv/bin/python "
        + " ".join(
            shlex.quote(a)
            for a in [os.path.relpath(os.path.abspath(sys.argv[0]), REPO), *(argv or sys.argv[1:])]
        )
    )
    pythonpath = os.environ.get("PYTHONPATH")
    if pythonpath:
        command = f"PYTHONPATH={shlex.quote(pythonpath)} " + command
    machine = describe_machine(args.workdir)
    print(f"resumekit: {machine['resumekit']}", flush=True)
    results, info = run(args)
    print()
    print(table(results, info["state_bytes"]))
    print()
    for name, value, ok in targets(results, info["state_bytes"]):
        print(f"  [{'met' if ok else 'MISSED'}] {name}: {value}")
    if not args.no_write:
        os.makedirs(RESULTS, exist_ok=True)
        with open(base + ".json", "w") as f:
            json.dump(
                {
                    "command": command,
                    "reps": args.reps,
                    "machine": machine,
                    "info": info,
                    "results": [dataclasses.asdict(r) for r in results],
                },
                f,
                indent=1,
            )
        write_markdown(base + ".md", command, results, info, machine, args)
        write_chart(base + ".png", results, info)
        print(f"\nwrote {base}.md, {base}.png and {base}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
