"""The layering rule of design.md, kept true by walking imports: nothing under switch/core,
switch/domain or switch/crypto imports anyio, asyncio, socket, sqlite3, switch.pipeline,
switch.adapters or switch.issuers (relative imports resolved, ``from switch import x`` too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE_PACKAGES = ("switch/core", "switch/domain", "switch/crypto")
FORBIDDEN = (
    "anyio",
    "asyncio",
    "socket",
    "sqlite3",
    "switch.pipeline",
    "switch.adapters",
    "switch.issuers",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module name an ``import`` or ``from ... import`` in ``source`` can bind, absolute."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            found.add(target)
            # `from switch import pipeline` binds the submodule switch.pipeline
            found.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    return sorted(
        name
        for name in imported_modules(source, module, is_package)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)
    )


def pure_modules() -> list[Path]:
    return sorted(p for pkg in PURE_PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_the_walk_finds_the_core() -> None:
    names = {module_name(p) for p in pure_modules()}
    assert {"switch.core.framing", "switch.core.messages", "switch.core.transactions"} <= names


@pytest.mark.parametrize("path", pure_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_layers_import_no_io_and_no_outer_layer(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    found = violations(source, module_name(path), path.name == "__init__.py")
    assert not found, f"{path.relative_to(ROOT)} imports {found} (design.md: core/domain/crypto stay pure)"


# ---- the checker itself must be able to fail ----------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "import anyio",
        "import asyncio.events",
        "from socket import socket",
        "import sqlite3 as db",
        "from switch.pipeline import manager",
        "from switch import adapters",
        "import switch.issuers.wallet",
        "from ..pipeline import manager",
        "from .. import adapters",
        "def f() -> None:\n    import socket\n",
        "try:\n    import anyio\nexcept ImportError:\n    pass\n",
    ],
)
def test_checker_catches_forbidden_imports(source: str) -> None:
    assert violations(source, "switch.core.example")


@pytest.mark.parametrize(
    "source",
    [
        "import json",
        "from switch.core.codec import Codec",
        "from . import codec",
        "from .framing import Frame",
        "from ..domain import money",
        "from switch import ports",
        "import socketserver_lookalike",
        "from typing import TYPE_CHECKING",
    ],
)
def test_checker_allows_pure_imports(source: str) -> None:
    assert not violations(source, "switch.core.example")


def test_relative_import_in_a_package_init() -> None:
    assert violations("from ..adapters import tcp", "switch.core", is_package=True)
    assert not violations("from .codec import Codec", "switch.core", is_package=True)
