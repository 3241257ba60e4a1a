"""Composition root: settings -> adapters -> pipeline -> one task group.

``run_switch`` opens the store, starts the journal writer, the issuer links, the metrics
endpoint and, once the required issuer links are up, the terminal port. SIGTERM / SIGINT
drain it: stop accepting, finish in-flight requests, flush the journal, then stop.
``run_demo`` adds the demo fixture (protocol §14) and the mock issuers.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import anyio
import anyio.abc

from switch import demo_fixture
from switch.adapters.admin_api import serve_admin
from switch.adapters.http_endpoint import serve_http
from switch.adapters.prometheus import PrometheusMetrics
from switch.adapters.sqlite_store import SqliteStore
from switch.adapters.terminal_server import ServerSettings, TerminalServer
from switch.adapters.webhooks import WebhookOutbox
from switch.core.codec import Codec, load_dialect
from switch.config import Config, load_config
from switch.crypto.keystore import KeyWrapper, MasterKey, MasterKeyring
from switch.domain.model import Merchant, Terminal
from switch.pipeline.context import Settings, SwitchState
from switch.network import IssuerEndpoint, IssuerNetwork, routing_tables
from switch.pipeline.manager import TransactionManager
from switch.pipeline.reload import watch_changes
from switch.pipeline.saf import StoreAndForward

log = logging.getLogger("switch.app")


@dataclass
class AppConfig:
    data_dir: Path
    db_path: Path | None = None  # default: data_dir / switch.db
    store_dsn: str = ""  # postgresql://... selects the PostgreSQL store
    host: str = "127.0.0.1"
    port: int = 5000
    metrics_port: int = 9100
    issuer_timeout: float = 5.0
    idle_timeout: float = 60.0
    read_timeout: float = 10.0
    max_frame: int = 2048
    drain_timeout: float = 10.0
    orphan_intent_timeout: float = 0.0  # 0: orphan_intent_age(issuer_timeout)
    max_connections: int = 1000
    admin_port: int | None = 9200  # None or no SWITCH_ADMIN_TOKEN: no admin API
    portal_port: int | None = None  # the merchant portal (None: off)
    portal_secure_cookies: bool = False
    webhook_allow_private: bool = False  # webhooks may reach loopback/private addresses
    # the demo: an admin or portal port already in use is logged and that surface left off (the
    # terminal port is what §14 promises; two demos on one host must not fail on port 8080)
    side_ports_optional: bool = False
    link_start_timeout: float = 10.0
    issuers: list[IssuerEndpoint] = field(default_factory=list)
    wait_for_links: tuple[str, ...] = ()  # links that must be up before the terminal port opens


@dataclass
class Running:
    port: int
    metrics_port: int
    store: SqliteStore
    metrics: PrometheusMetrics
    shutdown: Callable[[], None]
    admin_port: int | None = None  # None: the admin API is off (no SWITCH_ADMIN_TOKEN)
    portal_port: int | None = None


def load_master_key(data_dir: Path, create: bool) -> KeyWrapper:
    """The master keyring: SWITCH_MASTER_KEY (+ SWITCH_MASTER_KEY_OLD) or ``data_dir/master.key``
    (+ the ``master.key.old.<id>`` files a rotation leaves); ``create`` makes a first key file."""
    key_file = data_dir / "master.key"
    if "SWITCH_MASTER_KEY" not in os.environ and not key_file.exists():
        if not create:
            return MasterKey.load(os.environ, None)  # raises the clear "no master key" error
        data_dir.mkdir(parents=True, exist_ok=True)
        MasterKey.create_file(key_file)
    return MasterKeyring.load(os.environ, data_dir)


async def run_switch(
    cfg: AppConfig,
    master_key: KeyWrapper,
    *,
    seed: Callable[[SqliteStore], None] | None = None,
    prepare: Callable[[SqliteStore], object] | None = None,
    handle_signals: bool = True,
    reload_issuers: Callable[[], list[IssuerEndpoint]] | None = None,
    task_status: anyio.abc.TaskStatus[Running] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the switch until SIGTERM/SIGINT (or ``Running.shutdown``). ``seed``: fills an empty
    store; ``prepare``: runs (in a thread) on the open store before any port opens, so a signal
    can never close the store under it. ``reload_issuers``: called on SIGHUP for the new issuer
    list (routes and endpoints are swapped without dropping anything)."""
    metrics = PrometheusMetrics()
    store: SqliteStore
    if cfg.store_dsn.startswith(("postgresql://", "postgres://")):
        from switch.adapters.pg_store import open_store_for

        store = open_store_for(cfg.store_dsn, master_key, metrics)  # opened: migrated, key checked
    else:
        store = SqliteStore(cfg.db_path or cfg.data_dir / "switch.db", master_key, metrics)
        store.open()
    try:
        if seed is not None and store.is_empty():
            seed(store)
        if prepare is not None:
            await anyio.to_thread.run_sync(prepare, store)
        network = IssuerNetwork(metrics, cfg.issuer_timeout)
        links = network.links  # one dict shared by the pipeline, store-and-forward and reloads
        routes, wallet_routes = routing_tables(list(cfg.issuers))
        state = SwitchState(
            codec=Codec(load_dialect("terminal")),
            issuer_codec=Codec(load_dialect("issuer")),
            terminals=store.load_terminals(),
            merchants=store.load_merchants(),
            routes=routes,
            links=links,
            zone_pin_keys=store.load_zone_pin_keys(),
            metrics=metrics,
            settings=Settings(issuer_timeout=cfg.issuer_timeout),
            wallet_routes=wallet_routes,
        )
        if cfg.store_dsn.startswith(("postgresql://", "postgres://")):
            # several processes may share this database: the database arbitrates the limit
            import psycopg

            from switch.pipeline.limits import DatabaseLimits

            dsn = cfg.store_dsn
            state.limits = DatabaseLimits(lambda: psycopg.connect(dsn, autocommit=True),
                                          stale_after=max(60.0, cfg.issuer_timeout * 6))
            from switch.pipeline.duplicates import DatabaseClaims

            state.dup_claims = DatabaseClaims(lambda: psycopg.connect(dsn, autocommit=True),
                                              stale_after=max(60.0, cfg.issuer_timeout * 6))
            from switch.pipeline.originals import AdvisoryRowLocks

            state.row_locker = AdvisoryRowLocks(lambda: psycopg.connect(dsn, autocommit=True))
        state.limits.load(store)
        saf = StoreAndForward(store, links, metrics, timeout=cfg.issuer_timeout)
        state.saf = saf
        # requests that reached an issuer without their outcome reaching the journal (a crash):
        # reverse them before serving again. On a shared database only the intents old enough to
        # be nobody's (the rest may be other live processes' requests in flight). A sweep does
        # the same for the whole life of the process: for the processes that die, and for this
        # one's requests whose journal commit failed (a full disk, an I/O error) after the issuer
        # had answered.
        shared = cfg.store_dsn.startswith(("postgresql://", "postgres://"))
        orphan_age = cfg.orphan_intent_timeout or orphan_intent_age(cfg.issuer_timeout)
        store.db.execute("BEGIN IMMEDIATE")
        saf.op_promote_intents(older_than=time.time() - orphan_age if shared else None)(store.db)
        store.db.execute("COMMIT")
        outbox = WebhookOutbox(store, allow_private=cfg.webhook_allow_private)
        outbox.refresh()
        state.outbox = outbox
        manager = TransactionManager(state, store)
        server = TerminalServer(
            ServerSettings(cfg.host, cfg.port, cfg.idle_timeout, cfg.read_timeout, cfg.max_frame,
                           drain_timeout=cfg.drain_timeout, max_connections=cfg.max_connections),
            manager.handle,
            metrics,
        )

        def ready() -> bool:
            return store.writable() and any(link.is_up for link in links.values())

        async with anyio.create_task_group() as tg:
            await tg.start(store.run_writer)
            await tg.start(store.run_probe)
            await network.start(tg, list(cfg.issuers))
            await tg.start(saf.run)  # delivers what a previous run left queued, too
            await tg.start(saf.sweep_orphan_intents, orphan_age)
            await tg.start(outbox.run)
            await tg.start(watch_changes, state)
            metrics_port = await tg.start(serve_http, metrics, cfg.host, cfg.metrics_port, ready)
            admin_port: int | None = None
            token = os.environ.get("SWITCH_ADMIN_TOKEN", "")
            if cfg.admin_port is not None and token:
                admin_port = await _start_side(cfg, "admin API", tg, lambda task_status: serve_admin(
                    store, token, cfg.host, cfg.admin_port or 0, task_status=task_status))
            elif cfg.admin_port is not None:
                log.warning("admin API off: set SWITCH_ADMIN_TOKEN to enable it")
            portal_port: int | None = None
            if cfg.portal_port is not None:
                from switch.portal.app import serve_portal

                portal_port = await _start_side(cfg, "merchant portal", tg, lambda task_status: serve_portal(
                    store, cfg.host, cfg.portal_port or 0, secure_cookies=cfg.portal_secure_cookies,
                    task_status=task_status))
            for name in cfg.wait_for_links:
                if not await links[name].wait_up(cfg.link_start_timeout):
                    log.warning("issuer link %s not up after %.0fs; opening anyway", name, cfg.link_start_timeout)
            async with anyio.create_task_group() as serving:
                port = await serving.start(server.serve)
                if handle_signals:
                    serving.start_soon(_on_signal, server)
                    if reload_issuers is not None:
                        tg.start_soon(_on_sighup, network, state, reload_issuers)
                task_status.started(
                    Running(port, metrics_port, store, metrics, server.shutdown, admin_port, portal_port)
                )
                log.info("switch ready: terminal port %s, metrics port %s, admin port %s, portal port %s",
                         port, metrics_port, admin_port, portal_port)
            # the server drained its connections; stop the rest (the writer flushes on the way out)
            tg.cancel_scope.cancel()
    finally:
        store.close()


