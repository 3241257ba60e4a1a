"""The issuer side of a running switch: one link per issuer, the BIN and wallet routes, and how a
new issuer list (SIGHUP reload) is applied without dropping anything in flight.

Reload: routes are swapped at once (new requests route by the new table); an issuer whose address
changed gets a new link and the old one is retired once its in-flight requests are answered or
timed out; a removed issuer's link is retired the same way; a new issuer's link is started.
Terminal connections are not touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio
import anyio.abc

from switch.adapters.issuer_link import TcpIssuerLink
from switch.domain.cards import IssuerRoute, RoutingTable
from switch.pipeline.context import SwitchState
from switch.ports import IssuerLink, Metrics

log = logging.getLogger("switch.network")


@dataclass(frozen=True)
class IssuerEndpoint:
    name: str
    host: str
    port: int
    prefixes: tuple[str, ...]
    kind: str = "card"  # card: routed by BIN; wallet: scan-to-pay payment codes by prefix


def routing_tables(endpoints: list[IssuerEndpoint]) -> tuple[RoutingTable, RoutingTable]:
    cards = RoutingTable([IssuerRoute(p, e.name) for e in endpoints if e.kind == "card" for p in e.prefixes])
    wallets = RoutingTable([IssuerRoute(p, e.name) for e in endpoints if e.kind == "wallet" for p in e.prefixes])
    return cards, wallets


class IssuerNetwork:
    def __init__(self, metrics: Metrics, issuer_timeout: float) -> None:
        self.metrics = metrics
        self.issuer_timeout = issuer_timeout
        self.links: dict[str, IssuerLink] = {}  # shared with SwitchState and store-and-forward
        self.endpoints: dict[str, IssuerEndpoint] = {}
        self._scopes: dict[int, anyio.CancelScope] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    async def start(self, tg: anyio.abc.TaskGroup, endpoints: list[IssuerEndpoint]) -> None:
        self._tg = tg
        for e in endpoints:
            await self._start_link(e)

    async def _start_link(self, e: IssuerEndpoint, *, wait_up: float = 0.0) -> None:
        """Start a link to ``e``; with ``wait_up``, give it that long to connect before it takes
        over from a previous link of the same name (requests keep flowing on the old one meanwhile)."""
        assert self._tg is not None
        link = TcpIssuerLink(e.name, e.host, e.port, self.metrics)
        scope = anyio.CancelScope()

        async def run(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await link.run(task_status=task_status)

        await self._tg.start(run)
        self._scopes[id(link)] = scope
        if wait_up > 0 and not await link.wait_up(wait_up):
            log.warning("issuer %s: new link to %s:%s not up after %.1fs; switching to it anyway",
                        e.name, e.host, e.port, wait_up)
        self.links[e.name] = link
        self.endpoints[e.name] = e

    def _retire(self, link: IssuerLink) -> None:
        """Stop a link once nothing is waiting on it (bounded by twice the issuer timeout)."""
        assert self._tg is not None
        scope = self._scopes.pop(id(link), None)
        if scope is None:
            return

        async def retire() -> None:
            # requests that looked the link up just before the swap may not be pending yet: a
            # grace period first, then until nothing waits on it (bounded)
            await anyio.sleep(1.0)
            with anyio.move_on_after(self.issuer_timeout * 2 + 1):
                while getattr(link, "_pending", None):
                    await anyio.sleep(0.05)
            scope.cancel()
            log.info("issuer %s: old link retired", link.name)

        self._tg.start_soon(retire)

    async def apply(self, state: SwitchState, endpoints: list[IssuerEndpoint]) -> None:
        """Make the running switch use ``endpoints`` (SIGHUP reload)."""
        wanted = {e.name: e for e in endpoints}
        state.routes, state.wallet_routes = routing_tables(endpoints)
        for name in list(self.links):
            if name not in wanted:
                link = self.links.pop(name)
                self.endpoints.pop(name, None)
                self._retire(link)
                log.info("issuer %s removed", name)
        for name, e in wanted.items():
            old = self.endpoints.get(name)
            if old is not None and (old.host, old.port) == (e.host, e.port):
                self.endpoints[name] = e
                continue
            previous = self.links.get(name)
            await self._start_link(e, wait_up=min(self.issuer_timeout, 5.0) if previous is not None else 0.0)
            if previous is not None:
                self._retire(previous)
                log.info("issuer %s moved to %s:%s", name, e.host, e.port)
            else:
                log.info("issuer %s added at %s:%s", name, e.host, e.port)
