"""Hostile checkpoints: files crafted by someone else, with checksums that match (an attacker recomputes
them). Pickle payloads, manifests naming paths outside the step, absurd sizes and shapes, deep nesting and
unknown tags must be refused with a clear error, before any file outside the step is opened, and nothing
may ever be unpickled.

Two sentinels watch every test here: pickle's and torch's loaders are replaced by functions that record
the call (and raise), and a process audit hook records every ``open`` and every ``pickle.find_class``.
The pickle payloads used would create a marker file if they were ever unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crc32c
import pytest
import torch
from torch import nn

import resumekit as rk
from resumekit.errors import CheckpointCorruptError, UnsafeCheckpointError
from resumekit.format.manifest import Manifest, seal
from resumekit.testing.strategies import assert_identical

STEP1, STEP2 = "step-000000000001", "step-000000000002"

# -- sentinels --------------------------------------------------------------------------------------

_AUDIT: list[tuple[str, Any]] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # Permanent for the process (audit hooks cannot be removed), so it does nothing unless armed.
    if _AUDIT is not None and event in ("open", "pickle.find_class", "os.listdir", "marshal.loads"):
        _AUDIT.append((event, args[0] if args else None))


sys.addaudithook(_audit)


class _Payload:
    """Unpickling this creates ``path``: proof that someone ran the unpickler."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.path)!r}, 'w').close()",))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "UNPICKLED-MARKER"


@pytest.fixture
def payload(marker: Path) -> bytes:
    raw = pickle.dumps({"weights": _Payload(marker)}, protocol=4)
    assert not marker.exists()
    return raw


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fail the test if anything calls an unpickler, even if the caller swallowed the exception."""
    calls: list[str] = []

    def forbidden(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} was called while reading a checkpoint")

        return call

    monkeypatch.setattr(pickle, "loads", forbidden("pickle.loads"))
    monkeypatch.setattr(pickle, "load", forbidden("pickle.load"))
    monkeypatch.setattr(pickle, "Unpickler", forbidden("pickle.Unpickler"))
    monkeypatch.setattr(torch, "load", forbidden("torch.load"))
    yield calls
    assert calls == [], f"an unpickler ran: {calls}"


@pytest.fixture
def audit() -> Iterator[list[tuple[str, Any]]]:
    """Arm the audit hook for the test body; yields the events recorded."""
    global _AUDIT
    events: list[tuple[str, Any]] = []
    _AUDIT = events
    try:
        yield events
    finally:
        _AUDIT = None


# -- building hostile checkpoints -------------------------------------------------------------------


def _state(step: int) -> dict[str, Any]:
    torch.manual_seed(step)
    return {"model": nn.Linear(4, 4), "meta": {"step": step, "t": torch.arange(3) * step}}


def _target() -> dict[str, Any]:
    return {"model": nn.Linear(4, 4), "meta": {}}


def _crc(raw: bytes) -> str:
    return f"{crc32c.crc32c(raw):08x}"


def forge(
    root: Path,
    files: dict[str, bytes] | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
    manifest_bytes: bytes | None = None,
) -> None:
    """Rewrite step 2 the way an attacker would: new file contents with matching sizes and checksums."""
    step = root / STEP2
    manifest = json.loads((step / "manifest.json").read_bytes())
    for rel, raw in (files or {}).items():
        path = step / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
        if rel in manifest["files"]:
            manifest["files"][rel] = {"size": len(raw), "crc32c": _crc(raw)}
    if edit is not None:
        edit(manifest)
    (step / "manifest.json").write_bytes(manifest_bytes if manifest_bytes is not None else seal(manifest))


# Reading the Python installation (lazy imports, package metadata) is not reading the checkpoint.
_CODE_DIRS = tuple(
    os.path.realpath(p) + os.sep
    for p in {sys.prefix, sys.base_prefix, os.path.dirname(os.__file__), str(Path(rk.__file__).parents[1])}
)


def _outside_opens(events: list[tuple[str, Any]], allowed: Path) -> list[str]:
    """Files opened outside ``allowed`` (the step folder), other than the Python installation's."""
    inside = str(allowed.resolve()) + os.sep
    out = []
    for event, arg in events:
        if event == "open" and isinstance(arg, (str, bytes, os.PathLike)):
            real = os.path.realpath(os.fsdecode(arg))
            if not real.startswith(inside) and not real.startswith(_CODE_DIRS):
                out.append(real)
    return out


