"""Network faults between the Checkpointer and S3 (moto), injected by the fault proxy.

Every test saves and restores through the public Checkpointer, with the proxy in front of the server
and one request-level retry layer (botocore's, 4 attempts). What must hold:

- transient faults inside the retry budget end in a checkpoint that verifies, bit for bit;
- persistent ones end in a clean StorageError, with nothing visible and earlier checkpoints intact;
- a commit whose answer was lost ends in exactly one committed checkpoint;
- a body corrupted in transit is a checksum failure and a fallback; a body cut short is re-read.
"""

from __future__ import annotations

import json
import re

import pytest

import resumekit as rk
from resumekit.errors import StorageError

try:
    from ._backends import assert_restored, make_state, snapshot, step_dir
    from .fault_proxy import Fault, FaultProxy
    from .servers import S3Endpoint
except ImportError:
    from _backends import assert_restored, make_state, snapshot, step_dir  # type: ignore[no-redef]
    from fault_proxy import Fault, FaultProxy  # type: ignore[no-redef]
    from servers import S3Endpoint  # type: ignore[no-redef]

pytestmark = pytest.mark.s3


def _file(step: int, name: str) -> str:
    """Proxy path regex for one data object of ``step`` (inside its writer's folder)."""
    return rf"/{step_dir(step)}/w-[0-9a-f]{{16}}/{re.escape(name)}$"


def _manifest(step: int) -> str:
    return rf"/{step_dir(step)}/manifest\.json$"


@pytest.fixture
def through_proxy(proxied_s3: S3Endpoint, s3_root: str) -> rk.Checkpointer:
    """A Checkpointer whose every request crosses the fault proxy."""
    return rk.Checkpointer(f"s3://{s3_root}", storage_options=proxied_s3.storage_options)


def _two_attempts(proxied_s3: S3Endpoint, s3_root: str) -> rk.Checkpointer:
    """Through the proxy with a budget of 2 attempts: botocore's backoff stays short for persistent faults."""
    options = dict(proxied_s3.storage_options)
    options["config_kwargs"] = {
        **options["config_kwargs"],
        "retries": {"mode": "standard", "total_max_attempts": 2},
    }
    return rk.Checkpointer(f"s3://{s3_root}", storage_options=options)


@pytest.fixture
def direct(s3_server: S3Endpoint, s3_root: str) -> rk.Checkpointer:
    """A Checkpointer on the same prefix that talks to the server directly (the ground truth)."""
    return rk.Checkpointer(f"s3://{s3_root}", storage_options=s3_server.storage_options)


def _objects(s3_server: S3Endpoint, s3_root: str, step: int) -> list[str]:
    fs = s3_server.filesystem()
    try:
        return sorted(p.split(f"{step_dir(step)}/", 1)[1] for p in fs.find(f"{s3_root}/{step_dir(step)}"))
    except FileNotFoundError:
        return []


def _assert_clean_commit(s3_server: S3Endpoint, s3_root: str, step: int) -> None:
    """The step holds its manifest and exactly the files it lists: no second writer folder, no debris."""
    fs = s3_server.filesystem()
    manifest = json.loads(fs.cat_file(f"{s3_root}/{step_dir(step)}/manifest.json"))
    assert _objects(s3_server, s3_root, step) == sorted([*manifest["files"], "manifest.json"])


def test_transient_save_faults_inside_the_budget_end_in_a_verified_checkpoint(
    through_proxy: rk.Checkpointer,
    direct: rk.Checkpointer,
    fault_proxy: FaultProxy,
    s3_server: S3Endpoint,
    s3_root: str,
) -> None:
    faults = [
        fault_proxy.add(
            Fault("status", method="PUT", path=_file(1, "model.safetensors"), status=503, count=2)
        ),
        fault_proxy.add(Fault("status", method="PUT", path=_file(1, "model.json"), status=429)),
        fault_proxy.add(Fault("reset_before", method="PUT", path=_file(1, "optimizer.safetensors"))),
        fault_proxy.add(Fault("delay", method="PUT", path=_file(1, "extra.json"), delay=0.5)),
        fault_proxy.add(Fault("status", method="PUT", path=_manifest(1), status=500)),
        fault_proxy.add(Fault("reset_before", method="PUT", path=_manifest(1))),
    ]
    state = make_state(1)
    expected = snapshot(state)
    through_proxy.save(state, step=1)
    assert [f.hits for f in faults] == [2, 1, 1, 1, 1, 1]
    # The manifest PUT was tried three times: 500, reset, then stored (create-only, no 412 seen).
    assert [r.status for r in fault_proxy.log if re.search(_manifest(1), r.target) and r.method == "PUT"][
        -1
    ] == 200
    assert direct.steps() == [1]
    _assert_clean_commit(s3_server, s3_root, 1)
    target = make_state(0)
    result = direct.restore(target)
    assert result is not None and result.step == 1 and result.skipped == ()
    assert_restored(expected, target)


