"""Portal accounts and sessions over HTTP: login, wrong password, lockout after 5 failures for
15 minutes, logout, the session cookie's flags, CSRF refusals, and the password hash at rest."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import anyio
import httpx
import pytest

from switch.adapters.sqlite_store import SqliteStore
from switch.app import seed_demo
from switch.crypto.keystore import MasterKey
from switch.portal import accounts
from switch.portal.accounts import AccountError, hash_password, set_password, verify_password
from switch.portal.app import create_app
from switch.portal.auth import LOGIN_CSRF_COOKIE, SESSION_COOKIE
from switch.portal.demo import DEMO_PASSWORDS
from switch.portal.password_cli import main as password_main

from .conftest import M1, M2, MASTER, NOW, Clock, Portal, csrf_of

pytestmark = pytest.mark.anyio


def set_cookie_header(response: httpx.Response, name: str) -> str:
    found = [h for h in response.headers.get_list("set-cookie") if h.startswith(name + "=")]
    assert len(found) == 1, response.headers.get_list("set-cookie")
    return found[0]


async def test_login_ok_redirects_and_sets_a_server_side_session(portal: Portal) -> None:
    r = await portal.login(M1)
    assert r.status_code == 303 and r.headers["location"] == "/"
    header = set_cookie_header(r, SESSION_COOKIE)
    flags = [part.strip().lower() for part in header.split(";")]
    assert "httponly" in flags and "samesite=lax" in flags and "path=/" in flags
    assert "secure" not in flags
    session_id = header.split(";")[0].split("=", 1)[1]
    rows = portal.store.query("SELECT * FROM portal_sessions")
    assert [row["mid"] for row in rows] == [M1]
    # only the SHA-256 of the id is stored
    assert rows[0]["id_hash"] == hashlib.sha256(session_id.encode()).hexdigest()
    assert session_id not in str(rows[0])
    page = await portal.client.get("/")
    assert page.status_code == 200 and "老王便利店" in page.text


async def test_secure_cookies_mark_the_session_cookie_secure(seeded_store: SqliteStore) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(seeded_store.run_writer)
        app = create_app(seeded_store, secure_cookies=True, clock=Clock(NOW))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="https://portal.test") as client:
            page = await client.get("/login")
            assert "secure" in set_cookie_header(page, LOGIN_CSRF_COOKIE).lower()
            r = await client.post("/login", data={"mid": M2, "password": DEMO_PASSWORDS[M2],
                                                  "csrf": csrf_of(page.text)})
            assert r.status_code == 303
            flags = [p.strip().lower() for p in set_cookie_header(r, SESSION_COOKIE).split(";")]
            assert "secure" in flags and "httponly" in flags and "samesite=lax" in flags
        tg.cancel_scope.cancel()


async def test_wrong_password_and_unknown_mid_get_the_same_refusal(portal: Portal) -> None:
    wrong = await portal.login(M1, "not-the-password")
    page = await portal.client.get("/login")
    nobody = await portal.client.post("/login", data={"mid": "898999999999999", "password": "whatever-1",
                                                      "csrf": csrf_of(page.text)})
    for r in (wrong, nobody):
        assert r.status_code == 401
        assert "商户号或密码错误" in r.text
        assert SESSION_COOKIE not in r.headers.get("set-cookie", "").split("=")[0]
    assert portal.store.query("SELECT COUNT(*) AS n FROM portal_sessions")[0]["n"] == 0
    assert (await portal.client.get("/")).status_code == 303
    row = portal.store.query("SELECT failed_count FROM portal_accounts WHERE mid = ?", (M1,))[0]
    assert row["failed_count"] == 1


async def test_lockout_after_five_failures_for_fifteen_minutes(portal: Portal) -> None:
    for attempt in range(1, 5):
        r = await portal.login(M1, f"wrong-{attempt}")
        assert r.status_code == 401, attempt
    fifth = await portal.login(M1, "wrong-5")
    assert fifth.status_code == 429 and "已锁定" in fifth.text
    # the right password does not open a locked account
    locked = await portal.login(M1)
    assert locked.status_code == 429
    assert (await portal.client.get("/")).status_code == 303
    # another merchant is not affected
    assert (await portal.login(M2)).status_code == 303
    await portal.client.post("/logout", data={"csrf": await portal.csrf("/")})
    portal.clock.now += accounts.LOCKOUT_SECONDS - 1
    assert (await portal.login(M1)).status_code == 429
    portal.clock.now += 2
    ok = await portal.login(M1)
    assert ok.status_code == 303
    row = portal.store.query("SELECT failed_count, locked_until FROM portal_accounts WHERE mid = ?", (M1,))[0]
    assert row["failed_count"] == 0 and row["locked_until"] is None


async def test_an_unknown_mid_locks_like_an_account(portal: Portal) -> None:
    """Five failures lock a MID without a portal account exactly as they lock one with an account
    (429, the same text, for fifteen minutes), so the lockout does not tell them apart; a
    malformed MID is nobody's and never locks."""
    async def attempt(mid: str) -> int:
        page = await portal.client.get("/login")
        r = await portal.client.post("/login", data={"mid": mid, "password": "whatever-1",
                                                      "csrf": csrf_of(page.text)})
        return r.status_code

    nobody = "898999999999999"
    assert [await attempt(nobody) for _ in range(6)] == [401, 401, 401, 401, 429, 429]
    assert [await attempt("12345") for _ in range(6)] == [401] * 6
    portal.clock.now += accounts.LOCKOUT_SECONDS + 1
    assert await attempt(nobody) == 401
    assert (await portal.login(M1)).status_code == 303  # accounts are not affected


