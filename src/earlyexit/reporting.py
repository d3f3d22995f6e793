"""Writing results: JSON written atomically, so a crash never leaves a half-written file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from earlyexit.paths import atomic_file


def write_json(result: dict[str, Any], path: str | Path) -> None:
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