def refused(root: Path, audit: list[tuple[str, Any]], match: str) -> str:
    """Restore step 2 explicitly (must raise, touching nothing outside step 2); then restore with
    fallback (must warn and load step 1 exactly). Returns the error message."""
    audit.clear()  # only what restore does counts, not how the test forged the files
    target = _target()
    with pytest.raises((CheckpointCorruptError, UnsafeCheckpointError)) as info:
        rk.Checkpointer(root).restore(target, step=2)
    message = str(info.value)
    assert match in message, message
    assert target["meta"] == {}, "a refused checkpoint was partly loaded"
    outside = _outside_opens(audit, root / STEP2)
    assert outside == [], f"files outside the step were opened: {outside}"
    assert not [e for e in audit if e[0] == "pickle.find_class"]

    target = _target()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = rk.Checkpointer(root).restore(target)
    assert result is not None and result.step == 1
    assert_identical(_state(1)["meta"], target["meta"])
    assert any("step 2" in str(w.message) and match in str(w.message) for w in caught), [
        str(w.message) for w in caught
    ]
    return message


# -- pickle payloads --------------------------------------------------------------------------------


@pytest.mark.parametrize("file", ["model.safetensors", "meta.safetensors"])
def test_pickle_in_place_of_a_tensor_file(
    root: Path, payload: bytes, marker: Path, audit: Any, file: str
) -> None:
    forge(root, {file: payload})
    message = refused(root, audit, file)
    assert "hostile" in message or "JSON" in message or "header" in message
    assert not marker.exists()


@pytest.mark.parametrize("file", ["model.json", "meta.json"])
def test_pickle_in_place_of_a_skeleton(
    root: Path, payload: bytes, marker: Path, audit: Any, file: str
) -> None:
    forge(root, {file: payload})
    refused(root, audit, "not valid JSON")
    assert not marker.exists()


def test_pickle_in_place_of_the_manifest(root: Path, payload: bytes, marker: Path, audit: Any) -> None:
    forge(root, manifest_bytes=payload)
    refused(root, audit, "manifest is not valid JSON")
    assert not marker.exists()


def test_torch_save_file_named_by_the_manifest(root: Path, payload: bytes, marker: Path, audit: Any) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["files"]["model.pt"] = {"size": len(payload), "crc32c": _crc(payload)}

    forge(root, {"model.pt": payload}, edit)
    refused(root, audit, "'model.pt'")
    assert not marker.exists()


# -- paths outside the step -------------------------------------------------------------------------

HOSTILE_PATHS = [
    "../x.json",
    "../step-000000000001/model.json",
    "/etc/passwd",
    "s3://other/x.json",
    "file:///etc/passwd",
    "rank-00001/../../x.json",
    "rank-00001/../../../outside.safetensors",
    "./model.json",
    "model.json/../../x.json",
    "..\\x.json",
    "~/x.json",
    "w-0123456789abcdef/../../x.json",
    "",
    "model.json\x00.png",
]


@pytest.mark.parametrize("bad", HOSTILE_PATHS)
def test_manifest_paths_outside_the_step_are_refused_before_any_io(root: Path, audit: Any, bad: str) -> None:
    outside = root / "x.json"
    outside.write_text('{"stolen": true}')

    def edit(m: dict[str, Any]) -> None:
        m["files"][bad] = {"size": 16, "crc32c": "00000000"}

    forge(root, edit=edit)
    with pytest.raises(UnsafeCheckpointError, match="not a plain file name"):
        Manifest.from_json((root / STEP2 / "manifest.json").read_bytes(), "m")
    refused(root, audit, "not a plain file name")
    opened = [os.fsdecode(a) for e, a in audit if e == "open" and isinstance(a, (str, bytes))]
    assert not [p for p in opened if p.endswith(("x.json", "passwd"))]


@pytest.mark.parametrize("bad", ["../x", "a/b", "/etc", ".."])
def test_hostile_entry_names_in_the_manifest_are_refused(root: Path, audit: Any, bad: str) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["entries"][bad] = {"scope": "replicated", "kind": "state", "ranks": [0]}

    forge(root, edit=edit)
    refused(root, audit, "entry name")


@pytest.mark.parametrize("prefix", ["../", "/tmp/", "w-0123456789abcdef/../../", "s3://x/"])
def test_hostile_data_prefix_is_refused(root: Path, audit: Any, prefix: str) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["data_prefix"] = prefix

    forge(root, edit=edit)
    refused(root, audit, "data_prefix")


