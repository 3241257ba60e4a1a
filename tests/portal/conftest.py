"""Fixtures of the portal tests: a real SQLite store in tmp_path seeded with the demo fixture, its
group-commit writer running, the portal app over it behind httpx's ASGI transport, and a clock
the tests move (the lockout runs on it)."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from switch.adapters.sqlite_store import JournalEntry, SqliteStore
from switch.app import seed_demo
from switch.crypto.keystore import MasterKey
from switch.portal.app import create_app
from switch.portal.auth import SESSION_COOKIE
from switch.portal.demo import DEMO_PASSWORDS, seed_portal_accounts

MASTER = MasterKey.from_hex("5a" * 32)
M1, M2 = "898310048990001", "898310058120002"
# 2025-03-15 12:00 in Shanghai: the portal's "today" is 20250315
NOW = datetime(2025, 3, 15, 4, 0, tzinfo=timezone.utc).timestamp()
TODAY = "20250315"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Portal:
    store: SqliteStore
    client: httpx.AsyncClient
    clock: Clock
    path: Path

    async def login(self, mid: str = M1, password: str | None = None) -> httpx.Response:
        self.client.cookies.delete(SESSION_COOKIE)  # GET /login with a live session redirects to /
        page = await self.client.get("/login")
        token = csrf_of(page.text)
        return await self.client.post(
            "/login", data={"mid": mid, "password": DEMO_PASSWORDS[mid] if password is None else password,
                            "csrf": token},
        )

    async def csrf(self, path: str = "/notifications") -> str:
        return csrf_of((await self.client.get(path)).text)

    async def journal(self, **fields: Any) -> int:
        """Commit one journal row through the writer; returns its id."""
        stan = fields.pop("stan", None) or f"{await self._next_stan():06d}"
        tid = fields.pop("tid", "10000001")
        mid = fields.pop("mid", M1 if tid.startswith("1") else M2)
        txn = fields.pop("txn", "consume")
        rc = fields.pop("response_code", "00")
        values: dict[str, Any] = dict(
            created_at=fields.pop("created_at", datetime.fromtimestamp(self.clock.now, timezone.utc).isoformat()),
            business_date=fields.pop("business_date", TODAY), tid=tid, mid=mid,
            mti=fields.pop("mti", "0200"), txn=txn, response_code=rc, stan=stan, batch="000001",
            rrn=fields.pop("rrn", f"{int(stan):012d}"), currency="156",
            state=fields.pop("state", ("approved" if rc == "00" else "declined")),
            dup_key=fields.pop("dup_key", f"{tid}|000001|{stan}|0200"),
        )
        values.update(fields)
        await self.store.write(self.store.op_journal(JournalEntry(**values)))
        return int(self.store.query("SELECT MAX(id) AS id FROM journal")[0]["id"])

    async def sql(self, statement: str, params: tuple[Any, ...] = ()) -> None:
        """Commit one SQL statement through the writer (the writer owns the write connection)."""

        def op(db: sqlite3.Connection) -> None:
            db.execute(statement, params)

        await self.store.write(op)

    async def _next_stan(self) -> int:
        return int(self.store.query("SELECT COUNT(*) AS n FROM journal")[0]["n"]) + 1


def csrf_of(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m is not None, "no CSRF token in the page"
    return m.group(1)


@pytest.fixture
def seeded_store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "switch.db", MASTER)
    store.open()
    seed_demo(store)
    assert sorted(seed_portal_accounts(store)) == [M1, M2]
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
async def portal(seeded_store: SqliteStore, tmp_path: Path) -> AsyncIterator[Portal]:
    clock = Clock(NOW)
    async with anyio.create_task_group() as tg:
        await tg.start(seeded_store.run_writer)
        app = create_app(seeded_store, clock=clock)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://portal.test") as client:
            yield Portal(seeded_store, client, clock, tmp_path)
        tg.cancel_scope.cancel()