async def _start_side(cfg: AppConfig, name: str, tg: anyio.abc.TaskGroup, starter: Callable[..., Any]) -> int | None:
    """Start an HTTP surface beside the terminal port; its bound port. With
    ``side_ports_optional`` a port that cannot be bound is logged and the surface stays off."""
    try:
        port: int = await tg.start(starter)
    except OSError as exc:
        if not cfg.side_ports_optional:
            raise
        log.warning("%s not started: %s", name, exc)
        return None
    return port


def orphan_intent_age(issuer_timeout: float) -> float:
    """Seconds after which a write-ahead intent is an orphan: its request either committed its
    journal row (deleting the intent) or its process died. Far beyond one request's life."""
    return max(30.0, issuer_timeout * 6)


async def _on_sighup(
    network: IssuerNetwork, state: SwitchState, reload_issuers: Callable[[], list[IssuerEndpoint]]
) -> None:
    with anyio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            try:
                endpoints = reload_issuers()
            except Exception as exc:  # a bad file must not take the switch down: keep the old one
                log.error("SIGHUP: configuration not reloaded: %s", exc)
                continue
            await network.apply(state, endpoints)
            log.info("SIGHUP: issuer routes and endpoints reloaded (%d issuers)", len(endpoints))


async def _on_signal(server: TerminalServer) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %s: draining", signal.Signals(signum).name)
            server.shutdown()
            return