def test_symlink_inside_the_step_is_not_followed_outside(root: Path, audit: Any, tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_bytes((root / STEP2 / "meta.json").read_bytes())
    (root / STEP2 / "meta.json").unlink()
    (root / STEP2 / "meta.json").symlink_to(secret)
    audit.clear()
    target = _target()
    try:
        rk.Checkpointer(root).restore(target, step=2)
    except rk.ResumeKitError:
        pass
    assert _outside_opens(audit, root / STEP2) == []


# -- absurd sizes and shapes ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [2**60, -1, 1.5, "16", None, True])
def test_absurd_file_sizes_are_refused(root: Path, audit: Any, size: Any) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["files"]["model.safetensors"]["size"] = size

    forge(root, edit=edit)
    refused(root, audit, "model.safetensors")


def _safetensors(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _model_header(shape: list[int], data_len: int) -> dict[str, Any]:
    # The model's real tensor names, so the skeleton finds them: only the shape lies.
    return {
        "weight": {"dtype": "F32", "shape": shape, "data_offsets": [0, data_len]},
        "bias": {"dtype": "F32", "shape": [4], "data_offsets": [data_len, data_len + 16]},
    }


@pytest.mark.parametrize("shape", [[2**40, 2**40], [2**62], [4, 2**61]])
def test_absurd_tensor_shapes_are_refused(root: Path, audit: Any, shape: list[int]) -> None:
    forge(root, {"model.safetensors": _safetensors(_model_header(shape, 64), bytes(80))})
    message = refused(root, audit, "model.safetensors")
    assert "shape" in message


def test_header_claiming_more_bytes_than_the_file(root: Path, audit: Any) -> None:
    forge(root, {"model.safetensors": struct.pack("<Q", 2**62) + b"{}"})
    refused(root, audit, "truncated or hostile")


def test_empty_tensor_with_overflowing_shape_is_refused(root: Path, audit: Any) -> None:
    header = {"weight": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}
    header["bias"] = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    forge(root, {"model.safetensors": _safetensors(header, bytes(16))})
    refused(root, audit, "model.safetensors")


# -- deep nesting and unknown tags ------------------------------------------------------------------


def test_skeleton_nested_beyond_the_limit_is_refused(root: Path, audit: Any) -> None:
    deep = "[" * 400 + "]" * 400  # valid JSON, deeper than resumekit's decoding limit
    forge(root, {"meta.json": json.dumps({"step": json.loads(deep)}).encode()})
    refused(root, audit, "nested deeper")


@pytest.mark.parametrize("file", ["meta.json", "manifest.json", "meta.safetensors"])
def test_extremely_deep_json_is_refused_cleanly(root: Path, audit: Any, file: str) -> None:
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    if file == "manifest.json":
        raw = (root / STEP2 / "manifest.json").read_bytes()
        forge(root, manifest_bytes=raw[:-1] + b', "x": ' + deep + b"}")
    elif file == "meta.json":
        forge(root, {file: b'{"step": ' + deep + b"}"})
    else:
        header = b'{"__metadata__": ' + deep + b"}"
        header += b" " * (-len(header) % 8)
        forge(root, {file: struct.pack("<Q", len(header)) + header})
    refused(root, audit, file)


@pytest.mark.parametrize(
    "value",
    [
        {"$t": "pickle", "data": "gASVAAAAAAAAAAA="},
        {"$t": "object", "cls": "os.system", "args": ["touch /tmp/pwned"]},
        {"$t": "global", "module": "builtins", "name": "exec"},
        {"$t": ["tensor"]},
        {"$t": "dtype", "v": "__class__"},
        {"$t": "dtype", "v": "Tensor"},
        {"$t": "npscalar", "dtype": "O", "hex": "00"},
        {"$t": "npscalar", "dtype": "f8", "hex": "00"},
        {"$t": "bytes", "b64": "not base64!"},
        {"$t": "tensor", "key": "no-such-tensor"},
        {"$t": "dict", "items": [[{"$t": "tensor", "key": "t"}, 1]]},
        {"$t": "tuple", "items": "abc"},
        {"$t": "odict", "items": [[1, 2, 3]]},
    ],
    ids=lambda v: str(v)[:40],
)
def test_unknown_or_malformed_tags_are_refused(root: Path, audit: Any, marker: Path, value: Any) -> None:
    forge(root, {"meta.json": json.dumps({"step": value}).encode()})
    refused(root, audit, "step 2")
    assert not Path("/tmp/pwned").exists()


@pytest.mark.parametrize(
    "value",
    [
        {"$t": "float", "bits": "00"},
        {"$t": "device", "v": "bogus"},
        {"$t": "tensor", "key": "t", "param": True, "requires_grad": True},
    ],
    ids=["float-bits", "device", "int-param-grad"],
)
def test_malformed_known_tags_are_refused_cleanly(root: Path, audit: Any, value: Any) -> None:
    forge(root, {"meta.json": json.dumps({"step": value, "t": {"$t": "tensor", "key": "t"}}).encode()})
    refused(root, audit, "meta")


def test_a_legitimate_checkpoint_passes_the_same_sentinels(root: Path, audit: Any) -> None:
    # The sentinels are not trivially satisfied: a real restore opens files, and only inside the step.
    target = _target()
    result = rk.Checkpointer(root).restore(target, step=2)
    assert result is not None and result.step == 2
    assert_identical(_state(2)["meta"], target["meta"])
    opened = [os.fsdecode(a) for e, a in audit if e == "open" and isinstance(a, (str, bytes))]
    assert any(p.endswith("model.safetensors") for p in opened)
    assert _outside_opens(audit, root / STEP2) == []


# -- hostile numbers and encodings (issue 17, items 5 and 7) ---------------------------------------
# Each forged file has checksums that match, as any hostile writer can recompute them; each must be a
# refused, skipped step with fallback to step 1, never an exception past the fallback.

_BIG = "1" + "0" * 5000  # a 5001-digit literal: Python's int/str limit is 4300 digits


def _manifest_text(root: Path) -> str:
    return (root / STEP2 / "manifest.json").read_text()


@pytest.mark.parametrize("value", [10**400, -(10**400), 2**64], ids=["1e400", "-1e400", "2**64"])
def test_created_unix_out_of_range_is_refused(root: Path, audit: Any, value: int) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["created_unix"] = value

    forge(root, edit=edit)
    refused(root, audit, "created_unix")


def test_a_5000_digit_integer_in_the_manifest_is_refused(root: Path, audit: Any) -> None:
    text = _manifest_text(root)
    forge(root, manifest_bytes=text.replace('"step": 2', f'"step": {_BIG}', 1).encode())
    refused(root, audit, "integer literal")


def test_a_float_literal_overflowing_to_infinity_in_the_manifest_is_refused(root: Path, audit: Any) -> None:
    text = _manifest_text(root)
    forge(root, manifest_bytes=text.replace('"created_unix": ', '"created_unix": 1e999 + ', 1).encode())
    refused(root, audit, "manifest")


@pytest.mark.parametrize(
    "skeleton",
    [
        b'{"step": ' + _BIG.encode() + b"}",
        b'{"step": {"$t": "size", "v": [Infinity]}}',
        b'{"step": {"$t": "size", "v": [1e400]}}',
        b'{"step": {"$t": "size", "v": [' + str(10**30).encode() + b"]}}",
        b'{"step": {"$t": "size", "v": [1.5]}}',
        b'{"step": NaN}',
        b'{"step": {"$t": "int", "hex": "xyz"}}',
        b'{"step": {"$t": "npscalar", "dtype": "(99999999999999999999,)f8", "hex": "00"}}',
        b'{"step": {"$t": "complex", "dtype": "complex128", "key": "t"}, "t": {"$t": "tensor", "key": "t"}}',
        b'{"step": {"$t": "complex", "dtype": "object", "key": "t"}, "t": {"$t": "tensor", "key": "t"}}',
        b'{"step": {"$t": "ndarray", "key": "t", "byteorder": "?"}, "t": {"$t": "tensor", "key": "t"}}',
        b'{"step": 1, "step": 2}',
        b"\xef\xbb\xbf" + b'{"step": 2}',
        '{"step": 2}'.encode("utf-16"),
    ],
    ids=[
        "5000-digit-int",
        "size-Infinity",
        "size-1e400",
        "size-1e30",
        "size-float",
        "NaN",
        "int-hex-garbage",
        "npscalar-huge-subarray",
        "complex-of-int64",
        "complex-unknown-dtype",
        "ndarray-byteorder",
        "duplicate-key",
        "utf8-bom",
        "utf16",
    ],
)
def test_hostile_numbers_and_encodings_in_a_skeleton_are_refused(
    root: Path, audit: Any, skeleton: bytes
) -> None:
    forge(root, {"meta.json": skeleton})
    refused(root, audit, "meta")


def test_a_5000_digit_offset_in_a_safetensors_header_is_refused(root: Path, audit: Any) -> None:
    header = b'{"t": {"dtype": "I64", "shape": [3], "data_offsets": [0, ' + _BIG.encode() + b"]}}"
    header += b" " * (-len(header) % 8)
    forge(root, {"meta.safetensors": struct.pack("<Q", len(header)) + header + bytes(24)})
    refused(root, audit, "meta.safetensors")


@pytest.mark.parametrize("dtype", [["F32"], {"a": 1}, 5, None])
def test_unhashable_or_odd_dtype_in_a_safetensors_header_is_refused(
    root: Path, audit: Any, dtype: Any
) -> None:
    header = {"t": {"dtype": dtype, "shape": [3], "data_offsets": [0, 24]}}
    forge(root, {"meta.safetensors": _safetensors(header, bytes(24))})
    refused(root, audit, "unknown dtype")


@pytest.mark.parametrize("version", [0, -1, -(10**30)])
def test_zero_or_negative_format_version_is_refused(root: Path, audit: Any, version: int) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["format_version"] = version

    forge(root, edit=edit)
    refused(root, audit, "format_version")


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-32"])
def test_a_manifest_re_encoded_is_refused(root: Path, audit: Any, encoding: str) -> None:
    # json.loads(bytes) detects these encodings by itself, and the self-checksum covers the parsed form:
    # without strict parsing each one passed as the original manifest.
    forge(root, manifest_bytes=_manifest_text(root).encode(encoding))
    refused(root, audit, "manifest")


def test_a_manifest_with_a_duplicate_key_is_refused(root: Path, audit: Any) -> None:
    # The last "step" wins in json.loads, so the checksum of the parsed form still matched.
    text = _manifest_text(root)
    forge(root, manifest_bytes=text.replace("{", '{\n "step": 999,', 1).encode())
    refused(root, audit, "duplicate key")


def test_ranks_that_are_not_a_list_are_refused(root: Path, audit: Any) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["entries"]["meta"]["ranks"] = {"0": 0}

    forge(root, edit=edit)
    refused(root, audit, "manifest")


@pytest.mark.parametrize("skeleton", [b"[1, 2]", b'"text"', b"7", b'{"$t": "tuple", "items": [1]}'])
def test_a_skeleton_that_is_not_a_dict_leaves_the_mapping_untouched(
    root: Path, audit: Any, skeleton: bytes
) -> None:
    # A mapping entry is restored with clear() then update(): a non-dict used to empty the user's dict
    # first and then raise a bare TypeError.
    forge(root, {"meta.json": skeleton})
    target = {"model": nn.Linear(4, 4), "meta": {"keep": "me"}}
    with pytest.raises(CheckpointCorruptError, match="decodes to a"):
        rk.Checkpointer(root).restore(target, step=2)
    assert target["meta"] == {"keep": "me"}
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        result = rk.Checkpointer(root).restore(target)
    assert result is not None and result.step == 1
    assert_identical(_state(1)["meta"], target["meta"])


def test_a_module_skeleton_that_is_not_a_dict_is_refused(root: Path, audit: Any) -> None:
    forge(root, {"model.json": b"[1, 2]"})
    refused(root, audit, "decodes to a list")


@pytest.mark.parametrize(
    "edit_config",
    [
        {"batch_size": 10**4000, "grad_accumulation": 10**4000},
        {"batch_size": [1], "grad_accumulation": "x"},
    ],
    ids=["huge-ints", "wrong-types"],
)
def test_hostile_config_numbers_do_not_crash_the_drift_report(
    tmp_path: Path, edit_config: dict[str, Any]
) -> None:
    # The drift message multiplies batch size, accumulation and world size: unbounded ints from a
    # forged manifest made a product whose decimal form Python refuses to build (a bare ValueError).
    config = {"batch_size": 4, "grad_accumulation": 2}
    ckpt = rk.Checkpointer(tmp_path, config=config)
    ckpt.save({"meta": {"a": 1}}, step=2)
    path = tmp_path / STEP2 / "manifest.json"
    m = json.loads(path.read_bytes())
    m["config"].update(edit_config)
    path.write_bytes(seal(m))
    target: dict[str, Any] = {"meta": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = rk.Checkpointer(tmp_path, config=config).restore(target)
    assert result is not None and result.step == 2 and target["meta"] == {"a": 1}
    assert result.drift.items  # the forged values are reported as drift, not crashed on


def test_cli_verify_is_as_strict_as_restore(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `resumekit verify` is what restore's error message points to: it must not call a skeleton fine
    # that restore refuses (a BOM, a duplicate key).
    from resumekit.cli import main

    forge(root, {"meta.json": b"\xef\xbb\xbf" + (root / STEP2 / "meta.json").read_bytes()})
    code = main(["verify", str(root), "--step", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert [(p["file"], p["kind"]) for p in report["steps"][0]["problems"]] == [("meta.json", "json")]
