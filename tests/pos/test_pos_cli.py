"""``switch pos`` (switch/pos/cli.py): amount parsing, exit codes, and whole sessions against the
fake switch on a real socket (the CLI runs its own event loop, so it runs in a worker thread)."""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
import pytest

from switch.core.framing import encode_frame
from switch.pos.cli import parse_amount_fen, pos_main

CARD = "6222029375642931684"


@pytest.mark.parametrize(
    ("text", "fen"),
    [("123.45", 12345), ("0.01", 1), ("100", 10000), ("1.5", 150), ("1.50", 150), ("007.00", 700),
     ("9999999999.99", 999_999_999_999)],
)
def test_parse_amount_fen(text: str, fen: int) -> None:
    assert parse_amount_fen(text) == fen


@pytest.mark.parametrize(
    "text",
    ["", "1.234", "0", "0.00", "-1", "+1", "abc", "1e3", "NaN", "inf", "1,000.00", " 1.00", "1.", ".5",
     "1..2", "１２", "10000000000.00"],
)
def test_parse_amount_fen_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_amount_fen(text)


def test_bad_amount_is_a_usage_error(capsys) -> None:
    assert pos_main(["consume", "--card", CARD, "--amount", "1.234"]) == 2
    assert "2 decimals" in capsys.readouterr().err


def test_unknown_terminal_without_mid_is_a_usage_error(capsys) -> None:
    assert pos_main(["--tid", "99999999", "echo"]) == 2
    assert "--mid" in capsys.readouterr().err


@pytest.mark.anyio
async def test_connection_refused_exits_2_with_a_message(capsys) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    code = await anyio.to_thread.run_sync(pos_main, ["--port", str(port), "echo"])
    assert code == 2
    assert f"cannot connect to 127.0.0.1:{port}" in capsys.readouterr().err


async def run_cli(port: int, *args: str) -> int:
    return await anyio.to_thread.run_sync(partial(pos_main, ["--port", str(port), *args]))



@pytest.mark.anyio
async def test_consume_signs_on_then_prints_the_slip(fake_switch, vectors, capsys) -> None:
    async with fake_switch.serve(fake_switch.responder(fake_switch.standard)) as port:
        code = await run_cli(port, "--mode", "004", "consume", "--card", CARD, "--amount", "123.45",
                             "--pin", "123456")
    out = capsys.readouterr().out
    assert code == 0
    frames = [encode_frame(f.tpdu, f.header, f.body) for f in fake_switch.frames]
    assert frames[0] == bytes.fromhex(vectors["sign_on_request_004"]["frame_hex"])
    assert frames[1] == bytes.fromhex(vectors["consume_request_swipe_pin"]["frame_hex"])
    assert fake_switch.connections == 1  # sign-on and consume on the same connection
    assert "老王便利店" in out and "RMB 123.45" in out and "622202****1684" in out
    assert "00 Approved" in out and CARD not in out and "123456" not in out


@pytest.mark.anyio
async def test_declined_consume_exits_1(fake_switch, vectors, capsys) -> None:
    declined = fake_switch.reencode(vectors["consume_response_declined_51"]["frame_hex"], f11="000002")

    def respond(frame: Any) -> bytes:
        mti, _ = fake_switch.decode(frame)
        return fake_switch.standard(frame) if mti == "0800" else fake_switch.reply(frame, declined)

    async with fake_switch.serve(fake_switch.responder(respond)) as port:
        code = await run_cli(port, "consume", "--card", CARD, "--amount", "123.45")
    assert code == 1
    assert "51 Insufficient funds" in capsys.readouterr().out


@pytest.mark.anyio
async def test_approval_with_a_bad_mac_is_reversed_with_a0(fake_switch, vectors, capsys) -> None:
    approved = fake_switch.reencode(vectors["consume_response_approved"]["frame_hex"])
    tampered = approved[:-1] + bytes([approved[-1] ^ 0x01])

    def respond(frame: Any) -> bytes:
        mti, _ = fake_switch.decode(frame)
        return fake_switch.reply(frame, tampered) if mti == "0200" else fake_switch.standard(frame)

    async with fake_switch.serve(fake_switch.responder(respond)) as port:
        code = await run_cli(port, "--mode", "004", "consume", "--card", CARD, "--amount", "123.45")
    assert code == 1
    mti, rev = fake_switch.decode(fake_switch.frames[2])
    assert mti == "0400" and rev[39] == "A0" and rev[11] == "000002"
    assert "MAC invalid" in capsys.readouterr().err


@pytest.mark.anyio
@pytest.mark.parametrize(("action", "mti", "nmc"), [("sign-on", "0800", "003"), ("echo", "0820", "301"),
                                                    ("sign-off", "0820", "002")])
async def test_management_actions(fake_switch, capsys, action: str, mti: str, nmc: str) -> None:
    async with fake_switch.serve(fake_switch.responder(fake_switch.standard)) as port:
        code = await run_cli(port, action)
    assert code == 0
    got_mti, fields = fake_switch.decode(fake_switch.frames[-1])
    assert (got_mti, fields[60][8:11]) == (mti, nmc)
    out = capsys.readouterr().out
    assert "SIGNED ON: batch 000001" in out and "00 Approved" in out


@pytest.mark.anyio
async def test_balance_manual_entry(fake_switch, capsys) -> None:
    async with fake_switch.serve(fake_switch.responder(fake_switch.standard)) as port:
        code = await run_cli(port, "balance", "--card", "6214834474520070", "--entry", "manual",
                             "--pin", "888888")
    assert code == 0
    _, fields = fake_switch.decode(fake_switch.frames[1])
    assert fields[3] == "310000" and fields[2] == "6214834474520070" and fields[14] == "2912"
    assert "RMB 999876.55" in capsys.readouterr().out


@pytest.mark.anyio
async def test_swipe_of_an_unknown_card_needs_expiry(fake_switch, capsys) -> None:
    async with fake_switch.serve(fake_switch.responder(fake_switch.standard)) as port:
        code = await run_cli(port, "consume", "--card", "4111237450925694", "--amount", "1")
    assert code == 2
    assert "--expiry" in capsys.readouterr().err


@pytest.mark.anyio
async def test_trace_number_survives_between_runs(fake_switch, tmp_path, capsys) -> None:
    """Two runs never reuse a STAN (the switch would take the second for a duplicate, §11)."""
    async with fake_switch.serve(fake_switch.responder(fake_switch.standard)) as port:
        assert await run_cli(port, "--state-dir", str(tmp_path / "s"), "echo") == 0
        assert await run_cli(port, "--state-dir", str(tmp_path / "s"), "echo") == 0
    stans = [fake_switch.decode(f)[1][11] for f in fake_switch.frames]
    assert stans == ["000001", "000002", "000003", "000004"]
    assert len(set(stans)) == len(stans)
