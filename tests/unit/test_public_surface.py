"""The public surface stays compatible: names, signatures, CLI options and ``--json`` shapes.

Compared with ``tests/fixtures/public_surface.json``. Additions pass (a new keyword with a default, a
new name, a new JSON key); a removal, a renamed or reordered positional parameter, a changed default,
a new required parameter, a removed option or a JSON key that changed type fails. After an intended,
reviewed break, regenerate (see ``tests/unit/_surface.py``) and say so in the commit message.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
from _surface import api_surface, cli_json_shapes, cli_options, incompatibilities

PINNED = Path(__file__).resolve().parent.parent / "fixtures" / "public_surface.json"
CHECKPOINT = Path(__file__).resolve().parent.parent / "fixtures" / "format-v1" / "root"


@pytest.fixture(scope="module")
def surface(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("surface") / "root"
    shutil.copytree(CHECKPOINT, root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        now = {"api": api_surface(), "cli": cli_options(), "cli_json": cli_json_shapes(root)}
    if os.environ.get("RESUMEKIT_UPDATE_SURFACE") == "1":
        PINNED.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    return now


@pytest.mark.parametrize("part", ["api", "cli", "cli_json"])
def test_public_surface_is_compatible(surface: dict[str, Any], part: str) -> None:
    pinned = json.loads(PINNED.read_text())[part]
    problems = incompatibilities(pinned, surface[part], part)
    assert not problems, "the public surface changed incompatibly:\n" + "\n".join(problems)


def test_the_check_catches_breaks() -> None:
    params = [{"name": "url", "kind": "POSITIONAL_OR_KEYWORD", "default": None, "required": True}]
    kw = {"name": "keep_last", "kind": "KEYWORD_ONLY", "default": "None", "required": False}
    assert incompatibilities({"f": params}, {"f": [*params, kw]}) == []  # an added option is fine
    assert incompatibilities({"f": [*params, kw]}, {"f": params}) != []  # a removed one is not
    changed = [{**kw, "default": "3"}]
    assert incompatibilities({"f": [*params, kw]}, {"f": [*params, *changed]}) != []
    required = [{**kw, "name": "new", "default": None, "required": True}]
    assert incompatibilities({"f": params}, {"f": [*params, *required]}) != []
    assert incompatibilities({"a": {"b": "int"}}, {"a": {"b": "str"}}) != []
    assert incompatibilities({"a": {"b": "int"}}, {"a": {}}) != []
