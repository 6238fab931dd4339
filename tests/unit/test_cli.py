"""The ``resumekit`` command line on real checkpoints written by :class:`resumekit.Checkpointer`.

Most cases call ``main(argv)`` in-process (fast); a few run the installed console script and
``python -m resumekit`` through subprocess, as a user would.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import resumekit as rk
from resumekit.cli import main
from resumekit.cli.access import parse_storage_options, split_target
from resumekit.cli.diff import max_abs_diff
from resumekit.format.layout import step_dir
from resumekit.format.manifest import FORMAT_VERSION, UNSHARDED_FORMAT_VERSION, seal

SCRIPT = shutil.which("resumekit", path=str(Path(sys.executable).parent))


def _model(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Steps 1 and 2 of one run: the weights, a counter, the config and the entries change between them."""
    root = tmp_path_factory.mktemp("cli") / "run"
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    progress = {"epoch": 1}
    state: dict[str, Any] = {"model": model, "optimizer": opt, "progress": progress, "rng": rk.RNGState()}
    rk.Checkpointer(root, config={"batch_size": 8, "lr": 0.1}).save(state, step=1)
    w1 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight[1, 2] += 0.375
    progress["epoch"] = 2
    state["extra"] = {"note": "added at step 2"}
    rk.Checkpointer(root, config={"batch_size": 16, "lr": 0.1}).save(state, step=2)
    return {"root": root, "w1": w1, "w2": model.weight.detach().clone(), "model": model}


@pytest.fixture
def root(source: dict[str, Any], tmp_path: Path) -> Path:
    """A private copy of the checkpoint root, free to damage."""
    dst = tmp_path / "run"
    shutil.copytree(source["root"], dst)
    return dst


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str], expect: int = 0) -> Any:
    code, out, err = run([*argv, "--json"], capsys)
    assert code == expect, err
    return json.loads(out)


def script(*args: str) -> subprocess.CompletedProcess[str]:
    if SCRIPT is None:
        pytest.fail(
            f"the resumekit console script is not installed in {Path(sys.executable).parent}: pip install -e ."
        )
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=120)


def _manifest(root: Path, step: int) -> dict[str, Any]:
    return json.loads((root / step_dir(step) / "manifest.json").read_text())


def _write_manifest(root: Path, step: int, d: dict[str, Any]) -> None:
    # Re-sealed: the manifest's self-checksum detects corruption, not deliberate edits.
    (root / step_dir(step) / "manifest.json").write_bytes(seal(d))


# -- ls ------------------------------------------------------------------------------------------------


