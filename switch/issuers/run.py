"""Running the demo issuers (protocol §14) as TCP servers, together or one by one.

Owns starting the listening mock issuers in one task group and reporting their ports, and the
entry point for a future ``switch issuer --name ICBC --port P`` command. It must not hold
authorisation rules (``mock.py``) or fixture data (``cards.py``), and does not start the switch.
"""

from __future__ import annotations

import argparse
import logging

import anyio
import anyio.abc

from switch.issuers.cards import demo_issuers
from switch.issuers.mock import MockIssuer, mock_from_demo


def demo_mocks() -> dict[str, MockIssuer]:
    """Fresh mocks for every §14 issuer that listens (BOC has a route but no server)."""
    return {name: mock_from_demo(d) for name, d in demo_issuers().items() if d.listens}


async def run_demo_issuers(
    host: str,
    ports: dict[str, int] | None = None,
    *,
    mocks: dict[str, MockIssuer] | None = None,
    task_status: anyio.abc.TaskStatus[dict[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve every listening demo issuer on ``host`` until cancelled.

    ``ports`` maps issuer id to port (missing or 0 = a free port). Pass ``mocks`` (e.g. from
    ``demo_mocks()``) to keep a handle on their books. Reports ``{issuer_id: bound port}``.
    """
    mocks = demo_mocks() if mocks is None else mocks
    ports = ports or {}
    async with anyio.create_task_group() as tg:
        bound: dict[str, int] = {}
        for name, mock in mocks.items():
            bound[name] = await tg.start(mock.serve, host, ports.get(name, 0))
        task_status.started(bound)


async def serve_issuer(
    name: str,
    host: str,
    port: int,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one demo issuer (ICBC, CMB, SLOW, WECHAT, ALIPAY) until cancelled."""
    fixture = demo_issuers()
    if name not in fixture:
        raise ValueError(f"unknown issuer {name!r}; known: {', '.join(sorted(fixture))}")
    if not fixture[name].listens:
        raise ValueError(f"issuer {name} has a route but no server in the demo fixture")
    await mock_from_demo(fixture[name]).serve(host, port, task_status=task_status)


def main_issuer(argv: list[str] | None = None) -> int:
    """``switch issuer --name ICBC [--host H] --port P``: one mock issuer in the foreground."""
    parser = argparse.ArgumentParser(prog="switch issuer", description="Run one demo mock issuer.")
    parser.add_argument("--name", required=True, help="issuer id: ICBC, CMB, SLOW, WECHAT, ALIPAY")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        anyio.run(serve_issuer, args.name, args.host, args.port)
    except KeyboardInterrupt:
        return 0
    return 0