# ---- serve (a configuration file) ---------------------------------------------------------
def app_config(cfg: Config) -> AppConfig:
    return AppConfig(
        data_dir=cfg.data_dir, db_path=cfg.sqlite_path, store_dsn=cfg.store_dsn, host=cfg.host, port=cfg.port,
        metrics_port=cfg.metrics_port, issuer_timeout=cfg.issuer_timeout, idle_timeout=cfg.idle_timeout,
        read_timeout=cfg.read_timeout, max_frame=cfg.max_frame, drain_timeout=cfg.drain_timeout,
        orphan_intent_timeout=cfg.orphan_intent_timeout,
        max_connections=cfg.max_connections, issuers=endpoints_of(cfg),
        admin_port=cfg.admin_port if cfg.admin_port else None,
        portal_port=cfg.portal_port if cfg.portal_port else None,
        portal_secure_cookies=cfg.portal_secure_cookies,
        webhook_allow_private=cfg.webhook_allow_private,
    )


def endpoints_of(cfg: Config) -> list[IssuerEndpoint]:
    return [IssuerEndpoint(i.name, i.host, i.port, i.prefixes, i.kind) for i in cfg.issuers]


async def run_serve(config_path: Path | None, *, task_status: anyio.abc.TaskStatus[Running] = anyio.TASK_STATUS_IGNORED) -> None:
    """``switch serve``: the switch as configured; SIGHUP re-reads the file's issuers and routes."""
    cfg = load_config(config_path, os.environ)
    master_key = load_master_key(cfg.data_dir, create=False)

    def reload_issuers() -> list[IssuerEndpoint]:
        return endpoints_of(load_config(config_path, os.environ))

    await run_switch(app_config(cfg), master_key, reload_issuers=reload_issuers, task_status=task_status)


