"""Configuration: one TOML file, overridable by environment variables, validated at start with
errors that name the setting (``switch config check FILE``).

```toml
[switch]
host = "127.0.0.1"        # terminal, metrics and admin ports listen here
port = 5000               # terminal port
metrics_port = 9100       # /metrics /healthz /readyz
admin_port = 9200         # admin API (bearer token from SWITCH_ADMIN_TOKEN); 0 = off
portal_port = 8080        # merchant portal; 0 = off
portal_secure_cookies = true   # Secure cookies (serve the portal behind TLS)
data_dir = "data"         # SQLite store, master.key, payout files
log_level = "INFO"
log_format = "json"       # json | text

[store]
dsn = "sqlite:///data/switch.db"   # default: sqlite in data_dir

[timeouts]                # seconds
issuer = 5.0
idle = 60.0
read = 10.0
drain = 10.0
orphan_intent = 0         # a write-ahead intent older than this never reached the journal (a dead
                          # process, a failed commit): reversed (0: max(30, 6 x issuer); >= 2 x issuer + 1)

[webhooks]
allow_private = false     # merchants' webhooks may reach loopback/private/link-local addresses
                          # (only for a test bench: else a merchant can probe the switch's network)

[limits]
max_frame = 2048
max_connections = 1000
micro_monthly_limit = "300000.00"       # yuan, defaults for new merchants
enterprise_monthly_limit = "5000000.00"

[[issuers]]
name = "ICBC"             # the issuer id printed in F44
host = "127.0.0.1"
port = 7001
prefixes = ["622202"]     # card BINs (kind card) or payment-code prefixes (kind wallet)
kind = "card"
```

Environment overrides (they win over the file): ``SWITCH_HOST``, ``SWITCH_PORT``,
``SWITCH_METRICS_PORT``, ``SWITCH_ADMIN_PORT``, ``SWITCH_DATA_DIR``, ``SWITCH_LOG_LEVEL``,
``SWITCH_LOG_FORMAT``, ``SWITCH_STORE_DSN``, ``SWITCH_ISSUER_TIMEOUT``, ``SWITCH_IDLE_TIMEOUT``,
``SWITCH_READ_TIMEOUT``, ``SWITCH_DRAIN_TIMEOUT``, ``SWITCH_MAX_FRAME``, ``SWITCH_MAX_CONNECTIONS``.

Pure: reads a file and a mapping, returns data or raises ConfigError. No sockets, no store.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """The configuration is unusable; the message names the setting and what is wrong."""


@dataclass(frozen=True)
class IssuerConfig:
    name: str
    host: str
    port: int
    prefixes: tuple[str, ...]
    kind: str = "card"


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 5000
    metrics_port: int = 9100
    admin_port: int = 9200
    portal_port: int = 0
    portal_secure_cookies: bool = True
    webhook_allow_private: bool = False
    data_dir: Path = Path("data")
    log_level: str = "INFO"
    log_format: str = "json"
    store_dsn: str = ""
    issuer_timeout: float = 5.0
    idle_timeout: float = 60.0
    read_timeout: float = 10.0
    drain_timeout: float = 10.0
    orphan_intent_timeout: float = 0.0  # 0: max(30 s, 6 x issuer_timeout); see switch.app.orphan_intent_age
    max_frame: int = 2048
    max_connections: int = 1000
    micro_monthly_limit_fen: int = 300_000_00
    enterprise_monthly_limit_fen: int = 5_000_000_00
    issuers: tuple[IssuerConfig, ...] = field(default_factory=tuple)

    @property
    def sqlite_path(self) -> Path:
        """The SQLite file of ``store_dsn`` (``sqlite:///path``), default ``data_dir/switch.db``."""
        if not self.store_dsn.startswith("sqlite:///"):
            return self.data_dir / "switch.db"
        return Path(self.store_dsn[len("sqlite:///"):])


_ENV: dict[str, tuple[str, type]] = {
    "SWITCH_HOST": ("host", str),
    "SWITCH_PORT": ("port", int),
    "SWITCH_METRICS_PORT": ("metrics_port", int),
    "SWITCH_ADMIN_PORT": ("admin_port", int),
    "SWITCH_PORTAL_PORT": ("portal_port", int),
    "SWITCH_DATA_DIR": ("data_dir", Path),
    "SWITCH_LOG_LEVEL": ("log_level", str),
    "SWITCH_LOG_FORMAT": ("log_format", str),
    "SWITCH_STORE_DSN": ("store_dsn", str),
    "SWITCH_ISSUER_TIMEOUT": ("issuer_timeout", float),
    "SWITCH_IDLE_TIMEOUT": ("idle_timeout", float),
    "SWITCH_READ_TIMEOUT": ("read_timeout", float),
    "SWITCH_DRAIN_TIMEOUT": ("drain_timeout", float),
    "SWITCH_ORPHAN_INTENT_TIMEOUT": ("orphan_intent_timeout", float),
    "SWITCH_MAX_FRAME": ("max_frame", int),
    "SWITCH_MAX_CONNECTIONS": ("max_connections", int),
}

_SECTIONS: dict[str, dict[str, tuple[str, type]]] = {
    "switch": {
        "host": ("host", str), "port": ("port", int), "metrics_port": ("metrics_port", int),
        "admin_port": ("admin_port", int), "data_dir": ("data_dir", Path), "log_level": ("log_level", str),
        "log_format": ("log_format", str), "portal_port": ("portal_port", int),
        "portal_secure_cookies": ("portal_secure_cookies", bool),
    },
    "store": {"dsn": ("store_dsn", str)},
    "webhooks": {"allow_private": ("webhook_allow_private", bool)},
    "timeouts": {
        "issuer": ("issuer_timeout", float), "idle": ("idle_timeout", float), "read": ("read_timeout", float),
        "drain": ("drain_timeout", float), "orphan_intent": ("orphan_intent_timeout", float),
    },
    "limits": {
        "max_frame": ("max_frame", int), "max_connections": ("max_connections", int),
        "micro_monthly_limit": ("micro_monthly_limit_fen", Decimal),
        "enterprise_monthly_limit": ("enterprise_monthly_limit_fen", Decimal),
    },
}


def load_config(path: Path | None, env: Mapping[str, str]) -> Config:
    """Read ``path`` (None: defaults only), apply ``env`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for section, body in raw.items():
        if section == "issuers":
            continue
        known = _SECTIONS.get(section)
        if known is None:
            raise ConfigError(f"unknown section [{section}] (known: {', '.join([*_SECTIONS, 'issuers'])})")
        if not isinstance(body, dict):
            raise ConfigError(f"[{section}] must be a table")
        for key, value in body.items():
            if key not in known:
                raise ConfigError(f"[{section}] {key}: unknown setting (known: {', '.join(known)})")
            attr, kind = known[key]
            values[attr] = _convert(f"[{section}] {key}", value, kind)
    for var, (attr, kind) in _ENV.items():
        if var in env:
            values[attr] = _convert(var, env[var], kind, from_env=True)
    issuers = tuple(_issuer(i, item) for i, item in enumerate(raw.get("issuers", [])))
    cfg = Config(**values, issuers=issuers)
    _validate(cfg)
    return cfg


def _convert(where: str, value: Any, kind: type, *, from_env: bool = False) -> Any:
    try:
        if kind is Decimal:
            amount = Decimal(str(value))
            if amount <= 0 or amount.as_tuple().exponent < -2:  # type: ignore[operator]
                raise ValueError
            return int(amount * 100)
        if kind is int:
            if isinstance(value, bool) or (not from_env and not isinstance(value, int)):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool) or (not from_env and not isinstance(value, (int, float))):
                raise ValueError
            return float(value)
        if kind is bool:
            if from_env:
                if str(value).lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                return str(value).lower() in ("1", "true", "yes")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is Path:
            if not isinstance(value, str) or not value:
                raise ValueError
            return Path(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (ValueError, InvalidOperation):
        expected = {Decimal: "an amount in yuan like \"300000.00\"", int: "a whole number",
                    float: "a number of seconds", Path: "a path", str: "text", bool: "true or false"}[kind]
        raise ConfigError(f"{where}: {value!r} is not {expected}") from None


def _issuer(index: int, item: Any) -> IssuerConfig:
    where = f"[[issuers]] #{index + 1}"
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(item) - {"name", "host", "port", "prefixes", "kind"}
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    name = item.get("name")
    if not isinstance(name, str) or not name or len(name) > 11 or not name.isascii():
        raise ConfigError(f"{where} name: an issuer id of 1-11 ASCII characters is required (it goes in F44)")
    where = f"[[issuers]] {name}"
    host = item.get("host", "127.0.0.1")
    port = item.get("port")
    if not isinstance(host, str) or not host:
        raise ConfigError(f"{where} host: text required")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"{where} port: a TCP port 1-65535 is required")
    prefixes = item.get("prefixes")
    if not isinstance(prefixes, list) or not prefixes or not all(
        isinstance(p, str) and p.isascii() and p.isdigit() for p in prefixes
    ):
        raise ConfigError(f"{where} prefixes: a non-empty list of digit strings is required")
    kind = item.get("kind", "card")
    if kind not in ("card", "wallet"):
        raise ConfigError(f"{where} kind: 'card' or 'wallet'")
    return IssuerConfig(name, host, port, tuple(prefixes), kind)


def _validate(cfg: Config) -> None:
    for attr in ("port", "metrics_port", "admin_port", "portal_port"):
        v = getattr(cfg, attr)
        if not 0 <= v <= 65535:
            raise ConfigError(f"{attr}: {v} is not a TCP port (0-65535)")
    if cfg.log_level.upper() not in LOG_LEVELS:
        raise ConfigError(f"log_level: {cfg.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if cfg.log_format not in ("json", "text"):
        raise ConfigError(f"log_format: {cfg.log_format!r} is not json or text")
    if cfg.store_dsn and not cfg.store_dsn.startswith(("sqlite:///", "postgresql://")):
        raise ConfigError(f"store dsn: {cfg.store_dsn!r} must start with sqlite:/// or postgresql://")
    for attr in ("issuer_timeout", "idle_timeout", "read_timeout", "drain_timeout"):
        if getattr(cfg, attr) <= 0:
            raise ConfigError(f"{attr}: must be more than 0 seconds")
    if cfg.orphan_intent_timeout and cfg.orphan_intent_timeout < 2 * cfg.issuer_timeout + 1:
        # shorter, and a live process's request in flight could be reversed under its feet
        raise ConfigError("orphan_intent timeout: at least twice the issuer timeout plus one second")
    if not 64 <= cfg.max_frame <= 65535:
        raise ConfigError("max_frame: between 64 and 65535 bytes")
    if cfg.max_connections < 1:
        raise ConfigError("max_connections: at least 1")
    if cfg.micro_monthly_limit_fen > 300_000_00:
        raise ConfigError("micro_monthly_limit: a micro merchant's limit is at most 300000.00 (§13)")
    names = [i.name for i in cfg.issuers]
    if len(set(names)) != len(names):
        raise ConfigError("issuers: each name once")
    seen: dict[tuple[str, str], str] = {}
    for i in cfg.issuers:
        for p in i.prefixes:
            other = seen.setdefault((i.kind, p), i.name)
            if other != i.name:
                raise ConfigError(f"issuers: prefix {p} routes to both {other} and {i.name}")
