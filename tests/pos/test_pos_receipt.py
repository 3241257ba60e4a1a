"""The POS slip (switch/pos/receipt.py): masked card, yuan from int fen without float, the §12
response-code meanings, and the fields a slip shows."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from switch.core.framing import Frame
from switch.pos.client import Response
from switch.pos.receipt import RESPONSE_CODES, format_receipt, format_yuan, mask_pan, parse_balance_fen

PROTOCOL = Path(__file__).resolve().parents[3] / "shared" / "protocol.md"
CARD = "6222029375642931684"


def response_from(fake_switch: Any, frame_hex: str, request_fields: dict[int, Any] | None = None) -> Response:
    raw = bytes.fromhex(frame_hex)
    frame = Frame.parse(raw[2:])
    mti, fields = fake_switch.decode(frame)
    return Response(mti, fields, frame.header, frame.tpdu, raw, None, dict(request_fields or {}))


def test_approved_consume_slip(fake_switch, vectors) -> None:
    resp = response_from(fake_switch, vectors["consume_response_approved"]["frame_hex"])
    slip = format_receipt(resp, shop_name="老王便利店", txn_name="消费 SALE", amount_fen=12345)
    assert "老王便利店" in slip and "消费 SALE" in slip
    assert "898310048990001" in slip and "10000001" in slip
    assert "622202****1684" in slip and CARD not in slip
    assert "RMB 123.45" in slip
    assert "000001" in slip and "000002" in slip  # batch (60.2) and trace (F11)
    assert "112610160201" in slip and "A1B2C3" in slip
    assert "11/26 10:16:02" in slip
    assert "ICBC" in slip and "48521000" not in slip.split("ISSUER")[1].splitlines()[0]
    assert "00 Approved 交易成功" in slip


def test_declined_slip_has_the_meaning_and_no_auth_code(fake_switch, vectors) -> None:
    resp = response_from(fake_switch, vectors["consume_response_declined_51"]["frame_hex"])
    slip = format_receipt(resp, shop_name="X", txn_name="SALE", amount_fen=12345)
    assert "51 Insufficient funds 余额不足" in slip
    auth_line = next(line for line in slip.splitlines() if "AUTH" in line)
    assert auth_line.rstrip().endswith("-")


def test_balance_slip_shows_the_balance_from_f54(fake_switch, vectors) -> None:
    resp = response_from(fake_switch, vectors["balance_response"]["frame_hex"])
    slip = format_receipt(resp, shop_name="X", txn_name="BALANCE", amount_fen=None)
    assert "RMB 999876.55" in slip and "AMOUNT" not in slip
    assert parse_balance_fen("1002156D000000000150") == -150
    assert parse_balance_fen("garbage") is None


def test_card_falls_back_to_the_swiped_track_when_the_response_has_no_f2(fake_switch, vectors) -> None:
    resp = response_from(fake_switch, vectors["consume_response_declined_51"]["frame_hex"],
                         {35: "6222029375642931684=30122011234567890"})
    del resp.fields[2]
    slip = format_receipt(resp, shop_name="X", txn_name="SALE", amount_fen=1)
    assert "622202****1684" in slip and CARD not in slip and "30122011234567890" not in slip


@pytest.mark.parametrize(
    ("fen", "text"),
    [(0, "0.00"), (5, "0.05"), (10, "0.10"), (100, "1.00"), (12345, "123.45"), (-150, "-1.50"),
     (999_999_999_999, "9999999999.99"),
     (9_007_199_254_740_993, "90071992547409.93")],  # 2**53 + 1: a float would round it
)
def test_format_yuan_is_exact(fen: int, text: str) -> None:
    assert format_yuan(fen) == text


@pytest.mark.parametrize("bad", [1.5, 100.0, True, "100"])
def test_format_yuan_refuses_anything_but_int(bad: Any) -> None:
    with pytest.raises(TypeError):
        format_yuan(bad)


def test_mask_pan() -> None:
    assert mask_pan(CARD) == "622202****1684"
    assert mask_pan("6214834474520070") == "621483****0070"
    assert mask_pan("1234567890") == "**********"  # too short to hide anything with 6 + 4


def test_every_section_12_code_has_a_meaning() -> None:
    text = PROTOCOL.read_text(encoding="utf-8")
    section = text.split("## 12. Response codes the switch uses", 1)[1].split("### 12.1", 1)[0]
    codes = set(re.findall(r"`([0-9A-Z]{2})`", section))
    assert len(codes) > 20
    assert codes == set(RESPONSE_CODES)
    assert all(en and zh for en, zh in RESPONSE_CODES.values())