# ---- demo ---------------------------------------------------------------------------------
def seed_demo(store: SqliteStore) -> None:
    """Load the §14 fixture into an empty store (one transaction)."""
    from switch.issuers.cards import demo_issuers

    db = store.db
    db.execute("BEGIN IMMEDIATE")
    try:
        for m in demo_fixture.MERCHANTS:
            store.add_merchant(Merchant(m.mid, m.kind, m.shop_name, monthly_limit_fen=m.monthly_limit_fen))
        for t in demo_fixture.TERMINALS:
            store.add_terminal(
                Terminal(t.tid, t.mid, t.role, t.main_tid, t.state,
                         tmk=bytes.fromhex(t.tmk_hex) if t.tmk_hex else None),
                activation_code=t.activation_code,
                expires=time.time() + 24 * 3600 if t.activation_code else None,
            )
        for issuer in demo_issuers().values():
            store.set_zone_pin_key(issuer.issuer_id, issuer.zpk)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _closed_port(host: str) -> int:
    """A port where nothing listens (the BOC route of §14)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def run_demo(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    metrics_port: int = 9100,
    admin_port: int | None = 9200,
    portal_port: int | None = None,
    issuer_timeout: float = 2.0,
    handle_signals: bool = True,
    mocks: dict[str, Any] | None = None,
    issuer_ports: dict[str, int] | None = None,
    orphan_intent_timeout: float = 0.0,
    webhook_allow_private: bool = False,
    task_status: anyio.abc.TaskStatus[Running] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The demo: mock issuers (``mocks`` to keep handles on them, e.g. from
    ``switch.issuers.run.demo_mocks()``; ``issuer_ports`` to pin their ports across a restart),
    the §14 fixture in ``data_dir``, and the switch."""
    from switch.issuers.cards import demo_issuers
    from switch.issuers.run import run_demo_issuers

    master_key = load_master_key(data_dir, create=True)
    fixture = demo_issuers()
    async with anyio.create_task_group() as tg:
        bound: dict[str, int] = await tg.start(
            lambda task_status: run_demo_issuers(host, issuer_ports, mocks=mocks, task_status=task_status)
        )
        endpoints = [
            IssuerEndpoint(name, host, bound.get(name) or _closed_port(host), d.prefixes, d.kind)
            for name, d in fixture.items()
        ]
        cfg = AppConfig(
            data_dir=data_dir, host=host, port=port, metrics_port=metrics_port,
            issuer_timeout=issuer_timeout, issuers=endpoints, wait_for_links=tuple(bound), admin_port=admin_port,
            portal_port=portal_port, side_ports_optional=True, orphan_intent_timeout=orphan_intent_timeout,
            webhook_allow_private=webhook_allow_private,
        )

        prepare: Callable[[SqliteStore], object] | None = None
        if portal_port is not None:
            from switch.portal.demo import seed_portal_accounts

            prepare = seed_portal_accounts  # before the ports open: a SIGTERM then drains cleanly

        async def switch_then_stop(*, task_status: anyio.abc.TaskStatus[Running]) -> None:
            await run_switch(cfg, master_key, seed=seed_demo, prepare=prepare, handle_signals=handle_signals,
                             task_status=task_status)
            tg.cancel_scope.cancel()  # the switch drained: stop the mock issuers too

        running = await tg.start(switch_then_stop)
        task_status.started(running)
        admin = f", admin port {running.admin_port}" if running.admin_port is not None else ""
        if running.portal_port is not None:
            from switch.portal.demo import DEMO_PASSWORDS

            admin += f", portal port {running.portal_port}"
            for mid, password in DEMO_PASSWORDS.items():
                print(f"merchant portal http://{host}:{running.portal_port}/  MID {mid}  password {password}",
                      flush=True)
        print(
            f"switch ready: terminal port {running.port}, metrics port {running.metrics_port}, "
            f"data {data_dir}{admin}",
            flush=True,
        )
    # run_switch returned (drained): the issuers were cancelled with the group


def run(coro_fn: Callable[[], object]) -> None:
    """anyio.run on asyncio, with uvloop when it is installed."""
    try:
        import uvloop  # noqa: F401

        options = {"use_uvloop": True}
    except ImportError:  # pragma: no cover - uvloop is a declared dependency on Linux
        options = {}
    anyio.run(coro_fn, backend="asyncio", backend_options=options)  # type: ignore[arg-type]


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    from switch.logs import configure_logging as setup

    setup(level, fmt)
