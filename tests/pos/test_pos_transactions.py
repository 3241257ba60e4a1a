"""The terminal client's transaction set against the fake switch on a real TCP socket (protocol
§6, §6.1, §7, §11): for each request the MTI, F3, F25, 60.1, F22 and the fields that name the
original (F37, F38, F61) or the destination (F48), the card presented as in the original, and a
request MAC that verifies under the MAK of the sign-on. The fake switch numbers its answers
(RRN, auth code and date differ per STAN) so a follow-up that takes the wrong reference fails."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from switch.core.framing import Frame
from switch.crypto.mac import cup_mac, verify_mac
from switch.crypto.pin import pin_matches
from switch.crypto.working_keys import WorkingKeys
from switch.pos.client import OriginalRef, Response, ResponseTimeout, TerminalClient

TID = "10000001"
MID = "898310048990001"
TMK = bytes.fromhex("E54E7BCB2078DE2AF51B9DA88AB5B395")
CARD = "6222029375642931684"
TRACK = "6222029375642931684=30122011234567890"
CMB = "6214834474520070"
CODE = "134567890123456789"

pytestmark = pytest.mark.anyio


def clear_keys(vectors: dict[str, Any]) -> WorkingKeys:
    v = vectors["sign_on_response_004"]
    return WorkingKeys(bytes.fromhex(v["clear_pik"]), bytes.fromhex(v["clear_mak"]), bytes.fromhex(v["clear_tdk"]))


def numbered(fake_switch: Any, vectors: dict[str, Any]) -> Any:
    """``standard`` answers, but each financial answer carries RRN ``R00000`` + STAN, auth code
    ``A`` + the STAN's last 5 digits and date ``0315``, with a fresh MAC."""
    mak = clear_keys(vectors).mak

    def respond(frame: Frame) -> bytes:
        out = fake_switch.standard(frame)
        mti, req = fake_switch.decode(frame)
        if mti.startswith("08"):
            return out
        rmti, fields = fake_switch.codec.decode(Frame.parse(out[2:]).body)
        stan = str(req[11])
        fields.update({37: f"R00000{stan}", 38: f"A{stan[1:]}", 13: "0315", 64: bytes(8)})
        body = fake_switch.codec.encode(rmti, dict(sorted(fields.items())))
        return fake_switch.reply(frame, body[:-8] + cup_mac(mak, body[:-8]))

    return respond


def sent(fake_switch: Any, index: int) -> tuple[str, dict[int, Any]]:
    return fake_switch.decode(fake_switch.frames[index])  # type: ignore[no-any-return]


def assert_mac_ok(fake_switch: Any, vectors: dict[str, Any], index: int) -> None:
    body = fake_switch.frames[index].body
    assert body[-8:] != bytes(8)
    assert verify_mac(clear_keys(vectors).mak, body[:-8], body[-8:])


def key(mti: str, f: dict[int, Any]) -> tuple[str, str, str, str, str]:
    """(MTI, F3, F25, 60.1, F22)"""
    return mti, f[3], f[25], f[60][:2], f[22]


async def session(fake_switch: Any, vectors: dict[str, Any], steps: Any, mode: str = "003") -> list[Response]:
    out: list[Response] = []
    async with fake_switch.serve(fake_switch.responder(numbered(fake_switch, vectors))) as port:
        client = TerminalClient("127.0.0.1", port, TID, MID, TMK)
        async with client.connect():
            await client.sign_on(mode)
            await steps(client, out)
    return out


async def test_void_of_a_swiped_consume_names_it_by_rrn_batch_stan_and_date(fake_switch, vectors):
    async def steps(c: TerminalClient, out: list[Response]) -> None:
        out.append(await c.consume(CARD, 12345, pin="123456", expiry="3012"))
        out.append(await c.void(out[0], pin="123456"))

    consume, void = await session(fake_switch, vectors, steps)
    mti, f = sent(fake_switch, 2)
    assert key(mti, f) == ("0200", "200000", "00", "23", "021")
    assert f[11] == "000003" and f[60] == "23000001000"
    assert f[37] == "R00000000002" == consume.fields[37]
    assert f[61] == "000001" + "000002" + "0315"
    assert f[4] == "000000012345" and f[35] == TRACK and 2 not in f
    assert not {38, 48} & set(f)
    assert pin_matches(clear_keys(vectors).pik, CARD, f[52], "123456") and f[26] == "12"
    assert_mac_ok(fake_switch, vectors, 2)
    assert void.mti == "0210" and void.mac_ok is True


