"""``switch pos`` actions for the whole transaction set (switch/pos/cli.py) against the fake
switch on a real socket: each action's arguments become the right message (MTI, F3, F25, 60.1,
F22 and the F37/F38/F48/F61 that name the original or the destination, with a valid MAC), the
slip names the transaction and the original's references, usage errors exit 2, and an
unanswered or badly MACed reversible request is reversed (§11)."""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
import pytest

from switch.crypto.mac import verify_mac
from switch.crypto.pin import pin_matches
from switch.crypto.working_keys import WorkingKeys
from switch.pos.cli import pos_main

CARD = "6222029375642931684"
TRACK = "6222029375642931684=30122011234567890"
CMB = "6214834474520070"
CODE = "284567890123456789"
RRN = "112610160201"


def clear_keys(vectors: dict[str, Any]) -> WorkingKeys:
    v = vectors["sign_on_response_004"]
    return WorkingKeys(bytes.fromhex(v["clear_pik"]), bytes.fromhex(v["clear_mak"]), bytes.fromhex(v["clear_tdk"]))


async def run_cli(port: int, *args: str) -> int:
    return await anyio.to_thread.run_sync(partial(pos_main, ["--port", str(port), *args]))


# (argv, MTI, F3, F25, 60.1, F22, fields expected as given, fields that must be absent, slip texts)
CASES: list[tuple[list[str], str, str, str, str, str, dict[int, str], set[int], list[str]]] = [
    (["void", "--rrn", RRN, "--stan", "2", "--card", CARD, "--amount", "123.45", "--pin", "123456"],
     "0200", "200000", "00", "23", "021", {37: RRN, 61: "000001000002", 4: "000000012345", 35: TRACK},
     {2, 38, 48}, ["撤销 VOID", f"原参考号 ORIG RRN   : {RRN}", "原凭证号 ORIG TRACE : 000002", "RMB 123.45"]),
    (["void", "--rrn", RRN, "--stan", "000002", "--batch", "7", "--date", "11/26", "--card", CODE,
      "--entry", "scan", "--amount", "12.34"],
     "0200", "200000", "00", "23", "032", {37: RRN, 61: "000007" "000002" "1126", 2: CODE}, {14, 35, 52},
     ["撤销 VOID", "原批次号 ORIG BATCH : 000007", "原交易日期 ORIG DATE: 11/26"]),
    (["refund", "--rrn", RRN, "--date", "1126", "--card", CARD, "--amount", "20"],
     "0220", "200000", "00", "25", "022", {37: RRN, 61: "0000000000001126", 4: "000000002000"}, {38, 52},
     ["退货 REFUND", f"原参考号 ORIG RRN   : {RRN}", "RMB 20.00"]),
    (["pre-auth", "--card", CARD, "--amount", "500", "--pin", "123456"],
     "0100", "030000", "06", "10", "021", {4: "000000050000"}, {37, 38, 61}, ["预授权 PRE-AUTH", "RMB 500.00"]),
    (["pre-auth-void", "--auth-code", "A1B2C3", "--stan", "5", "--date", "1126", "--card", CARD, "--amount", "500"],
     "0100", "200000", "06", "11", "022", {38: "A1B2C3", 61: "0000010000051126", 4: "000000050000"}, {37},
     ["预授权撤销 PRE-AUTH VOID", "原授权码 ORIG AUTH  : A1B2C3"]),
    (["completion", "--auth-code", "A1B2C3", "--stan", "5", "--batch", "3", "--date", "1126", "--card", CMB,
      "--entry", "manual", "--amount", "575"],
     "0200", "000000", "06", "20", "012", {38: "A1B2C3", 61: "0000030000051126", 2: CMB, 14: "2912"}, {35, 37},
     ["预授权完成(请求)", "原授权码 ORIG AUTH  : A1B2C3"]),
    (["completion", "--advice", "--auth-code", "A1B2C3", "--stan", "5", "--date", "1126", "--card", CARD,
      "--amount", "400"],
     "0220", "000000", "06", "24", "022", {38: "A1B2C3", 61: "0000010000051126", 4: "000000040000"}, {37},
     ["预授权完成(通知)"]),
    (["completion-void", "--rrn", RRN, "--stan", "6", "--card", CARD, "--amount", "575"],
     "0200", "200000", "06", "21", "022", {37: RRN, 61: "000001000006", 4: "000000057500"}, {38},
     ["预授权完成撤销", f"原参考号 ORIG RRN   : {RRN}"]),
    (["transfer", "--card", CARD, "--to", CMB, "--amount", "1000", "--pin", "123456"],
     "0200", "400000", "00", "49", "021", {48: CMB, 4: "000000100000"}, {37, 38, 61},
     ["转账 TRANSFER", "转入卡号 TO CARD  : 621483****0070"]),
    (["scan", "--code", CODE, "--amount", "12.34"],
     "0200", "000000", "00", "22", "032", {2: CODE, 4: "000000001234"}, {14, 35, 26, 52, 53},
     ["扫码支付 SCAN-TO-PAY", "RMB 12.34"]),
]


