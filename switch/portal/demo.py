"""Portal passwords of the demo fixture's merchants (protocol §14): test credentials, printed by
``make run`` so a newcomer can log in.

Owns: ``DEMO_PASSWORDS`` and seeding them. Must not be used outside the demo (these passwords
are public).
"""

from __future__ import annotations

from switch.adapters.sqlite_store import SqliteStore
from switch.portal.accounts import ensure_schema, set_password

DEMO_PASSWORDS: dict[str, str] = {
    "898310048990001": "laowang-demo-1",  # M1 老王便利店
    "898310058120002": "xinghe-demo-2",  # M2 星河超市
}


def seed_portal_accounts(store: SqliteStore) -> list[str]:
    """Give each demo merchant that exists and has no portal account yet its demo password
    (a password changed later is kept). Blocking (scrypt); returns the MIDs seeded."""
    ensure_schema(store)
    seeded = []
    for mid, password in DEMO_PASSWORDS.items():
        if not store.query("SELECT 1 FROM merchants WHERE mid = ?", (mid,)):
            continue
        if store.query("SELECT 1 FROM portal_accounts WHERE mid = ?", (mid,)):
            continue
        set_password(store, mid, password)
        seeded.append(mid)
    return seeded