async def test_void_of_a_manual_consume_keys_the_card_again(fake_switch, vectors):
    async def steps(c: TerminalClient, out: list[Response]) -> None:
        out.append(await c.consume(CMB, 700, entry="manual", expiry="2912"))
        out.append(await c.void(out[0]))

    await session(fake_switch, vectors, steps)
    mti, f = sent(fake_switch, 2)
    assert key(mti, f) == ("0200", "200000", "00", "23", "012")
    assert f[2] == CMB and f[14] == "2912" and 35 not in f and not {26, 52, 53} & set(f)
    assert f[4] == "000000000700" and f[61] == "0000010000020315"
    assert_mac_ok(fake_switch, vectors, 2)


async def test_void_of_an_encrypted_track_consume_encrypts_it_again(fake_switch, vectors):
    t = vectors["track2_tdk_encryption"]
    stans = iter(["000002", "000003"])

    def respond(frame: Frame) -> bytes:
        if frame.body[:2] == b"\x08\x00":
            return fake_switch.standard(frame)  # type: ignore[no-any-return]
        # the codec cannot decode an encrypted F35: answer the approved vector for the next STAN
        approved = fake_switch.reencode(vectors["consume_response_approved"]["frame_hex"], f11=next(stans))
        return fake_switch.reply(frame, approved)  # type: ignore[no-any-return]

    async with fake_switch.serve(fake_switch.responder(respond)) as port:
        client = TerminalClient("127.0.0.1", port, TID, MID, TMK)
        async with client.connect():
            await client.sign_on("004")
            consume = await client.consume(CARD, 12345, track2=t["track_odd"], encrypt_track=True)
            ref = client.original_of(consume)
            void = await client.void(consume)
    assert ref.track2 == t["track_odd"] and ref.encrypted_track and ref.card == CARD
    assert void.request_fields[35] == t["track_odd_encrypted"] == consume.request_fields[35]
    assert void.request_fields[53] == "0610000000000000"
    assert void.request_fields[37] == "112610160201" and void.request_fields[61] == "0000010000021126"
    assert void.request_fields[3] == "200000" and void.code == "00"
    packed = bytes.fromhex(t["track_odd_encrypted"] + "0")
    assert bytes([0x37]) + packed in fake_switch.frames[2].body  # on the wire, encrypted again


async def test_scan_to_pay_and_its_void(fake_switch, vectors):
    async def steps(c: TerminalClient, out: list[Response]) -> None:
        out.append(await c.scan_to_pay(CODE, 1234))
        out.append(await c.void(out[0]))

    scan, void = await session(fake_switch, vectors, steps)
    mti, f = sent(fake_switch, 1)
    assert key(mti, f) == ("0200", "000000", "00", "22", "032")
    assert f[2] == CODE and f[4] == "000000001234"
    assert not {14, 35, 26, 52, 53, 37, 61} & set(f)
    assert_mac_ok(fake_switch, vectors, 1)
    assert scan.mac_ok is True
    mti, v = sent(fake_switch, 2)
    assert key(mti, v) == ("0200", "200000", "00", "23", "032")
    assert v[2] == CODE and not {14, 35, 52} & set(v)
    assert v[37] == "R00000000002" and v[61] == "0000010000020315" and v[4] == "000000001234"
    assert_mac_ok(fake_switch, vectors, 2)


async def test_a_payment_code_takes_no_pin(fake_switch, vectors):
    async def steps(c: TerminalClient, out: list[Response]) -> None:
        scan = await c.scan_to_pay(CODE, 100)
        before = c.next_stan
        with pytest.raises(ValueError, match="no PIN"):
            await c.void(scan, pin="123456")
        with pytest.raises(ValueError, match="no PIN"):
            c.card_fields(processing_code="000000", type_code="22", card=CODE, amount_fen=1, entry="scan",
                          expiry="3012")
        assert c.next_stan == before  # refused before a trace number was used

    await session(fake_switch, vectors, steps)
    assert len(fake_switch.frames) == 2


