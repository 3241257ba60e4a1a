"""Loads the golden vectors (../shared/vectors.json) the crypto tests check byte for byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VECTORS_PATH = Path(__file__).resolve().parents[3] / "shared" / "vectors.json"
VECTORS: dict[str, dict[str, Any]] = {
    v["name"]: v for v in json.loads(VECTORS_PATH.read_text())["vectors"]
}


def h(text: str) -> bytes:
    return bytes.fromhex(text)
