"""The ``resumekit`` command line on S3 (moto on loopback): storage options, ranged header reads,
verification and diff of objects written by the Checkpointer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

import torch
from torch import nn

import resumekit as rk
from resumekit.cli import main
from resumekit.format.layout import step_dir

pytestmark = pytest.mark.s3


def _options(s3: Any) -> list[str]:
    """The endpoint's storage options as --storage-option arguments (JSON values)."""
    out = []
    for key, value in s3.storage_options.items():
        out += ["--storage-option", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return out


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str], expect: int = 0) -> Any:
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == expect, err
    return json.loads(out)


def test_cli_on_s3(s3: Any, unique_prefix: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = s3.url(unique_prefix("cli"), "run")
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ckpt = rk.Checkpointer(url, storage_options=s3.storage_options, config={"batch_size": 4})
    ckpt.save({"model": model}, step=1)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.mul_(2.0)
    ckpt.save({"model": model}, step=2)
    expected = float((model.weight.detach().double() - before.double()).abs().max())
    opts = _options(s3)

    listing = _cli(["ls", url, *opts], capsys)
    assert [(r["step"], r["status"]) for r in listing["steps"]] == [(1, "ok"), (2, "ok")]

    diff = _cli(["diff", f"{url}@1", f"{url}@2", *opts], capsys)
    assert [(c["name"], c["max_abs_diff"]) for c in diff["tensors"]["changes"]] == [("weight", expected)]

    fs = s3.filesystem()
    d = _cli(["inspect", url, *opts], capsys)
    rel = next(f["path"] for f in d["entries"][0]["files"] if f["path"].endswith(".safetensors"))
    assert rel.startswith(d["data_prefix"]) and d["data_prefix"].startswith("w-")
    key = url.removeprefix("s3://") + f"/{step_dir(2)}/{rel}"
    raw = fs.cat_file(key)

    # Only the header is fetched: with the tensor data cut off, the listing is unchanged.
    header_end = 8 + int.from_bytes(raw[:8], "little")
    fs.pipe_file(key, raw[:header_end])
    d = _cli(["inspect", url, *opts], capsys)
    tensors = next(f["tensors"] for f in d["entries"][0]["files"] if f["path"] == rel)
    assert {t["name"]: t["shape"] for t in tensors} == {"weight": [2, 3], "bias": [2]}

    # A flipped byte: verify, through the installed console script, names the object.
    bad = bytearray(raw)
    bad[-1] ^= 0x10
    fs.pipe_file(key, bytes(bad))
    script = shutil.which("resumekit", path=str(Path(sys.executable).parent))
    assert script is not None, "the resumekit console script is not installed: pip install -e ."
    proc = subprocess.run(
        [script, "verify", url, *opts, "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["bad_files"] == [f"{url}/{step_dir(2)}/{rel}"]
    assert report["steps"][1]["problems"][0]["kind"] == "crc32c"


def test_cli_s3_root_without_checkpoints_is_exit_2(s3: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["ls", s3.url("no-such-prefix"), *_options(s3)])
    _, err = capsys.readouterr()
    assert code == 2 and "not a checkpoint root" in err and len(err.strip().splitlines()) == 1
