"""ResumeKitCheckpointIO on S3 (moto on loopback): Lightning's save / overwrite / load / remove cycle."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("lightning")
pytest.importorskip("s3fs")
pytest.importorskip("moto")

import torch

from resumekit_lightning import ResumeKitCheckpointIO

pytestmark = [pytest.mark.lightning, pytest.mark.s3]


def test_save_over_load_and_remove_on_s3(s3: Any, unique_prefix: Any) -> None:
    io = ResumeKitCheckpointIO(storage_options=s3.storage_options, config={"batch_size": 2})
    url = s3.url(unique_prefix("lightning"), "last.ckpt")
    for step in (3, 3, 5):  # saved over, once at the same global step
        io.save_checkpoint({"global_step": step, "state_dict": {"w": torch.full((2,), float(step))}}, url)
    fs = s3.filesystem()
    steps = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url.removeprefix("s3://")))
    assert steps == [f"step-{5:012d}"]
    back = io.load_checkpoint(url)
    assert back["global_step"] == 5 and torch.equal(back["state_dict"]["w"], torch.full((2,), 5.0))
    assert io.last_restore is not None and io.last_restore.config == {"batch_size": 2}
    io.remove_checkpoint(url)
    assert not s3.filesystem().exists(url.removeprefix("s3://"))