async def test_refund_names_the_original_by_rrn_and_date_only(fake_switch, vectors):
    async def steps(c: TerminalClient, out: list[Response]) -> None:
        out.append(await c.consume(CARD, 12345, expiry="3012"))
        out.append(await c.refund(out[0], 2000))

    _, refund = await session(fake_switch, vectors, steps)
    mti, f = sent(fake_switch, 2)
    assert key(mti, f) == ("0220", "200000", "00", "25", "022")
    assert f[37] == "R00000000002" and f[61] == "000000" + "000000" + "0315"
    assert f[4] == "000000002000" and f[35] == TRACK and f[60] == "25000001000"
    assert_mac_ok(fake_switch, vectors, 2)
    assert refund.mti == "0230" and refund.code == "00"


async def test_pre_auth_then_its_void(fake_switch, vectors):
    async def steps(c: TerminalClient, out: list[Response]) -> None:
        out.append(await c.pre_auth(CARD, 50000, pin="123456", expiry="3012"))
        out.append(await c.pre_auth_void(out[0], pin="123456"))

    pre, pvoid = await session(fake_switch, vectors, steps)
    mti, f = sent(fake_switch, 1)
    assert key(mti, f) == ("0100", "030000", "06", "10", "021")
    assert f[4] == "000000050000" and not {37, 38, 61} & set(f)
    assert_mac_ok(fake_switch, vectors, 1)
    assert pre.mti == "0110" and pre.fields[38] == "A00002"
    mti, v = sent(fake_switch, 2)
    assert key(mti, v) == ("0100", "200000", "06", "11", "021")
    assert v[38] == "A00002" and v[61] == "000001" + "000002" + "0315" and v[4] == "000000050000"
    assert 37 not in v and pin_matches(clear_keys(vectors).pik, CARD, v[52], "123456")
    assert_mac_ok(fake_switch, vectors, 2)
    assert pvoid.mti == "0110"


async def test_completion_request_advice_and_completion_void(fake_switch, vectors):
    async def steps(c: TerminalClient, out: list[Response]) -> None:
        pre = await c.pre_auth(CARD, 50000, expiry="3012")
        out.append(await c.completion(pre, 57500))
        out.append(await c.completion_void(out[0]))
        out.append(await c.completion(pre, 40000, advice=True))

    completion, cvoid, advice = await session(fake_switch, vectors, steps)
    mti, f = sent(fake_switch, 2)
    assert key(mti, f) == ("0200", "000000", "06", "20", "022")
    assert f[38] == "A00002" and f[61] == "0000010000020315" and f[4] == "000000057500" and 37 not in f
    assert_mac_ok(fake_switch, vectors, 2)
    assert completion.mti == "0210"
    mti, v = sent(fake_switch, 3)
    assert key(mti, v) == ("0200", "200000", "06", "21", "022")
    assert v[37] == "R00000000003" and v[61] == "000001" + "000003" + "0315" and v[4] == "000000057500"
    assert 38 not in v and v[35] == TRACK
    assert_mac_ok(fake_switch, vectors, 3)
    assert cvoid.mti == "0210"
    mti, a = sent(fake_switch, 4)
    assert key(mti, a) == ("0220", "000000", "06", "24", "022")
    assert a[38] == "A00002" and a[61] == "0000010000020315" and a[4] == "000000040000"
    assert_mac_ok(fake_switch, vectors, 4)
    assert advice.mti == "0230"


async def test_transfer_carries_the_destination_in_f48(fake_switch, vectors):
    async def steps(c: TerminalClient, out: list[Response]) -> None:
        out.append(await c.transfer(CARD, 100000, CMB, pin="123456", expiry="3012"))

    (transfer,) = await session(fake_switch, vectors, steps, mode="004")
    mti, f = sent(fake_switch, 1)
    assert key(mti, f) == ("0200", "400000", "00", "49", "021")
    assert f[48] == CMB and f[4] == "000000100000" and f[35] == TRACK
    assert_mac_ok(fake_switch, vectors, 1)
    assert transfer.mac_ok is True


