"""Structured fuzzing of the three parsers that read bytes from storage (issue 17).

The manifest, an entry's JSON skeleton and a safetensors header are each fed inputs built to be almost
right (a real file with fields replaced by hostile values, checksums recomputed as any hostile writer
can) as well as arbitrary bytes. Every input must give a valid value or a resumekit error, within a
deadline: never a bare exception, a hang, or an allocation larger than the file. The last test runs the
same mutations through ``restore()``, which must fall back to the good step.

Fixed seed (``derandomize``), bounded examples: the whole module runs in a few seconds.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any

import crc32c
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import resumekit as rk
from resumekit.drift import DriftPolicy, compare
from resumekit.engine.environment import collect_environment
from resumekit.errors import CheckpointCorruptError, ResumeKitError
from resumekit.format.codec import TensorTable, decode, encode
from resumekit.format.manifest import FORMAT_VERSION, MAX_FILE_BYTES, FileRecord, Manifest, seal
from resumekit.format.strict_json import parse_strict
from resumekit.format.tensorfile import ST_TO_DTYPE, parse_header, tensors_from_buffer

pytestmark = pytest.mark.timeout(120)

# Derandomized: the same examples every run, so CI is reproducible and in budget. The deadline is per
# example, generous for a slow CI machine, yet far below what a quadratic or unbounded parse would take.
FUZZ = settings(
    derandomize=True,
    deadline=2000,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- hostile JSON values ----------------------------------------------------------------------------

_NUMBERS = st.one_of(
    st.integers(),
    st.sampled_from([0, -1, 2**63, -(2**63) - 1, 2**64, 10**400, -(10**4000)]),
    st.floats(allow_nan=False, allow_infinity=False),
)
_SCALARS = st.one_of(st.none(), st.booleans(), _NUMBERS, st.text(max_size=12))
_TAGS = ["tensor", "ndarray", "complex", "float", "tuple", "dict", "odict", "npscalar", "bytes", "dtype",
         "device", "size", "int", "bogus"]  # fmt: skip
_FIELDS = ["key", "bits", "items", "dtype", "hex", "b64", "v", "param", "requires_grad", "ndarray",
           "byteorder", "metadata"]  # fmt: skip


def _tagged(children: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A dict shaped like a codec tag, with hostile field values."""
    return st.builds(
        lambda tag, fields: {"$t": tag, **fields},
        st.sampled_from(_TAGS),
        st.dictionaries(st.sampled_from(_FIELDS), children, max_size=4),
    )


JSON_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=6), children, max_size=4),
        _tagged(children),
    ),
    max_leaves=20,
)

