"""`fromfeedback.json` beside each saved model: which stage wrote it and the token budgets it used."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FILENAME = "fromfeedback.json"


def write(model_dir: str | Path, **info: Any) -> None:
    (Path(model_dir) / FILENAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def read(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / FILENAME
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
