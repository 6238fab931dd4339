"""Every ```python block in README.md and docs/*.md runs as written.

Blocks of one page run in order, in one namespace, in a fresh working directory, so a page reads like
a session. A block preceded by a line ``<!-- not-run: reason -->`` is skipped (used only for commands
that need several processes or a GPU; the reason is shown).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(<!-- not-run: [^>]*-->\s*\n)?```python\n(.*?)```", re.S)


def _blocks(page: Path) -> list[str]:
    return [code for skip, code in _BLOCK.findall(page.read_text()) if not skip]


@pytest.mark.parametrize("page", [p for p in PAGES if p.exists()], ids=lambda p: p.name)
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    blocks = _blocks(page)
    if not blocks:
        pytest.skip(f"{page.name} has no python examples")
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(blocks))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{page.name} examples failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