_LITERALS = [b"1" + b"0" * 5000, b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-0", b"1e-400"]


def _serialise(value: Any) -> bytes:
    """JSON bytes of ``value``; ints too long for ``json.dumps`` are written as raw literals."""
    return json.dumps(value, default=str).encode() if _dumpable(value) else b"null"


def _dumpable(value: Any) -> bool:
    try:
        json.dumps(value)
    except ValueError:
        return False
    return True


@st.composite
def json_bytes(draw: st.DrawFn, base: Any) -> bytes:
    """``base`` with one value replaced by a hostile one, as bytes; sometimes a raw literal spliced in
    (a 5000-digit int, NaN, 1e400), a BOM, a duplicate key or another encoding."""
    value = draw(_mutate(base))
    raw = _serialise(value)
    how = draw(st.integers(0, 9))
    if how == 0:
        raw = raw.replace(b"0", draw(st.sampled_from(_LITERALS)), 1)
    elif how == 1:
        raw = b"\xef\xbb\xbf" + raw
    elif how == 2:
        raw = raw.replace(b"{", b'{"dup": 1, "dup": 2, ', 1) if raw.startswith(b"{") else raw
    elif how == 3:
        raw = raw.decode().encode(draw(st.sampled_from(["utf-16", "utf-32", "latin-1"])))
    elif how == 4:
        cut = draw(st.integers(0, len(raw)))
        raw = raw[:cut]
    return raw


def _mutate(base: Any) -> st.SearchStrategy[Any]:
    """``base`` with zero or more values at random paths replaced by hostile JSON values."""
    if isinstance(base, dict) and base:
        keys = sorted(base)

        @st.composite
        def edit(draw: st.DrawFn) -> Any:
            out = dict(base)
            for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
                out[key] = draw(st.one_of(JSON_VALUES, _mutate(base[key])))
            return out

        return edit()
    if isinstance(base, list) and base:
        return st.one_of(st.just(base), st.lists(JSON_VALUES, max_size=4))
    return st.one_of(st.just(base), JSON_VALUES)


# -- the manifest -----------------------------------------------------------------------------------


def _good_manifest() -> dict[str, Any]:
    m = Manifest(
        step=2,
        writer_id="0123456789abcdef",
        world_size=1,
        entries={},
        files={"meta.json": FileRecord(10, "0badcafe")},
        environment=collect_environment(world_size=1),
        config={"batch_size": 4, "grad_accumulation": 2},
        created_unix=1.5e9,
    )
    d: dict[str, Any] = json.loads(m.to_json())
    d["entries"] = {"meta": {"scope": "replicated", "kind": "mapping", "ranks": [0]}}
    return d


_MANIFEST = _good_manifest()
_ENV = collect_environment(world_size=1)


def _check_manifest(raw: bytes) -> None:
    try:
        m = Manifest.from_json(raw, "fuzz/manifest.json")
    except ResumeKitError:
        return
    assert 1 <= m.format_version <= FORMAT_VERSION
    # What restore does next with a manifest that parsed: compare its environment and config.
    report = compare(
        m.environment,
        m.config,
        _ENV,
        {"batch_size": 4},
        DriftPolicy(),
        saved_format=m.format_version,
        current_format=FORMAT_VERSION,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the drift warnings a forged environment raises
        report.emit(logging.getLogger("resumekit.fuzz"))
    try:
        report.raise_for_errors()
    except ResumeKitError:
        pass
    assert all(0 <= r.size <= MAX_FILE_BYTES for r in m.files.values())


@FUZZ
@given(st.data())
def test_manifest_parser_mutated_and_resealed(data: st.DataObject) -> None:
    value = data.draw(_mutate(_MANIFEST))
    raw = (
        seal(value)
        if isinstance(value, dict) and _dumpable(value) and _sealable(value)
        else _serialise(value)
    )
    _check_manifest(raw)


def _sealable(value: dict[str, Any]) -> bool:
    try:
        seal(value)
    except (TypeError, ValueError):
        return False
    return True


@FUZZ
@given(st.data())
def test_manifest_parser_raw_bytes(data: st.DataObject) -> None:
    _check_manifest(data.draw(st.one_of(json_bytes(_MANIFEST), st.binary(max_size=200))))


# -- the skeleton -----------------------------------------------------------------------------------

_TENSORS = {"t": torch.arange(6, dtype=torch.float64).reshape(3, 2), "i": torch.arange(4)}
_GOOD_SKELETON = encode(
    {"step": 3, "t": _TENSORS["t"], "pair": (1.5, float("nan")), "d": {1: "a"}, "b": b"xy"}, TensorTable()
)


def _lookup(name: str) -> torch.Tensor:
    if name not in _TENSORS:
        raise CheckpointCorruptError(f"no tensor {name!r}")
    return _TENSORS[name]


def _check_skeleton(raw: bytes) -> None:
    try:
        decode(parse_strict(raw, "fuzz/meta.json", "skeleton"), _lookup, "meta")
    except ResumeKitError:
        pass


@FUZZ
@given(st.data())
def test_skeleton_decoder_structured(data: st.DataObject) -> None:
    _check_skeleton(data.draw(json_bytes(_GOOD_SKELETON)))


@FUZZ
@given(JSON_VALUES)
def test_skeleton_decoder_any_value(value: Any) -> None:
    _check_skeleton(_serialise({"step": value}))


@FUZZ
@given(st.binary(max_size=200))
def test_skeleton_decoder_raw_bytes(raw: bytes) -> None:
    _check_skeleton(raw)


# -- the safetensors header -------------------------------------------------------------------------

_DTYPES = st.one_of(st.sampled_from(sorted(ST_TO_DTYPE)), JSON_VALUES)
_DIMS = st.one_of(st.integers(0, 8), st.sampled_from([2**40, 2**62, 2**70, -1]), JSON_VALUES)


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(0, 4))
    header: dict[str, Any] = {}
    offset = 0
    for i in range(n):
        dtype = draw(_DTYPES)
        shape = draw(st.one_of(st.lists(_DIMS, max_size=3), JSON_VALUES))
        itemsize = ST_TO_DTYPE[dtype].itemsize if isinstance(dtype, str) and dtype in ST_TO_DTYPE else 1
        numel = 1
        for d in shape if isinstance(shape, list) else []:
            numel *= d if type(d) is int and 0 <= d < 2**20 else 1
        size = numel * itemsize
        offsets = draw(st.one_of(st.just([offset, offset + size]), st.lists(_DIMS, max_size=3), JSON_VALUES))
        header[draw(st.sampled_from([f"t{i}", "__metadata__", ""]))] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": offsets,
        }
        offset += size
    raw = draw(json_bytes(header))
    raw += b" " * (-len(raw) % 8)
    declared = draw(st.one_of(st.just(len(raw)), st.integers(0, 2**64 - 1)))
    data = bytes(draw(st.one_of(st.just(min(offset, 4096)), st.integers(0, 64))))
    return struct.pack("<Q", declared) + raw + data


