"""Handlers of management messages (protocol §8, §9.3): sign-on, sign-off, echo test,
parameter download."""

from __future__ import annotations

from switch.crypto.working_keys import build_f62, generate_working_keys
from switch.domain.codes import ResultCode
from switch.domain.money import rate_percent
from switch.pipeline.context import Context, SwitchState


def sign_on(state: SwitchState, ctx: Context) -> None:
    """Fresh working keys under the TMK; the previous keys stop working (§8)."""
    terminal, f60 = ctx.terminal, ctx.f60
    assert terminal is not None and f60 is not None
    if terminal.tmk is None:
        ctx.decline(ResultCode.TERMINAL_INVALID, "terminal has no TMK")
        return
    mode = f60.nmc
    keys = generate_working_keys(mode)
    terminal.key_mode = mode
    terminal.pik, terminal.mak, terminal.tdk = keys.pik, keys.mak, keys.tdk
    terminal.mac_failures.clear()
    ctx.resp[62] = build_f62(terminal.tmk, mode, keys)
    ctx.change_terminal("terminal_keys", terminal)
    ctx.rc = ResultCode.APPROVED


def sign_off(state: SwitchState, ctx: Context) -> None:
    """0820/002 revokes the working keys (§8)."""
    assert ctx.terminal is not None
    ctx.terminal.revoke_keys()
    ctx.change_terminal("terminal_keys", ctx.terminal)
    ctx.rc = ResultCode.APPROVED


def echo_test(state: SwitchState, ctx: Context) -> None:
    ctx.rc = ResultCode.APPROVED


def _tlv(tag: str, value: bytes) -> bytes:
    return tag.encode() + f"{len(value):03d}".encode() + value


def parameter_download(state: SwitchState, ctx: Context) -> None:
    """F62 = TLV records of §9.3; the terminal is then up to date (header digit 6 = 0)."""
    terminal, merchant = ctx.terminal, ctx.merchant
    assert terminal is not None and merchant is not None
    ctx.resp[62] = b"".join(
        [
            _tlv("01", merchant.shop_name.encode("gbk")),
            _tlv("02", terminal.tid.encode()),
            _tlv("03", merchant.mid.encode()),
            _tlv("04", b"MAIN" if terminal.role == "main" else b"SECONDARY"),
            _tlv("05", (terminal.main_tid or terminal.tid).encode()),
            _tlv("06", rate_percent(merchant.fee_rate).encode()),
            _tlv("07", str(merchant.monthly_limit_fen).encode()),
            _tlv("08", b"156"),
        ]
    )
    terminal.params_version = merchant.params_version
    ctx.change_terminal("terminal_batch", terminal)
    ctx.rc = ResultCode.APPROVED
