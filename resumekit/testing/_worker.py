"""Entry point of the fresh processes that :func:`resumekit.testing.check_resume` starts."""

from __future__ import annotations

import json
import sys

from resumekit.testing.resume import _resolve, _segment

if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    _segment(_resolve(spec["make"]), _resolve(spec["train"]), spec["steps"], spec["resume"], spec["out"])