def test_transient_restore_faults_and_a_truncated_body_are_retried(
    through_proxy: rk.Checkpointer, direct: rk.Checkpointer, fault_proxy: FaultProxy
) -> None:
    state = make_state(1)
    expected = snapshot(state)
    direct.save(state, step=1)
    faults = [
        fault_proxy.add(Fault("status", method="GET", path=_file(1, "model.safetensors"), status=503)),
        fault_proxy.add(Fault("reset_before", method="GET", path=_file(1, "optimizer.safetensors"))),
        fault_proxy.add(Fault("truncate", method="GET", path=_file(1, "extra.safetensors"))),
        fault_proxy.add(Fault("status", method="GET", path=r"list-type=2", status=500)),  # discovery
    ]
    target = make_state(0)
    result = through_proxy.restore(target)
    assert [f.hits for f in faults] == [1, 1, 1, 1]
    assert result is not None and result.step == 1 and result.skipped == ()
    assert_restored(expected, target)
    # The body cut short was read again: one short answer, then one whole.
    statuses = [
        r.status
        for r in fault_proxy.log
        if r.method == "GET" and re.search(_file(1, "extra.safetensors"), r.target)
    ]
    assert statuses == [206, 206]


def test_a_truncated_manifest_body_is_retried(
    through_proxy: rk.Checkpointer, direct: rk.Checkpointer, fault_proxy: FaultProxy
) -> None:
    state = make_state(1)
    expected = snapshot(state)
    direct.save(state, step=1)
    fault_proxy.add(Fault("truncate", method="GET", path=_manifest(1)))
    target = make_state(0)
    result = through_proxy.restore(target)
    assert result is not None and result.step == 1 and result.skipped == ()
    assert_restored(expected, target)


@pytest.mark.parametrize(
    ("fault", "max_hits"),
    [
        (Fault("status", method="PUT", path=_file(2, "optimizer.safetensors"), status=503, count=None), 2),
        # aiohttp re-sends once on a reset pooled connection, so each of botocore's attempts may show twice.
        (Fault("reset_before", method="PUT", path=_manifest(2), count=None), 4),
    ],
    ids=["503-on-data", "reset-on-manifest"],
)
def test_persistent_fault_is_a_clean_storage_error_with_nothing_visible(
    fault: Fault,
    max_hits: int,
    proxied_s3: S3Endpoint,
    direct: rk.Checkpointer,
    fault_proxy: FaultProxy,
    s3_server: S3Endpoint,
    s3_root: str,
) -> None:
    through_proxy = _two_attempts(proxied_s3, s3_root)
    first = make_state(1)
    expected = snapshot(first)
    direct.save(first, step=1)
    fault_proxy.add(fault)
    with pytest.raises(StorageError) as info:
        through_proxy.save(make_state(2), step=2)
    assert 2 <= fault.hits <= max_hits  # botocore's 2 attempts; no second retry layer multiplies them
    message = str(info.value)
    assert step_dir(2) in message and "failed" in message
    assert info.value.errno is not None
    fault_proxy.clear()
    assert direct.steps() == [1]
    assert _objects(s3_server, s3_root, 2) == []  # the aborted save removed its data
    target = make_state(0)
    result = direct.restore(target)
    assert result is not None and result.step == 1 and result.skipped == ()
    assert_restored(expected, target)
    through_proxy.save(make_state(2), step=2)  # the store is back: the same step now commits
    assert direct.steps() == [1, 2]


def test_persistently_lost_commit_answers_never_leave_a_broken_checkpoint(
    proxied_s3: S3Endpoint, s3_root: str, direct: rk.Checkpointer, fault_proxy: FaultProxy
) -> None:
    through_proxy = _two_attempts(proxied_s3, s3_root)
    direct.save(make_state(1), step=1)
    fault_proxy.add(Fault("reset_after", method="PUT", path=_manifest(2), count=None))
    second = make_state(2)
    expected = snapshot(second)
    try:
        through_proxy.save(second, step=2)
        committed = True
    except StorageError:
        committed = False  # acceptable, if nothing became visible
    fault_proxy.clear()
    if not committed:
        assert direct.steps() == [1]
    target = make_state(0)
    result = direct.restore(target)
    # Either outcome must leave only checkpoints that verify.
    assert result is not None and result.skipped == ()
    if direct.steps() == [1, 2]:
        assert result.step == 2
        assert_restored(expected, target)