def test_ls_lists_committed_incomplete_and_unreadable_steps_newest_last(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (root / step_dir(3)).mkdir()  # a folder without manifest: an object-store save that never committed
    (root / ".tmp-step-000000000004-0123456789abcdef").mkdir()  # a local save in progress
    bad = root / step_dir(5)
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")

    d = run_json(["ls", str(root)], capsys)
    assert d["url"] == str(root)
    assert [r["step"] for r in d["steps"]] == [1, 2, 3, 4, 5]
    by_step = {r["step"]: r for r in d["steps"]}
    m2 = _manifest(root, 2)
    assert by_step[2]["status"] == "ok"
    assert by_step[2]["bytes"] == sum(f["size"] for f in m2["files"].values())
    assert by_step[2]["files"] == len(m2["files"])
    assert by_step[2]["entries"] == sorted(m2["entries"])
    assert by_step[2]["world_size"] == 1 and by_step[2]["format_version"] == UNSHARDED_FORMAT_VERSION
    assert 0 <= by_step[2]["age_seconds"] < 3600
    assert by_step[3]["status"] == "incomplete" and by_step[3]["bytes"] is None
    assert by_step[4]["status"] == "incomplete" and by_step[4]["folder"].startswith(".tmp-")
    assert by_step[5]["status"] == "unreadable" and "not valid JSON" in by_step[5]["detail"]

    code, out, _ = run(["ls", str(root)], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split() == ["STEP", "FILES", "SIZE", "AGE", "WORLD", "ENTRIES", "STATUS"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert rows["3"].endswith("incomplete (no manifest)")
    assert "manifest unreadable:" in rows["5"]
    assert "model, optimizer, progress, rng" in rows["1"] and rows["1"].endswith("ok")


# -- inspect -------------------------------------------------------------------------------------------


def test_inspect_shows_manifest_entries_tensors_environment_and_config(
    root: Path, source: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    d = run_json(["inspect", str(root)], capsys)
    m = _manifest(root, 2)
    assert d["step"] == 2 and d["path"] == f"{root}/{step_dir(2)}"
    assert d["writer_id"] == m["writer_id"] and d["world_size"] == 1
    assert d["format_version"] == UNSHARDED_FORMAT_VERSION and d["created_unix"] == m["created_unix"]
    assert d["environment"] == m["environment"]
    assert d["config"] == {"batch_size": 16, "lr": 0.1}
    entries = {e["name"]: e for e in d["entries"]}
    assert set(entries) == set(m["entries"])
    assert (entries["rng"]["scope"], entries["progress"]["kind"]) == ("rank", "mapping")
    model_files = {f["path"]: f for f in entries["model"]["files"]}
    assert set(model_files) == {"model.json", "model.safetensors"}
    tensors = {t["name"]: t for t in model_files["model.safetensors"]["tensors"]}
    for name, t in source["model"].state_dict().items():
        assert tensors[name]["shape"] == list(t.shape)
        assert tensors[name]["dtype"] == str(t.dtype).removeprefix("torch.")
    assert [f["path"] for f in entries["rng"]["files"]] == [
        "rank-00000/rng.json",
        "rank-00000/rng.safetensors",
    ]

    older = run_json(["inspect", str(root), "--step", "1"], capsys)
    assert older["step"] == 1 and older["config"]["batch_size"] == 8
    assert "extra" not in {e["name"] for e in older["entries"]}

    code, out, _ = run(["inspect", f"{root}@1"], capsys)
    assert code == 0
    assert "weight  float32  [2, 3]" in out and "batch_size  8" in out


def test_inspect_reads_only_the_safetensors_header(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = root / step_dir(2) / "model.safetensors"
    raw = path.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    path.write_bytes(raw[:header_end])  # the tensor data is gone; only the header remains

    d = run_json(["inspect", str(root)], capsys)
    model = next(e for e in d["entries"] if e["name"] == "model")
    st = next(f for f in model["files"] if f["path"] == "model.safetensors")
    assert st["error"] is None and {t["name"] for t in st["tensors"]} == {"weight", "bias"}
    # verify, which reads everything, sees the truncation
    v = run_json(["verify", str(root), "--step", "2"], capsys, expect=1)
    assert [(p["file"], p["kind"]) for p in v["steps"][0]["problems"]] == [("model.safetensors", "size")]


# -- verify --------------------------------------------------------------------------------------------


def test_verify_names_every_bad_file_through_the_console_script(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    st = root / step_dir(2) / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[-1] ^= 0x01  # flip one bit of the last tensor byte
    st.write_bytes(bytes(raw))
    (root / step_dir(2) / "optimizer.json").unlink()
    rng = root / step_dir(1) / "rank-00000" / "rng.safetensors"
    rng.write_bytes(rng.read_bytes()[:-4])

    proc = script("verify", str(root), "--json")
    assert proc.returncode == 1, proc.stderr
    d = json.loads(proc.stdout)
    assert d["ok"] is False
    problems = {(s["step"], p["file"]): p["kind"] for s in d["steps"] for p in s["problems"]}
    assert problems == {
        (2, "model.safetensors"): "crc32c",
        (2, "optimizer.json"): "missing",
        (1, "rank-00000/rng.safetensors"): "size",
    }
    assert sorted(d["bad_files"]) == sorted([str(st), str(root / step_dir(2) / "optimizer.json"), str(rng)])

    code, out, _ = run(["verify", str(root), "--step", "2"], capsys)
    assert code == 1
    assert "step 2: FAILED" in out and "step 1" not in out
    assert str(st) in out and "crc32c" in out


def test_verify_reports_unparsable_header_and_hostile_manifest(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import crc32c

    # A header that is not JSON, with a matching checksum: the crc passes, the parse does not.
    st = root / step_dir(2) / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[8] = ord("!")
    st.write_bytes(bytes(raw))
    m = _manifest(root, 2)
    m["files"]["model.safetensors"]["crc32c"] = f"{crc32c.crc32c(bytes(raw)):08x}"
    _write_manifest(root, 2, m)
    # A manifest that points outside its step folder is refused, never followed.
    hostile = _manifest(root, 1)
    hostile["files"]["../../outside.json"] = {"size": 1, "crc32c": "00000000"}
    _write_manifest(root, 1, hostile)

    d = run_json(["verify", str(root)], capsys, expect=1)
    kinds = {(s["step"], p["file"]): p["kind"] for s in d["steps"] for p in s["problems"]}
    assert kinds == {(1, "manifest.json"): "manifest", (2, "model.safetensors"): "header"}
    assert "not a plain file name" in d["steps"][0]["problems"][0]["message"]

    code, _, err = run(["inspect", str(root), "--step", "1"], capsys)
    assert code == 2 and "not a plain file name" in err and len(err.strip().splitlines()) == 1

    # inspect still shows step 2, with the header problem on that one file
    d2 = run_json(["inspect", str(root), "--step", "2"], capsys)
    files = {f["path"]: f for e in d2["entries"] for f in e["files"]}
    assert files["model.safetensors"]["tensors"] is None
    assert "not valid JSON" in files["model.safetensors"]["error"]
    assert files["optimizer.safetensors"]["error"] is None
    code, out, _ = run(["inspect", str(root), "--step", "2"], capsys)
    assert code == 0 and "header unreadable:" in out


def test_verify_clean_checkpoint_passes(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = run_json(["verify", str(root)], capsys)
    assert d["ok"] is True and [s["step"] for s in d["steps"]] == [1, 2]
    assert all(s["files"] == len(_manifest(root, s["step"])["files"]) for s in d["steps"])
    code, out, _ = run(["verify", str(root)], capsys)
    assert code == 0 and "all 2 step(s) verified" in out


# -- diff ----------------------------------------------------------------------------------------------


def test_diff_reports_entries_tensors_values_and_config(
    root: Path, source: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    d = run_json(["diff", f"{root}@1", str(root)], capsys)
    assert (d["a"]["step"], d["b"]["step"]) == (1, 2)
    assert d["identical"] is False
    assert d["entries"]["added"] == ["extra"] and d["entries"]["removed"] == []
    changes = {(c["entry"], c["name"]): c for c in d["tensors"]["changes"]}
    expected = float((source["w2"].double() - source["w1"].double()).abs().max())
    assert changes[("model", "weight")]["max_abs_diff"] == pytest.approx(expected, rel=0, abs=0)
    assert changes[("model", "weight")]["a"] == {"dtype": "float32", "shape": [2, 3]}
    assert ("model", "bias") not in changes  # unchanged tensors are counted, not listed
    assert d["tensors"]["identical"] == d["tensors"]["compared"] - len(changes)
    assert {(v["entry"], v["key"], v["a"], v["b"]) for v in d["values"]} == {("progress", "epoch", 1, 2)}
    assert d["config"] == [{"key": "batch_size", "change": "changed", "a": 8, "b": 16}]
    assert d["environment"] == []

    same = run_json(["diff", f"{root}@2", f"{root}/{step_dir(2)}"], capsys)
    assert same["identical"] is True and same["tensors"]["changes"] == []
    code, _, _ = run(["diff", f"{root}@1", f"{root}@2", "--exit-code"], capsys)
    assert code == 1


def test_diff_table_through_the_console_script(root: Path, source: dict[str, Any]) -> None:
    proc = script("diff", f"{root}@1", f"{root}@2")
    assert proc.returncode == 0, proc.stderr
    expected = float((source["w2"].double() - source["w1"].double()).abs().max())
    row = next(line for line in proc.stdout.splitlines() if line.split()[:2] == ["model", "weight"])
    assert float(row.split()[-1]) == pytest.approx(expected, rel=1e-5)
    assert "entries: added ['extra']" in proc.stdout
    assert "batch_size  8  16" in proc.stdout


def test_diff_refuses_a_corrupted_file(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    st = root / step_dir(1) / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[-2] ^= 0xFF
    st.write_bytes(bytes(raw))
    code, _, err = run(["diff", f"{root}@1", f"{root}@2"], capsys)
    assert code == 2 and "model.safetensors" in err and "resumekit verify" in err


def test_max_abs_diff_semantics() -> None:
    a = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
    assert max_abs_diff(a, a.clone()) == 0.0
    b = torch.tensor([1.5, float("nan"), float("inf"), -2.0])
    assert max_abs_diff(a, b) == 0.5  # NaN vs NaN and inf vs inf count as equal
    assert math.isnan(max_abs_diff(a, torch.tensor([1.0, 0.0, float("inf"), -2.0])))
    assert max_abs_diff(torch.tensor([3, 9]), torch.tensor([3.0, 7.5], dtype=torch.float64)) == 1.5
    assert max_abs_diff(torch.tensor([True, False]), torch.tensor([True, True])) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        max_abs_diff(torch.zeros(2), torch.zeros(3))


# -- drift ---------------------------------------------------------------------------------------------


def test_drift_reports_an_altered_environment_and_config(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = _manifest(root, 2)
    m["environment"]["torch"] = "1.13.1"
    _write_manifest(root, 2, m)
    (root / "resume.json").write_text(json.dumps({"batch_size": 32, "lr": 0.1}))

    d = run_json(["drift", str(root), "--config", str(root / "resume.json")], capsys)
    items = {i["key"]: i for i in d["items"]}
    assert items["env.torch"]["saved"] == "1.13.1" and items["env.torch"]["current"] == torch.__version__
    assert (
        items["env.torch"]["severity"] == "warn" and "major version change" in items["env.torch"]["message"]
    )
    assert items["config.batch_size"]["saved"] == 16 and items["config.batch_size"]["current"] == 32
    assert "effective global batch 16x1x1=16 -> 32x1x1=32" in items["config.batch_size"]["message"]
    assert d["errors"] == 0 and d["ok"] is True and d["config_compared"] is True
    assert "env.world_size" not in items  # the saved world size is assumed unless --world-size is given

    strict = run_json(
        ["drift", str(root), "--policy", "env.torch=error", "--world-size", "4"], capsys, expect=1
    )
    keys = {i["key"]: i["severity"] for i in strict["items"]}
    assert keys == {"env.torch": "error", "env.world_size": "warn"}
    assert strict["ok"] is False and strict["config_compared"] is False

    older = run_json(["drift", str(root), "--step", "1"], capsys)
    assert older["items"] == []
    code, out, _ = run(["drift", str(root), "--policy", "env.torch=error"], capsys)
    assert code == 1
    assert out.splitlines()[1].startswith("config not compared")
    assert "error     env.torch  1.13.1" in out and "1 error(s), 0 warning(s), 0 ignored" in out


def test_drift_on_a_newer_format_fails_through_the_console_script(root: Path) -> None:
    m = _manifest(root, 2)
    m["format_version"] = FORMAT_VERSION + 1
    m["environment"]["torch"] = "9.0.0"
    _write_manifest(root, 2, m)
    proc = script("drift", str(root))
    assert proc.returncode == 1, proc.stderr
    assert "error     format" in proc.stdout
    assert "env.torch" in proc.stdout and "9.0.0" in proc.stdout
    assert "1 error(s)" in proc.stdout


# -- addressing, storage options and errors ------------------------------------------------------------


def test_step_addresses(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_json(["inspect", f"{root}/{step_dir(1)}"], capsys)["step"] == 1
    assert run_json(["inspect", f"{root}/{step_dir(1)}/"], capsys)["step"] == 1
    assert run_json(["ls", f"{root}@2"], capsys)["steps"][0]["step"] == 2
    code, _, err = run(["inspect", f"{root}@1", "--step", "2"], capsys)
    assert code == 2 and "--step" in err
    assert split_target("s3://b/run@12") == ("s3://b/run", 12)
    assert split_target("s3://user@host/run") == ("s3://user@host/run", None)


def test_fsspec_root_and_storage_options(capsys: pytest.CaptureFixture[str]) -> None:
    url = "memory://resumekit-cli-test/run"
    model = _model(1)
    ckpt = rk.Checkpointer(url, config={"batch_size": 4})
    ckpt.save({"model": model}, step=7)
    before = model.bias.detach().clone()
    with torch.no_grad():
        model.bias.add_(1.0)
    ckpt.save({"model": model}, step=8)
    expected = float((model.bias.detach().double() - before.double()).abs().max())
    try:
        opts = ["--storage-option", "skip_instance_cache=false"]
        d = run_json(["inspect", url, *opts], capsys)
        assert d["data_prefix"].startswith("w-")
        tensors = d["entries"][0]["files"][1]["tensors"]
        assert [t["name"] for t in tensors] == ["bias", "weight"]
        assert run_json(["verify", url], capsys)["ok"] is True
        changes = run_json(["diff", f"{url}@7", f"{url}@8"], capsys)["tensors"]["changes"]
        assert [(c["name"], c["max_abs_diff"]) for c in changes] == [("bias", expected)]
    finally:
        import fsspec

        fsspec.filesystem("memory").rm("/resumekit-cli-test", recursive=True)
    assert parse_storage_options(["anon=true", "n=3", "endpoint=http://127.0.0.1:9"]) == {
        "anon": True,
        "n": 3,
        "endpoint": "http://127.0.0.1:9",
    }


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["ls", "{tmp}/absent"], "does not exist"),
        (["inspect", "{tmp}/file.txt"], "is a file"),
        (["verify", "{tmp}"], "not a checkpoint root"),
        (["ls", "nosuchproto://bucket/run"], "Protocol not known"),
        (["inspect", "{root}", "--step", "99"], "step 99 is not a committed checkpoint"),
        (["drift", "{root}", "--policy", "torch=error"], "did you mean 'env.torch'"),
        (["ls", "{root}", "--storage-option", "novalue"], "KEY=VALUE"),
        (["drift", "{root}", "--config", "{tmp}/file.txt"], "not valid JSON"),
    ],
)
def test_errors_are_one_line_with_exit_2(
    argv: list[str], needle: str, root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file.txt").write_text("hello")
    code, out, err = run([a.format(tmp=tmp_path, root=root) for a in argv], capsys)
    assert code == 2 and out == ""
    assert needle in err and err.startswith("resumekit: error: ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_console_script_errors_and_python_m_help(tmp_path: Path) -> None:
    proc = script("ls", str(tmp_path / "absent"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr

    helped = subprocess.run(
        [sys.executable, "-m", "resumekit", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert helped.returncode == 0
    for command in ("ls", "inspect", "verify", "diff", "drift"):
        assert command in helped.stdout
    assert "URL@STEP" in helped.stdout