@pytest.mark.anyio
@pytest.mark.parametrize("case", CASES, ids=[" ".join(c[0][:2]) for c in CASES])
async def test_action_sends_its_message(fake_switch, vectors, capsys, case: Any) -> None:
    argv, mti, pcode, f25, f60_1, f22, given, absent, slip_texts = case
    async with fake_switch.serve(fake_switch.responder(fake_switch.standard)) as port:
        code = await run_cli(port, *argv)
    out = capsys.readouterr().out
    assert code == 0, out
    assert len(fake_switch.frames) == 2  # sign-on, then the action
    got_mti, f = fake_switch.decode(fake_switch.frames[1])
    assert (got_mti, f[3], f[25], f[60][:2], f[22]) == (mti, pcode, f25, f60_1, f22)
    assert f[11] == "000002" and f[41] == "10000001" and f[49] == "156"
    assert {k: f.get(k) for k in given} == given
    assert not absent & set(f)
    body = fake_switch.frames[1].body
    assert verify_mac(clear_keys(vectors).mak, body[:-8], body[-8:])
    if "--pin" in argv:
        assert pin_matches(clear_keys(vectors).pik, CARD, f[52], "123456")
    for text in slip_texts:
        assert text in out, text
    assert "00 Approved" in out
    if argv[0] == "refund":
        assert "ORIG BATCH" not in out and "ORIG TRACE" not in out  # named by RRN and date only
    assert CARD not in out and CMB not in out and "123456" not in out


@pytest.mark.anyio
async def test_reverse_rebuilds_the_original_with_reason_96(fake_switch, capsys) -> None:
    async with fake_switch.serve(fake_switch.responder(fake_switch.standard)) as port:
        code = await run_cli(port, "reverse", "--type", "pre-auth", "--stan", "5", "--card", CARD,
                             "--amount", "500")
        code2 = await run_cli(port, "reverse", "--type", "completion", "--stan", "9", "--batch", "2",
                              "--card", CMB, "--entry", "manual", "--amount", "1", "--reason", "98")
    out = capsys.readouterr().out
    assert (code, code2) == (0, 0)
    mti, r = fake_switch.decode(fake_switch.frames[1])
    assert mti == "0400" and r[39] == "96" and r[11] == "000005"
    assert (r[3], r[25], r[60], r[4], r[22]) == ("030000", "06", "10000001000", "000000050000", "022")
    assert not {2, 35, 52} & set(r)  # a swiped original's 0400 carries no card number (§11)
    mti, r2 = fake_switch.decode(fake_switch.frames[3])
    assert mti == "0400" and r2[39] == "98" and r2[11] == "000009"
    assert (r2[3], r2[25], r2[60], r2[2], r2[14]) == ("000000", "06", "20000002000", CMB, "2912")
    assert "冲正 REVERSAL" in out and "原凭证号 ORIG TRACE : 000005" in out


