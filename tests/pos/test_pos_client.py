"""The terminal client against a fake switch on a real TCP socket (protocol §1, §2, §6, §8, §10,
§11): golden request bytes, key parsing, matching on F11 with responses out of order, one-shot
connections, field rules for entry modes and PINs, and no secrets in logs or reprs."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

from switch.core.framing import encode_frame
from switch.crypto.mac import verify_mac
from switch.crypto.pin import pin_matches
from switch.crypto.working_keys import WorkingKeys, build_f62
from switch.pos.client import NotSignedOnError, TerminalClient, TerminalConnectionError, build_track2

TID = "10000001"
MID = "898310048990001"
TMK = bytes.fromhex("E54E7BCB2078DE2AF51B9DA88AB5B395")
CARD = "6222029375642931684"
TRACK = "6222029375642931684=30122011234567890"

pytestmark = pytest.mark.anyio


def client_for(port: int, **kw: Any) -> TerminalClient:
    return TerminalClient("127.0.0.1", port, TID, MID, TMK, **kw)


def clear_keys(vectors: dict[str, Any]) -> WorkingKeys:
    v = vectors["sign_on_response_004"]
    return WorkingKeys(bytes.fromhex(v["clear_pik"]), bytes.fromhex(v["clear_mak"]), bytes.fromhex(v["clear_tdk"]))


def frame_bytes(frame: Any) -> bytes:
    return encode_frame(frame.tpdu, frame.header, frame.body)


async def test_sign_on_request_is_the_golden_frame_and_f62_gives_the_clear_keys(fake_switch, vectors):
    signon_resp = bytes.fromhex(vectors["sign_on_response_004"]["frame_hex"])
    async with fake_switch.serve(fake_switch.responder(lambda f: signon_resp)) as port:
        client = client_for(port)
        async with client.connect():
            resp = await client.sign_on("004")
    assert frame_bytes(fake_switch.frames[0]) == bytes.fromhex(vectors["sign_on_request_004"]["frame_hex"])
    assert resp.code == "00" and resp.mti == "0810"
    keys = clear_keys(vectors)
    assert client.keys is not None
    assert (client.keys.pik, client.keys.mak, client.keys.tdk) == (keys.pik, keys.mak, keys.tdk)
    assert client.key_mode == "004"
    assert client.batch == "000001"
    assert client.next_stan == 2
    assert resp.header_digit6 == 0 and resp.raw == signon_resp


async def test_sign_on_takes_the_batch_from_60_2(fake_switch, vectors):
    body = fake_switch.reencode(vectors["sign_on_response_004"]["frame_hex"], f60="00000042004")

    def respond(frame):
        mti, _ = fake_switch.decode(frame)
        return fake_switch.reply(frame, body) if mti == "0800" else fake_switch.standard(frame)

    async with fake_switch.serve(fake_switch.responder(respond)) as port:
        client = client_for(port)
        async with client.connect():
            await client.sign_on("004")
            assert client.batch == "000042"
            await client.consume(CARD, 100, expiry="3012")
    _, consume = fake_switch.decode(fake_switch.frames[1])
    assert consume[60] == "22000042000"


async def test_sign_on_with_a_wrong_check_value_keeps_no_keys(fake_switch, vectors):
    f62 = bytearray(bytes.fromhex(vectors["sign_on_response_004"]["fields"]["62"]))
    f62[16] ^= 0xFF  # first byte of the PIK check value
    body = fake_switch.reencode(vectors["sign_on_response_004"]["frame_hex"], f62=bytes(f62))
    async with fake_switch.serve(fake_switch.responder(lambda f: fake_switch.reply(f, body))) as port:
        client = client_for(port)
        async with client.connect():
            with pytest.raises(ValueError, match="PIK check value"):
                await client.sign_on("004")
    assert client.keys is None and not client.signed_on


async def test_consume_is_the_golden_frame_and_the_response_mac_verifies(fake_switch, vectors):
    v = vectors["consume_request_swipe_pin"]
    answers = {
        "0800": bytes.fromhex(vectors["sign_on_response_004"]["frame_hex"]),
        "0200": bytes.fromhex(vectors["consume_response_approved"]["frame_hex"]),
    }
    async with fake_switch.serve(
        fake_switch.responder(lambda f: answers[fake_switch.decode(f)[0]])
    ) as port:
        client = client_for(port)
        async with client.connect():
            await client.sign_on("004")
            resp = await client.consume(CARD, 12345, pin="123456", expiry="3012")
            resp2 = await client.consume(CARD, 12345, pin="123456", track2=TRACK, oneshot=True)
    sent = frame_bytes(fake_switch.frames[1])
    assert sent == bytes.fromhex(v["frame_hex"])
    assert resp.code == "00" and resp.fields[38] == "A1B2C3"
    assert resp.mac_ok is True
    assert resp.request_fields[52] == bytes.fromhex(v["fields"]["52"])
    # the explicit track gives the same message (STAN 000003, so compare all but F11 and F64)
    _, f1 = fake_switch.decode(fake_switch.frames[1])
    _, f2 = fake_switch.decode(fake_switch.frames[2])
    assert f2[11] == "000003" and resp2.code == "00"
    assert {k: x for k, x in f1.items() if k not in (11, 64)} == {k: x for k, x in f2.items() if k not in (11, 64)}
    # and the switch side of the contract accepts it: MAC and PIN block check out
    keys = clear_keys(vectors)
    body = fake_switch.frames[2].body
    assert verify_mac(keys.mak, body[:-8], body[-8:])
    assert pin_matches(keys.pik, CARD, f2[52], "123456")


async def test_a_response_with_a_wrong_mac_is_flagged(fake_switch, vectors):
    good = fake_switch.reencode(vectors["consume_response_approved"]["frame_hex"])
    bad = good[:-1] + bytes([good[-1] ^ 0x01])

    def respond(frame):
        mti, _ = fake_switch.decode(frame)
        return fake_switch.standard(frame) if mti == "0800" else fake_switch.reply(frame, bad)

    async with fake_switch.serve(fake_switch.responder(respond)) as port:
        client = client_for(port)
        async with client.connect():
            await client.sign_on("004")
            resp = await client.consume(CARD, 12345, pin="123456", expiry="3012")
    assert resp.code == "00" and resp.mac_ok is False


async def test_two_requests_in_flight_answered_in_reverse_order_reach_their_callers(fake_switch):
    answered: list[str] = []

    async def handler(conn):
        first = await conn.recv()
        assert first is not None
        await conn.send(fake_switch.standard(first))  # sign-on
        pending = [await conn.recv(), await conn.recv()]
        for frame in reversed(pending):
            assert frame is not None
            answered.append(fake_switch.decode(frame)[1][11])
            await conn.send(fake_switch.standard(frame))
        await conn.recv()  # until the client closes

    results: dict[int, Any] = {}
    async with fake_switch.serve(handler) as port:
        client = client_for(port)
        async with client.connect():
            await client.sign_on("004")

            async def buy(amount: int) -> None:
                results[amount] = await client.consume(CARD, amount, pin="123456", expiry="3012")

            with anyio.fail_after(10):  # guard only: a serialising client would hang here
                async with anyio.create_task_group() as tg:
                    tg.start_soon(buy, 100)
                    tg.start_soon(buy, 200)
    assert sorted(results) == [100, 200]
    for amount, resp in results.items():
        assert resp.fields[4] == f"{amount:012d}"
        assert resp.stan == resp.request_fields[11]
        assert resp.mac_ok is True
    assert answered == sorted(answered, reverse=True)  # the later STAN was answered first
    assert {results[100].stan, results[200].stan} == set(answered)


async def test_oneshot_opens_a_connection_per_request(fake_switch):
    def respond(frame):
        out = fake_switch.standard(frame)
        return out

    async def handler(conn):  # one frame, one answer, then close (a one-shot switch peer)
        frame = await conn.recv()
        if frame is not None:
            fake_switch.frames.append(frame)
            await conn.send(respond(frame))

    async with fake_switch.serve(handler) as port:
        client = client_for(port)
        first = await client.echo_test(oneshot=True)
        second = await client.sign_on("003", oneshot=True)
    assert (first.mti, first.code, first.stan) == ("0830", "00", "000001")
    assert (second.mti, second.code) == ("0810", "00")
    assert client.key_mode == "003" and client.keys is not None and client.keys.tdk is None
    assert fake_switch.connections == 2
    _, echo = fake_switch.decode(fake_switch.frames[0])
    assert echo[60] == "00000001301" and 63 not in echo


async def test_manual_entry_without_pin_and_balance_with_pin(fake_switch):
    async with fake_switch.serve(fake_switch.responder(fake_switch.standard)) as port:
        client = client_for(port)
        async with client.connect():
            await client.sign_on("003")
            consume = await client.consume("6214834474520070", 5000, entry="manual", expiry="2912")
            balance = await client.balance(CARD, pin="123456", expiry="3012")
    _, manual = fake_switch.decode(fake_switch.frames[1])
    assert manual[2] == "6214834474520070" and manual[14] == "2912" and 35 not in manual
    assert manual[22] == "012"
    assert not {26, 52, 53} & set(manual)
    assert manual[4] == "000000005000" and manual[60] == "22000001000" and manual[49] == "156"
    assert consume.mac_ok is True
    _, bal = fake_switch.decode(fake_switch.frames[2])
    assert bal[3] == "310000" and 4 not in bal and bal[60] == "01000001000"
    assert bal[22] == "021" and bal[26] == "12" and bal[53] == "2600000000000000"
    assert 2 not in bal and bal[35] == TRACK
    assert balance.fields[54] == "1002156C000099987655"


async def test_single_des_sign_on_gives_f53_digit2_0_and_an_8_byte_pik(fake_switch, vectors):
    async with fake_switch.serve(fake_switch.responder(fake_switch.standard)) as port:
        client = client_for(port)
        async with client.connect():
            await client.sign_on("001")
            resp = await client.consume(CARD, 100, pin="654321", expiry="3012")
    assert client.keys is not None and len(client.keys.pik) == 8
    _, sent = fake_switch.decode(fake_switch.frames[1])
    assert sent[53] == "2000000000000000"
    pik8 = clear_keys(vectors).pik[:8]
    assert pin_matches(pik8, CARD, sent[52], "654321")
    assert resp.mac_ok is True


async def test_encrypted_track_after_004(fake_switch, vectors):
    t = vectors["track2_tdk_encryption"]
    approved = fake_switch.reencode(vectors["consume_response_approved"]["frame_hex"])

    def respond(frame):
        if frame.body[:2] == b"\x08\x00":
            return fake_switch.standard(frame)
        return fake_switch.reply(frame, approved)  # the codec cannot decode an encrypted F35

    async with fake_switch.serve(fake_switch.responder(respond)) as port:
        client = client_for(port)
        async with client.connect():
            await client.sign_on("004")
            resp = await client.consume(CARD, 12345, pin="123456", track2=t["track_odd"], encrypt_track=True)
    assert resp.request_fields[35] == t["track_odd_encrypted"]
    assert resp.request_fields[53] == "2610000000000000"
    packed = bytes.fromhex(t["track_odd_encrypted"] + "0")
    assert bytes([0x37]) + packed in fake_switch.frames[1].body
    assert resp.code == "00"


async def test_track_encryption_needs_a_tdk_and_a_pin_needs_keys(fake_switch):
    async with fake_switch.serve(fake_switch.responder(fake_switch.standard)) as port:
        client = client_for(port)
        async with client.connect():
            with pytest.raises(NotSignedOnError):
                await client.consume(CARD, 100, pin="123456", expiry="3012")
            unsigned = await client.consume(CARD, 100, expiry="3012")  # the switch will say 77
            await client.sign_on("003")
            with pytest.raises(NotSignedOnError, match="TDK"):
                await client.consume(CARD, 100, expiry="3012", encrypt_track=True)
    assert unsigned.request_fields[64] == bytes(8)
    assert unsigned.request_fields[22] == "022" and 53 not in unsigned.request_fields


async def test_send_fields_sends_a_given_mac_unchanged(fake_switch):
    async with fake_switch.serve(fake_switch.responder(fake_switch.standard)) as port:
        client = client_for(port)
        async with client.connect():
            await client.sign_on("003")
            fields = client.card_fields(processing_code="000000", type_code="22", card=CARD,
                                        amount_fen=100, expiry="3012")
            fields[64] = b"BADMAC00"
            await client.send_fields("0200", fields, mac=False)
    assert fake_switch.frames[1].body[-8:] == b"BADMAC00"


async def test_garbage_closed_without_answer_returns_none_and_later_requests_fail(fake_switch):
    async with fake_switch.serve(fake_switch.responder(lambda f: None)) as port:
        client = client_for(port)
        async with client.connect():
            got = await client.send_raw(b"\x00\x0d" + b"\x60" * 11 + b"\x99\x99")
            assert got is None
            with pytest.raises(TerminalConnectionError):
                await client.echo_test()
    assert fake_switch.frames[0].body == b"\x99\x99"


async def test_a_late_answer_after_a_timeout_is_kept_as_unmatched(fake_switch):
    timed_out = anyio.Event()

    async def handler(conn):
        signon = await conn.recv()
        assert signon is not None
        await conn.send(fake_switch.standard(signon))
        consume = await conn.recv()
        assert consume is not None
        await timed_out.wait()
        await conn.send(fake_switch.standard(consume))  # late
        echo = await conn.recv()
        assert echo is not None
        await conn.send(fake_switch.standard(echo))
        await conn.recv()

    async with fake_switch.serve(handler) as port:
        client = client_for(port)
        async with client.connect():
            await client.sign_on("003")
            with pytest.raises(TimeoutError):
                await client.consume(CARD, 100, expiry="3012", timeout=0.2)
            timed_out.set()
            echo = await client.echo_test()
    assert echo.mti == "0830"
    assert [r.stan for r in client.unmatched] == ["000002"]


async def test_parameter_download_sign_off_and_reversal(fake_switch):
    async with fake_switch.serve(fake_switch.responder(fake_switch.standard)) as port:
        client = client_for(port)
        async with client.connect():
            await client.sign_on("003")
            params = await client.parameter_download()
            resp = await client.consume(CARD, 12345, pin="123456", expiry="3012")
            rev = await client.reversal(resp.request_fields, "98")
            off = await client.sign_off()
    assert params.code == "00" and client.parameters == {"01": "老王便利店", "02": "10000001", "06": "0.60"}
    mti, sent = fake_switch.decode(fake_switch.frames[3])
    assert mti == "0400" and rev.mti == "0410" and rev.code == "00"
    assert sent[11] == resp.request_fields[11] and sent[39] == "98"
    assert {k: sent[k] for k in (3, 4, 22, 25, 49, 60)} == {k: resp.request_fields[k] for k in (3, 4, 22, 25, 49, 60)}
    assert not {35, 52, 53, 26} & set(sent)
    assert off.code == "00" and client.keys is None and client.key_mode is None
    _, off_fields = fake_switch.decode(fake_switch.frames[4])
    assert off_fields[60] == "00000001002"


async def test_no_pin_track_key_or_full_pan_in_logs_or_reprs(fake_switch, vectors, caplog):
    caplog.set_level(logging.DEBUG, logger="switch.pos")
    async with fake_switch.serve(fake_switch.responder(fake_switch.standard)) as port:
        client = client_for(port)
        async with client.connect():
            await client.sign_on("004")
            resp = await client.consume(CARD, 12345, pin="987654", expiry="3012")
    text = caplog.text + repr(resp) + repr(client) + repr(client.keys)
    assert "622202****1684" in caplog.text  # it does log, masked
    secrets = [CARD, "987654", TRACK, TMK.hex(), resp.request_fields[52].hex()]  # type: ignore[union-attr]
    keys = clear_keys(vectors)
    secrets += [keys.pik.hex(), keys.mak.hex(), keys.tdk.hex()]  # type: ignore[union-attr]
    for secret in secrets:
        assert secret.lower() not in text.lower()


def test_build_track2_and_stan_wrap() -> None:
    assert build_track2(CARD, "3012") == TRACK
    with pytest.raises(ValueError):
        build_track2(CARD, "30-2")
    client = TerminalClient("127.0.0.1", 1, TID, MID, TMK)
    client.next_stan = 999_999
    assert client.take_stan() == "999999" and client.take_stan() == "000001"


async def test_connection_refused_is_a_terminal_connection_error() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there now
    client = client_for(port)
    with pytest.raises(TerminalConnectionError, match="cannot connect"):
        async with client.connect():
            pass