def test_unknown_mids_are_remembered_in_bounded_memory() -> None:
    unknown = accounts.UnknownMids(size=3)
    for i in range(10):
        for _ in range(accounts.MAX_FAILURES):
            result = unknown.failed(f"89899999999999{i}", 1_000.0)
        assert result.locked_until == 1_000.0 + accounts.LOCKOUT_SECONDS
    assert len(unknown._entries) == 3  # the oldest forgotten first
    assert unknown.locked_until("898999999999999", 1_001.0) is not None
    assert unknown.locked_until("898999999999990", 1_001.0) is None


async def test_a_success_resets_the_failure_count(portal: Portal) -> None:
    for attempt in range(4):
        assert (await portal.login(M1, f"wrong-{attempt}")).status_code == 401
    assert (await portal.login(M1)).status_code == 303
    for attempt in range(4):
        assert (await portal.login(M1, f"wrong-again-{attempt}")).status_code == 401
    assert (await portal.login(M1)).status_code == 303


async def test_logout_ends_the_session(portal: Portal) -> None:
    r = await portal.login(M1)
    session_id = set_cookie_header(r, SESSION_COOKIE).split(";")[0].split("=", 1)[1]
    token = await portal.csrf("/")
    out = await portal.client.post("/logout", data={"csrf": token})
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert portal.store.query("SELECT COUNT(*) AS n FROM portal_sessions")[0]["n"] == 0
    assert (await portal.client.get("/")).status_code == 303
    # replaying the old cookie does not bring the session back
    portal.client.cookies.set(SESSION_COOKIE, session_id)
    again = await portal.client.get("/history")
    assert again.status_code == 303 and again.headers["location"] == "/login"
    assert (await portal.client.get("/api/today")).status_code == 401


async def test_sessions_expire(portal: Portal) -> None:
    assert (await portal.login(M1)).status_code == 303
    assert (await portal.client.get("/")).status_code == 200
    portal.clock.now += 8 * 3600 + 1
    assert (await portal.client.get("/")).status_code == 303