@pytest.mark.anyio
async def test_slip_tells_how_to_chain_the_next_step(fake_switch, capsys) -> None:
    async with fake_switch.serve(fake_switch.responder(fake_switch.standard)) as port:
        assert await run_cli(port, "consume", "--card", CARD, "--amount", "1") == 0
    out = capsys.readouterr().out
    assert "下一步 NEXT: switch pos void --rrn 112610160201 --stan 000002 --batch 000001 --date 1126" in out
    assert "refund --rrn 112610160201 --date 1126" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["void", "--rrn", "1234", "--stan", "2", "--card", CARD, "--amount", "1"],  # RRN not 12
        ["void", "--rrn", RRN, "--card", CARD, "--amount", "1"],  # no --stan
        ["void", "--rrn", RRN, "--stan", "1234567", "--card", CARD, "--amount", "1"],
        ["refund", "--rrn", RRN, "--card", CARD, "--amount", "1"],  # no --date
        ["refund", "--rrn", RRN, "--date", "1326", "--card", CARD, "--amount", "1"],
        ["pre-auth-void", "--auth-code", "A1B2", "--stan", "2", "--date", "1126", "--card", CARD, "--amount", "1"],
        ["completion", "--stan", "2", "--date", "1126", "--card", CARD, "--amount", "1"],  # no --auth-code
        ["transfer", "--card", CARD, "--amount", "1"],  # no --to
        ["scan", "--code", "12345", "--amount", "1"],
        ["reverse", "--type", "refund", "--stan", "2", "--card", CARD, "--amount", "1"],  # not reversible
        ["reverse", "--type", "consume", "--stan", "2", "--card", CARD, "--amount", "1", "--pin", "123456"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys) -> None:
    assert pos_main(["--port", "1", *argv]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.anyio
async def test_a_request_the_client_refuses_exits_2(fake_switch, capsys) -> None:
    async with fake_switch.serve(fake_switch.responder(fake_switch.standard)) as port:
        code = await run_cli(port, "void", "--rrn", RRN, "--stan", "2", "--card", CODE, "--entry", "scan",
                             "--amount", "1", "--pin", "123456")
    assert code == 2
    assert "no PIN" in capsys.readouterr().err
    assert len(fake_switch.frames) == 1  # only the sign-on went out


@pytest.mark.anyio
async def test_unanswered_pre_auth_is_reversed_98_and_exits_2(fake_switch, capsys) -> None:
    def respond(frame: Any) -> bytes | None:
        mti, _ = fake_switch.decode(frame)
        return b"" if mti == "0100" else fake_switch.standard(frame)  # 0100: sent nothing back

    async with fake_switch.serve(fake_switch.responder(respond)) as port:
        code = await run_cli(port, "--timeout", "0.3", "pre-auth", "--card", CARD, "--amount", "500")
    assert code == 2
    mti, rev = fake_switch.decode(fake_switch.frames[2])
    assert mti == "0400" and rev[39] == "98" and rev[11] == "000002" and rev[3] == "030000" and rev[25] == "06"
    err = capsys.readouterr().err
    assert "冲正 REVERSAL: 00" in err and "no response" in err


@pytest.mark.anyio
async def test_approved_transfer_with_a_bad_mac_is_reversed_a0(fake_switch, capsys) -> None:
    def respond(frame: Any) -> bytes:
        out: bytes = fake_switch.standard(frame)
        mti, _ = fake_switch.decode(frame)
        return out[:-1] + bytes([out[-1] ^ 0x01]) if mti == "0200" else out

    async with fake_switch.serve(fake_switch.responder(respond)) as port:
        code = await run_cli(port, "transfer", "--card", CARD, "--to", CMB, "--amount", "1")
    assert code == 1
    mti, rev = fake_switch.decode(fake_switch.frames[2])
    assert mti == "0400" and rev[39] == "A0" and rev[3] == "400000" and rev[11] == "000002"
    assert "MAC invalid" in capsys.readouterr().err


@pytest.mark.anyio
async def test_completion_advice_with_a_bad_mac_is_not_reversed(fake_switch, capsys) -> None:
    """An advice is not reversible (§6): the terminal reports the bad MAC and sends nothing more."""
    def respond(frame: Any) -> bytes:
        out: bytes = fake_switch.standard(frame)
        mti, _ = fake_switch.decode(frame)
        return out[:-1] + bytes([out[-1] ^ 0x01]) if mti == "0220" else out

    async with fake_switch.serve(fake_switch.responder(respond)) as port:
        code = await run_cli(port, "completion", "--advice", "--auth-code", "A1B2C3", "--stan", "5",
                             "--date", "1126", "--card", CARD, "--amount", "1")
    assert code == 1
    assert len(fake_switch.frames) == 2
    assert "MAC invalid" in capsys.readouterr().err
