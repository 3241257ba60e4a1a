"""The transaction-key table of protocol §6, in one place.

Key = MTI + F3 + F25 + 60.1 for financial messages, MTI + 60.3 for management messages.
Each :class:`TxnType` says whether the request carries a MAC, whether it can be reversed and
whether it goes to an issuer; the pipeline looks handlers up by ``TxnType.name``.
``implemented`` marks the types this build of the switch serves: a key in the table whose
handler is not built yet is answered ``40`` like an unknown key (see specs/decisions.md).

Pure data and lookups: no I/O, no clocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from switch.core.codec import Fields

REQUEST_MTIS = frozenset({"0100", "0200", "0220", "0320", "0400", "0500", "0800", "0820"})
MANAGEMENT_MTIS = frozenset({"0320", "0500", "0800", "0820"})


@dataclass(frozen=True, slots=True)
class TxnType:
    name: str
    mti: str
    mac: bool
    reversible: bool
    issuer: bool
    implemented: bool = True
    financial: bool = True  # counts as 0100/0200/0220/0400: signed-on, batch and day checks


def _fin(name: str, mti: str, reversible: bool, implemented: bool = True) -> TxnType:
    return TxnType(name, mti, mac=True, reversible=reversible, issuer=True, implemented=implemented)


def _mgmt(name: str, mti: str, implemented: bool = False) -> TxnType:
    return TxnType(name, mti, mac=False, reversible=False, issuer=False, implemented=implemented,
                   financial=False)


ACTIVATION = _mgmt("activation", "0800", implemented=True)
SIGN_ON = _mgmt("sign_on", "0800", implemented=True)
PARAMETER_DOWNLOAD = _mgmt("parameter_download", "0800", implemented=True)
SIGN_OFF = _mgmt("sign_off", "0820", implemented=True)
ECHO_TEST = _mgmt("echo_test", "0820", implemented=True)
BATCH_SETTLEMENT = _mgmt("batch_settlement", "0500", implemented=True)
BATCH_UPLOAD = _mgmt("batch_upload", "0320", implemented=True)

BALANCE_INQUIRY = _fin("balance_inquiry", "0200", reversible=False)
CONSUME = _fin("consume", "0200", reversible=True)
SCAN_TO_PAY = _fin("scan_to_pay", "0200", reversible=True)
CONSUME_VOID = _fin("consume_void", "0200", reversible=True)
REFUND = _fin("refund", "0220", reversible=False)
PRE_AUTH = _fin("pre_auth", "0100", reversible=True)
PRE_AUTH_VOID = _fin("pre_auth_void", "0100", reversible=True)
COMPLETION = _fin("completion", "0200", reversible=True)
COMPLETION_ADVICE = _fin("completion_advice", "0220", reversible=False)
COMPLETION_VOID = _fin("completion_void", "0200", reversible=True)
TRANSFER = _fin("transfer", "0200", reversible=True)
REVERSAL = _fin("reversal", "0400", reversible=False)

# (MTI, F3, F25, 60.1) -> type
FINANCIAL: dict[tuple[str, str, str, str], TxnType] = {
    ("0200", "310000", "00", "01"): BALANCE_INQUIRY,
    ("0200", "000000", "00", "22"): CONSUME,
    ("0200", "200000", "00", "23"): CONSUME_VOID,
    ("0220", "200000", "00", "25"): REFUND,
    ("0100", "030000", "06", "10"): PRE_AUTH,
    ("0100", "200000", "06", "11"): PRE_AUTH_VOID,
    ("0200", "000000", "06", "20"): COMPLETION,
    ("0220", "000000", "06", "24"): COMPLETION_ADVICE,
    ("0200", "200000", "06", "21"): COMPLETION_VOID,
    ("0200", "400000", "00", "49"): TRANSFER,
}

# (MTI, 60.3) -> type
MANAGEMENT: dict[tuple[str, str], TxnType] = {
    ("0800", "351"): ACTIVATION,
    ("0800", "001"): SIGN_ON,
    ("0800", "003"): SIGN_ON,
    ("0800", "004"): SIGN_ON,
    ("0800", "360"): PARAMETER_DOWNLOAD,
    ("0820", "002"): SIGN_OFF,
    ("0820", "301"): ECHO_TEST,
    ("0500", "201"): BATCH_SETTLEMENT,
    ("0320", "201"): BATCH_UPLOAD,
    ("0320", "202"): BATCH_UPLOAD,
    ("0320", "207"): BATCH_UPLOAD,
}


@dataclass(frozen=True, slots=True)
class Field60:
    """60.1 type, 60.2 batch, 60.3 network management code, rest kept as received (§5)."""

    txn_type: str
    batch: str
    nmc: str
    rest: str

    @classmethod
    def parse(cls, value: str) -> Field60 | None:
        if len(value) < 11:
            return None
        return cls(value[0:2], value[2:8], value[8:11], value[11:])

    def with_batch(self, batch: str) -> str:
        return self.txn_type + batch + self.nmc + self.rest


def classify(mti: str, fields: Fields) -> TxnType | None:
    """The §6 type of a request, or None (→ ``40``). The reversal of any reversible type is REVERSAL."""
    raw60 = fields.get(60)
    f60 = Field60.parse(raw60) if isinstance(raw60, str) else None
    if f60 is None:
        return None
    # §6: "Key = MTI + F3 + F25 + 60.1 (financial) or MTI + 60.3 (management)": the table's 00
    # in 60.1 of a management row and 000 in 60.3 of a financial row are values, not key parts
    if mti in MANAGEMENT_MTIS:
        return MANAGEMENT.get((mti, f60.nmc))
    f3, f25 = fields.get(3), fields.get(25)
    if not isinstance(f3, str) or not isinstance(f25, str):
        return None
    if mti == "0400":
        # the key is 0400 + the original's F3/F25/60.1; a non-reversible original is found and
        # answered 12 at step 9 (§11), not 40
        return REVERSAL if original_type(fields) is not None else None
    found = FINANCIAL.get((mti, f3, f25, f60.txn_type))
    if found is CONSUME and str(fields.get(22, ""))[:2] == "03":
        return SCAN_TO_PAY
    return found


def original_type(fields: Fields) -> TxnType | None:
    """For a 0400: the type it reverses, found from its F3/F25/60.1 under any request MTI."""
    raw60 = fields.get(60)
    f60 = Field60.parse(raw60) if isinstance(raw60, str) else None
    if f60 is None:
        return None
    for (mti, f3, f25, t), txn in FINANCIAL.items():
        if (f3, f25, t) == (fields.get(3), fields.get(25), f60.txn_type):
            if txn is CONSUME and str(fields.get(22, ""))[:2] == "03":
                return SCAN_TO_PAY
            return txn
    return None