def _check_tensor_file(buf: bytes) -> None:
    try:
        specs, _ = parse_header(buf, "fuzz/meta.safetensors")
        tensors = tensors_from_buffer(bytearray(buf), "fuzz/meta.safetensors")
    except ResumeKitError:
        return
    # Nothing larger than the file was allocated or viewed.
    assert sum(t.numel() * t.element_size() for t in tensors.values()) <= len(buf)
    assert set(tensors) == set(specs)


@FUZZ
@given(safetensors_files())
def test_safetensors_header_structured(buf: bytes) -> None:
    _check_tensor_file(buf)


@FUZZ
@given(st.binary(max_size=300))
def test_safetensors_header_raw_bytes(raw: bytes) -> None:
    _check_tensor_file(struct.pack("<Q", max(len(raw) - 8, 0)) + raw if raw[:1] == b"\0" else raw)


# -- all three through restore(): a hostile step is skipped and the good one restored ----------------

STEP2 = "step-000000000002"


def _state(step: int) -> dict[str, Any]:
    torch.manual_seed(step)
    return {"model": nn.Linear(2, 2), "meta": {"step": step, "t": torch.arange(3) * step}}


@pytest.fixture(scope="module")
def pristine_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-pristine")
    ckpt = rk.Checkpointer(root)
    ckpt.save(_state(1), step=1)
    ckpt.save(_state(2), step=2)
    return root


def _crc(raw: bytes) -> str:
    return f"{crc32c.crc32c(raw):08x}"


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_restore_falls_back_past_any_hostile_file(
    pristine_steps: Path, data: st.DataObject, tmp_path_factory: Any
) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(pristine_steps, root, dirs_exist_ok=True)
    step = root / STEP2
    manifest = json.loads((step / "manifest.json").read_bytes())
    which = data.draw(st.sampled_from(["meta.json", "meta.safetensors", "model.json", "manifest.json"]))
    if which == "meta.safetensors":
        raw = data.draw(safetensors_files())
    elif which == "manifest.json":
        raw = b""
    else:
        raw = data.draw(json_bytes(json.loads((step / which).read_bytes())))
    if which != "manifest.json":
        (step / which).write_bytes(raw)
        manifest["files"][which] = {"size": len(raw), "crc32c": _crc(raw)}
    edited = data.draw(_mutate(manifest)) if which == "manifest.json" else manifest
    (step / "manifest.json").write_bytes(
        seal(edited) if isinstance(edited, dict) and _sealable(edited) else _serialise(edited)
    )
    target = {"model": nn.Linear(2, 2), "meta": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = rk.Checkpointer(root).restore(target)
        except ResumeKitError:
            return  # e.g. a forged format version newer than this one: refused, named
    assert result is not None and result.step in (1, 2)
    if result.step == 1:
        assert target["meta"]["step"] == 1 and torch.equal(target["meta"]["t"], torch.arange(3))
