"""Layer rule (design.md): switch/crypto imports no I/O framework and nothing from the outer layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CRYPTO_DIR = Path(__file__).resolve().parents[2] / "switch" / "crypto"
FORBIDDEN = ("anyio", "asyncio", "trio", "socket", "socketserver", "switch.pipeline",
             "switch.adapters")


def imported_modules(source: str, package: str) -> set[str]:
    """Absolute names of every module imported by ``source`` living in ``package``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def violations(names: set[str]) -> set[str]:
    return {n for n in names for bad in FORBIDDEN if n == bad or n.startswith(bad + ".")}


def test_walker_catches_forbidden_imports() -> None:
    source = (
        "import anyio\nimport socket as s\nfrom switch.adapters import tcp\n"
        "from ..pipeline import manager\nfrom . import des\nimport socketserver\n"
        "from switch import pipeline\n"
    )
    found = violations(imported_modules(source, "switch.crypto"))
    assert found == {"anyio", "socket", "switch.adapters", "switch.adapters.tcp",
                     "switch.pipeline", "switch.pipeline.manager", "socketserver"}


def test_walker_allows_similar_names() -> None:
    assert not violations(imported_modules("import socketlib\nimport anyio_x\n", "switch.crypto"))


def test_crypto_modules_exist() -> None:
    assert {p.name for p in CRYPTO_DIR.glob("*.py")} >= {
        "des.py", "working_keys.py", "mac.py", "pin.py", "track.py", "keystore.py",
        "activation.py",
    }


@pytest.mark.parametrize("path", sorted(CRYPTO_DIR.glob("*.py")), ids=lambda p: p.name)
def test_crypto_module_imports_nothing_forbidden(path: Path) -> None:
    assert violations(imported_modules(path.read_text(), "switch.crypto")) == set()
