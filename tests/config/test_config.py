"""Configuration file + environment overrides, validated with errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from switch.config import ConfigError, load_config
from switch.cli import main

GOOD = """
[switch]
port = 6000
metrics_port = 0
data_dir = "/tmp/somewhere"
log_level = "DEBUG"

[timeouts]
issuer = 2.5

[limits]
micro_monthly_limit = "250000.00"

[[issuers]]
name = "ICBC"
host = "127.0.0.1"
port = 7001
prefixes = ["622202"]

[[issuers]]
name = "WECHAT"
port = 7005
prefixes = ["10", "11"]
kind = "wallet"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "switch.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_a_good_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), {})
    assert cfg.port == 6000 and cfg.metrics_port == 0 and cfg.issuer_timeout == 2.5
    assert cfg.micro_monthly_limit_fen == 250_000_00 and cfg.log_level == "DEBUG"
    assert [i.name for i in cfg.issuers] == ["ICBC", "WECHAT"] and cfg.issuers[1].kind == "wallet"
    assert cfg.sqlite_path == Path("/tmp/somewhere/switch.db")


def test_defaults_without_a_file() -> None:
    cfg = load_config(None, {})
    assert (cfg.port, cfg.metrics_port, cfg.idle_timeout, cfg.read_timeout, cfg.max_frame) == (5000, 9100, 60.0, 10.0, 2048)
    assert cfg.webhook_allow_private is False  # merchants' webhooks reach public addresses only


def test_webhooks_may_be_let_reach_private_addresses(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "[webhooks]\nallow_private = true\n"), {}).webhook_allow_private is True
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[webhooks]\nallow_private = \"yes\"\n"), {})
    assert "allow_private" in str(info.value)


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), {"SWITCH_PORT": "7000", "SWITCH_ISSUER_TIMEOUT": "1.5",
                                              "SWITCH_STORE_DSN": "sqlite:///x/y.db"})
    assert cfg.port == 7000 and cfg.issuer_timeout == 1.5 and cfg.sqlite_path == Path("x/y.db")


@pytest.mark.parametrize(
    "text, env, message",
    [
        ("[switch]\nport = \"x\"\n", {}, "[switch] port"),
        ("[switch]\nport = 70000\n", {}, "port: 70000"),
        ("[switch]\ncolour = 1\n", {}, "colour: unknown setting"),
        ("[nope]\n", {}, "unknown section [nope]"),
        ("[timeouts]\nissuer = 0\n", {}, "issuer_timeout"),
        ("[timeouts]\nissuer = 5.0\norphan_intent = 10.0\n", {}, "orphan_intent timeout"),
        ("[limits]\nmicro_monthly_limit = \"400000.00\"\n", {}, "at most 300000.00"),
        ("[limits]\nmicro_monthly_limit = \"1.234\"\n", {}, "micro_monthly_limit"),
        ("[[issuers]]\nname = \"A\"\nport = 1\nprefixes = []\n", {}, "prefixes"),
        ("[[issuers]]\nname = \"A\"\nprefixes = [\"1\"]\n", {}, "port"),
        ("[[issuers]]\nname = \"A\"\nport = 1\nprefixes = [\"62\"]\n[[issuers]]\nname = \"B\"\nport = 2\nprefixes = [\"62\"]\n",
         {}, "routes to both A and B"),
        ("[store]\ndsn = \"mysql://x\"\n", {}, "dsn"),
        ("not toml ===", {}, "not valid TOML"),
        ("", {"SWITCH_PORT": "abc"}, "SWITCH_PORT"),
        ("", {"SWITCH_LOG_LEVEL": "LOUD"}, "log_level"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env)
    assert message in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml", {})


def test_config_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(write(tmp_path, GOOD))]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["config", "check", str(write(tmp_path, "[switch]\nport = -1\n"))]) == 2
    assert "port" in capsys.readouterr().err