def test_lost_commit_response_ends_in_exactly_one_committed_checkpoint(
    through_proxy: rk.Checkpointer,
    direct: rk.Checkpointer,
    fault_proxy: FaultProxy,
    s3_server: S3Endpoint,
    s3_root: str,
) -> None:
    fault_proxy.add(Fault("reset_after", method="PUT", path=_manifest(1)))
    state = make_state(1)
    expected = snapshot(state)
    info = through_proxy.save(state, step=1)  # stored, answer lost, re-sent: 412, read back, ours
    assert info.step == 1
    assert [r.status for r in fault_proxy.log if r.method == "PUT" and re.search(_manifest(1), r.target)] == [
        None,
        412,
    ]
    assert direct.steps() == [1]
    _assert_clean_commit(s3_server, s3_root, 1)
    target = make_state(0)
    result = direct.restore(target)
    assert result is not None and result.step == 1 and result.skipped == ()
    assert_restored(expected, target)
    with pytest.raises(rk.ResumeKitError, match="already exists"):
        through_proxy.save(make_state(1), step=1)


def test_corrupted_body_is_a_checksum_failure_and_a_fallback(
    through_proxy: rk.Checkpointer, direct: rk.Checkpointer, fault_proxy: FaultProxy
) -> None:
    older = make_state(1)
    expected = snapshot(older)
    direct.save(older, step=1)
    direct.save(make_state(2), step=2)
    # Every read of step 2's model data is corrupted in transit: re-reading cannot help.
    flip = fault_proxy.add(Fault("flip_byte", method="GET", path=_file(2, "model.safetensors"), count=None))
    target = make_state(0)
    with pytest.warns(UserWarning, match=r"step 2 .*failed verification") as warned:
        result = through_proxy.restore(target)
    assert flip.hits >= 1
    assert any("model.safetensors" in str(w.message) for w in warned)
    assert result is not None and result.step == 1
    assert [s for s, _ in result.skipped] == [2]
    assert_restored(expected, target)


def test_corrupted_body_is_caught_by_resumekits_own_checksum(
    proxied_s3: S3Endpoint, s3_root: str, direct: rk.Checkpointer, fault_proxy: FaultProxy
) -> None:
    # With botocore's response checksums off (the default before botocore 1.36, and what many
    # S3-compatible stores need), nothing but the manifest's crc32c stands between a flipped byte and
    # the model: it must be caught, named, and skipped for the previous checkpoint.
    options = dict(proxied_s3.storage_options)
    options["config_kwargs"] = {**options["config_kwargs"], "response_checksum_validation": "when_required"}
    reader = rk.Checkpointer(f"s3://{s3_root}", storage_options=options)
    older = make_state(1)
    expected = snapshot(older)
    direct.save(older, step=1)
    direct.save(make_state(2), step=2)
    flip = fault_proxy.add(Fault("flip_byte", method="GET", path=_file(2, "model.safetensors"), count=None))
    target = make_state(0)
    with pytest.warns(UserWarning, match=r"step 2 .*crc32c [0-9a-f]{8} does not match") as warned:
        result = reader.restore(target)
    assert flip.hits == 1
    assert any("model.safetensors" in str(w.message) for w in warned)
    assert result is not None and result.step == 1
    assert [s for s, _ in result.skipped] == [2]
    assert_restored(expected, target)


def test_persistent_read_fault_is_an_error_not_a_rewind(
    proxied_s3: S3Endpoint, s3_root: str, direct: rk.Checkpointer, fault_proxy: FaultProxy
) -> None:
    reader = _two_attempts(proxied_s3, s3_root)
    direct.save(make_state(1), step=1)
    direct.save(make_state(2), step=2)
    fault_proxy.add(Fault("status", method="GET", path=_file(2, "model.safetensors"), status=503, count=None))
    with pytest.raises(StorageError, match=r"model\.safetensors"):
        reader.restore(make_state(0))


def test_a_persistent_read_fault_costs_only_one_retry_layer(
    proxied_s3: S3Endpoint, s3_root: str, direct: rk.Checkpointer, fault_proxy: FaultProxy
) -> None:
    reader = _two_attempts(proxied_s3, s3_root)
    direct.save(make_state(1), step=1)
    fault = fault_proxy.add(
        Fault("status", method="GET", path=_file(1, "model.safetensors"), status=503, count=None)
    )
    with pytest.raises(rk.ResumeKitError):
        reader.restore(make_state(0))
    assert fault.hits == 2  # botocore's budget, not multiplied