async def test_reverse_repeats_the_original_as_carried_with_38_and_61(fake_switch, vectors):
    async def steps(c: TerminalClient, out: list[Response]) -> None:
        pre = await c.pre_auth(CARD, 50000, pin="123456", expiry="3012")
        completion = await c.completion(pre, 50000)
        out.append(completion)
        out.append(await c.reverse(completion))
        transfer = await c.transfer(CMB, 100, CARD, entry="manual", expiry="2912")
        out.append(transfer)
        out.append(await c.reverse(transfer, "A0"))

    completion, rev, transfer, rev2 = await session(fake_switch, vectors, steps)
    mti, r = sent(fake_switch, 3)
    orig = completion.request_fields
    assert mti == "0400" and rev.mti == "0410" and r[39] == "98"
    assert {k: r[k] for k in (3, 4, 11, 22, 25, 38, 49, 60, 61)} == {
        k: orig[k] for k in (3, 4, 11, 22, 25, 38, 49, 60, 61)}
    assert not {2, 35, 37, 52, 53} & set(r)  # a swiped original carried no F2
    assert_mac_ok(fake_switch, vectors, 3)
    mti, r2 = sent(fake_switch, 5)
    assert mti == "0400" and r2[39] == "A0" and r2[2] == CMB and r2[14] == "2912"
    assert r2[3] == "400000" and r2[60] == "49000001000" and r2[11] == transfer.request_fields[11]
    assert 48 not in r2  # §11 does not repeat the destination
    assert rev2.code == "00"


async def test_follow_ups_from_a_slip_typed_in_by_hand(fake_switch, vectors):
    """An OriginalRef built from printed references gives the same fields as the Response."""
    async def steps(c: TerminalClient, out: list[Response]) -> None:
        consume = await c.consume(CARD, 12345, expiry="3012")
        out.append(await c.void(consume))
        ref = OriginalRef(card=CARD, amount_fen=12345, expiry="3012", rrn="R00000000002", batch="000001",
                          stan="000002", date="0315")
        out.append(await c.void(ref))
        before = c.next_stan
        with pytest.raises(ValueError, match="RRN"):
            await c.void(OriginalRef(card=CARD, amount_fen=1, expiry="3012", batch="000001", stan="000002"))
        with pytest.raises(ValueError, match="date"):
            await c.refund(OriginalRef(card=CARD, amount_fen=None, expiry="3012", rrn="R00000000002"), 100)
        with pytest.raises(ValueError, match="auth code"):
            await c.completion(OriginalRef(card=CARD, amount_fen=1, expiry="3012", batch="000001",
                                           stan="000002", date="0315"), 100)
        assert c.next_stan == before

    from_resp, from_ref = await session(fake_switch, vectors, steps)
    drop = (11, 64)
    assert {k: v for k, v in from_resp.request_fields.items() if k not in drop} == {
        k: v for k, v in from_ref.request_fields.items() if k not in drop}
    assert from_ref.request_fields[61] == "0000010000020315"
    assert "622202****1684" in repr(OriginalRef(card=CARD, amount_fen=1, track2=TRACK))
    assert CARD not in repr(OriginalRef(card=CARD, amount_fen=1, track2=TRACK))


async def test_a_timeout_carries_the_request_so_the_terminal_can_reverse_it(fake_switch, vectors):
    timed_out = anyio.Event()

    async def handler(conn: Any) -> None:
        signon = await conn.recv()
        await conn.send(fake_switch.standard(signon))
        pre = await conn.recv()  # never answered
        fake_switch.frames.append(pre)
        await timed_out.wait()
        rev = await conn.recv()
        fake_switch.frames.append(rev)
        await conn.send(fake_switch.standard(rev))
        await conn.recv()

    async with fake_switch.serve(handler) as port:
        client = TerminalClient("127.0.0.1", port, TID, MID, TMK)
        async with client.connect():
            await client.sign_on("003")
            with pytest.raises(ResponseTimeout) as info:
                await client.pre_auth(CARD, 50000, expiry="3012", timeout=0.2)
            timed_out.set()
            rev = await client.reversal(info.value.request_fields, "98")
    assert info.value.mti == "0100" and isinstance(info.value, TimeoutError)
    assert CARD not in str(info.value) and "000002" in str(info.value)
    mti, r = sent(fake_switch, 1)
    assert mti == "0400" and r[3] == "030000" and r[25] == "06" and r[11] == "000002" and r[39] == "98"
    assert rev.code == "00"


async def test_an_error_inside_the_connection_block_comes_out_as_raised(fake_switch):
    """Not wrapped in an ExceptionGroup by the reader's task group, so callers (and the CLI's
    exit codes) can catch TimeoutError, ValueError, ... around ``async with client.connect()``."""
    async with fake_switch.serve(fake_switch.responder(fake_switch.standard)) as port:
        client = TerminalClient("127.0.0.1", port, TID, MID, TMK)
        with pytest.raises(ValueError, match="no PIN"):
            async with client.connect():
                await client.sign_on("003")
                client.card_fields(processing_code="000000", type_code="22", card=CODE, amount_fen=1,
                                   entry="scan", pin="123456")