async def test_posts_without_a_valid_csrf_token_are_refused(portal: Portal) -> None:
    # login form: the token must match the login cookie
    await portal.client.get("/login")
    r = await portal.client.post("/login", data={"mid": M1, "password": DEMO_PASSWORDS[M1], "csrf": "forged"})
    assert r.status_code == 403
    portal.client.cookies.delete(LOGIN_CSRF_COOKIE, path="/login")
    r = await portal.client.post("/login", data={"mid": M1, "password": DEMO_PASSWORDS[M1]})
    assert r.status_code == 403
    assert portal.store.query("SELECT COUNT(*) AS n FROM portal_sessions")[0]["n"] == 0

    assert (await portal.login(M1)).status_code == 303
    assert (await portal.client.post("/logout", data={})).status_code == 403
    assert (await portal.client.post("/logout", data={"csrf": "x" * 43})).status_code == 403
    assert (await portal.client.get("/")).status_code == 200  # still logged in
    r = await portal.client.post("/notifications/webhook", data={"url": "http://127.0.0.1:1/hook"})
    assert r.status_code == 403
    r = await portal.client.post("/notifications/test", data={"csrf": ""})
    assert r.status_code == 403
    url = portal.store.query("SELECT webhook_url FROM merchants WHERE mid = ?", (M1,))[0]["webhook_url"]
    assert url is None
    # another session's token is not this session's token
    other_token = await portal.csrf("/")
    assert (await portal.login(M1)).status_code == 303  # a new session, a new token
    assert (await portal.client.post("/logout", data={"csrf": other_token})).status_code == 403


async def test_security_headers(portal: Portal) -> None:
    page = await portal.client.get("/login")
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    css = await portal.client.get("/static/portal.css")
    assert css.status_code == 200 and "text/css" in css.headers["content-type"]


# ---- the hash at rest ---------------------------------------------------------------------------
def test_scrypt_hashes_are_salted_and_verify_in_constant_form() -> None:
    a, b = hash_password("correct horse"), hash_password("correct horse")
    assert a != b  # a random salt each time
    scheme, n, r, p, salt, digest = a.split("$")
    assert (scheme, n, r, p) == ("scrypt", str(2**14), "8", "1")
    assert verify_password("correct horse", a) and verify_password("correct horse", b)
    assert not verify_password("correct horsE", a)
    assert not verify_password("correct horse", "plain:correct horse")
    fixed = hash_password("pw-123456", salt=b"\x00" * 16)
    expected = hashlib.scrypt(b"pw-123456", salt=b"\x00" * 16, n=2**14, r=8, p=1, dklen=32)
    import base64

    assert fixed.split("$")[5] == base64.b64encode(expected).decode()


def test_set_password_stores_no_plain_text(seeded_store: SqliteStore, tmp_path: Path) -> None:
    password = "Pl41nTextMustNotLeak"
    set_password(seeded_store, M1, password)
    row = seeded_store.query("SELECT * FROM portal_accounts WHERE mid = ?", (M1,))[0]
    assert row["password_hash"].startswith("scrypt$") and verify_password(password, row["password_hash"])
    blobs = b"".join(p.read_bytes() for p in tmp_path.glob("switch.db*"))
    assert len(blobs) > 0 and password.encode() not in blobs
    with pytest.raises(AccountError):
        set_password(seeded_store, M1, "short")
    with pytest.raises(AccountError):
        set_password(seeded_store, "898000000000000", "long-enough-1")


def test_password_cli_reads_stdin_or_the_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    key = MasterKey.create_file(data_dir / "master.key")
    monkeypatch.delenv("SWITCH_MASTER_KEY", raising=False)
    store = SqliteStore(data_dir / "switch.db", key)
    store.open()
    seed_demo(store)
    store.close()

    monkeypatch.setattr("sys.stdin", io.StringIO("from-stdin-123\n"))
    assert password_main([M1, "--data-dir", str(data_dir)]) == 0
    assert password_main([M2, "--data-dir", str(data_dir), "--password", "from-option-456"]) == 0
    out = capsys.readouterr()
    assert "from-stdin-123" not in out.out + out.err and "from-option-456" not in out.out + out.err
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert password_main([M1, "--data-dir", str(data_dir)]) == 2
    assert password_main(["898000000000000", "--data-dir", str(data_dir), "--password", "x" * 10]) == 2
    assert password_main([M1, "--data-dir", str(tmp_path / "none"), "--password", "x" * 10]) == 2
    store = SqliteStore(data_dir / "switch.db", key)
    store.open()
    try:
        hashes = {r["mid"]: r["password_hash"] for r in store.query("SELECT * FROM portal_accounts")}
    finally:
        store.close()
    assert verify_password("from-stdin-123", hashes[M1])
    assert verify_password("from-option-456", hashes[M2])
