"""The codec seam around pyiso8583: bytes <-> (MTI, typed fields).

This is the only module that imports ``iso8583``. It owns:
- loading a dialect (``specs/*.json``) once and validating it;
- turning field values into the types the rest of the switch uses: digit strings for
  ``n`` / ``z`` fields (``z`` uses ``=`` as separator; on the wire it is nibble ``D``),
  ``str`` for ``an`` / ``ans`` text (GBK where the dialect says so), ``bytes`` for ``b``;
- padding fixed text fields on encode (left-justified, space-padded) and rejecting
  non-digit nibbles on decode (protocol §3);
- converting pyiso8583's errors into :class:`CodecError`, which names the field and offset
  and carries whatever decoded before the failure.

It must not know about transactions, terminals or sockets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import iso8583
from iso8583.decoder import DecodeError
from iso8583.encoder import EncodeError

SPECS_DIR = Path(__file__).resolve().parents[2] / "specs"

FieldValue = str | bytes
Fields = dict[int, FieldValue]

_FMTS = {"n", "z", "an", "ans", "b"}
_DIGITS = frozenset("0123456789")
# Track fields: BCD tracks use nibble D for "=", ASCII tracks "=". A TDK-encrypted track (§10.3)
# holds any hex nibble, so z accepts A-F here and the pipeline checks the clear track's digits.
_Z_DIGITS = frozenset("0123456789ABCDEF=")
# field kinds, compiled from "fmt" per dialect field
_TEXT, _N, _B, _Z, _Z_ASCII = range(5)
_KIND = {"an": _TEXT, "ans": _TEXT, "n": _N, "b": _B, "z": _Z}
_MAX_RELAXED = 4  # fields read past per message (fixed-length content, a bad pad nibble or length)


class SpecError(ValueError):
    """A dialect file is missing, malformed or inconsistent."""


class CodecError(ValueError):
    """A message could not be decoded or encoded.

    ``field`` is the pyiso8583 field key (``"t"``, ``"p"``, ``"35"``...), ``offset`` the byte
    offset into the body where decoding failed (``-1`` for encode errors), ``partial`` the
    fields that decoded cleanly before the failure (typed as in a successful decode).
    """

    def __init__(
        self,
        reason: str,
        field: str,
        offset: int = -1,
        partial: Fields | None = None,
        mti: str | None = None,
    ) -> None:
        super().__init__(f"{reason}: field {field} offset {offset}")
        self.reason = reason
        self.field = field
        self.offset = offset
        self.partial: Fields = partial or {}
        self.mti = mti


@dataclass(frozen=True)
class Dialect:
    """A loaded, validated message dialect."""

    name: str
    fields: Mapping[str, Mapping[str, Any]]
    framing: Mapping[str, Any] = field(default_factory=dict)

    def fmt(self, key: int) -> str:
        return str(self.fields[str(key)]["fmt"])


def load_dialect(name_or_path: str | Path) -> Dialect:
    """Load ``specs/<name>.json`` (or an explicit path) and validate it."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SPECS_DIR / f"{name_or_path}.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SpecError(f"dialect file not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise SpecError(f"dialect file {path} is not valid JSON: {exc}") from exc
    fields = raw.get("fields")
    if not isinstance(fields, dict):
        raise SpecError(f"{path}: no 'fields' object")
    for key in ("h", "t", "p"):
        if key not in fields:
            raise SpecError(f"{path}: field '{key}' missing")
    for key, fs in fields.items():
        for prop in ("data_enc", "len_enc", "len_type", "max_len"):
            if prop not in fs:
                raise SpecError(f"{path}: field {key} lacks '{prop}'")
        if key in ("h", "t", "p", "1"):  # "1": secondary bitmap
            continue
        if not key.isdigit() or not 2 <= int(key) <= 128:
            raise SpecError(f"{path}: bad field key {key!r}")
        if fs.get("fmt") not in _FMTS:
            raise SpecError(f"{path}: field {key} has fmt {fs.get('fmt')!r}, expected one of {_FMTS}")
        if not isinstance(fs["max_len"], int) or fs["max_len"] <= 0:
            raise SpecError(f"{path}: field {key} max_len must be a positive int")
        if fs["data_enc"] != "b":
            try:
                "".encode(fs["data_enc"])
            except LookupError as exc:
                raise SpecError(f"{path}: field {key} has unknown encoding {fs['data_enc']}") from exc
    return Dialect(name=path.stem, fields=fields, framing=raw.get("framing", {}))


class Codec:
    """Encode and decode message bodies (MTI onwards) of one dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._spec = dialect.fields
        self._mti_binary = self._spec["t"]["data_enc"] == "b"
        undefined = {"data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": 1 << 20, "fmt": "b"}
        self._probe_spec = dict(self._spec)
        for i in range(1, 129):  # "1" too: a secondary bitmap the dialect does not have
            self._probe_spec.setdefault(str(i), undefined)
        self._has_header = bool(self._spec["h"]["max_len"])
        # per-field typing compiled once from the dialect (the hot path does no spec lookups)
        self._dec: dict[str, tuple[int, int]] = {}
        self._enc: dict[int, tuple[str, int, int, str]] = {}
        for skey, fs in self._spec.items():
            if not skey.isdigit() or skey == "1":
                continue
            kind = _KIND[str(fs["fmt"])]
            width = int(fs["max_len"]) if fs["len_type"] == 0 else 0  # 0: variable length
            if kind == _Z and fs["data_enc"] != "b":
                kind = _Z_ASCII
            self._dec[skey] = (int(skey), kind)
            self._enc[int(skey)] = (skey, kind, width, str(fs["data_enc"]))

    # ---- decode -------------------------------------------------------------------------
    def decode(self, body: bytes) -> tuple[str, Fields]:
        try:
            doc, _ = iso8583.decode(body, self._spec)
        except DecodeError as exc:
            # the field that failed may sit in doc_dec half-decoded (e.g. with its pad nibble):
            # never report it as cleanly decoded
            partial = self._typed_partial({k: v for k, v in exc.doc_dec.items() if k != exc.field})
            partial.update(self._past_bad_fields(body, exc))
            mti = exc.doc_dec.get("t") or None
            raise CodecError(exc.msg, exc.field, exc.pos, partial, mti) from None
        except KeyError as exc:
            # A bit is set for a field the dialect does not define: its length is unknowable.
            # Decode again with such fields made impossible to satisfy, which stops at that
            # field with everything before it decoded (so F11/F41 can still earn a 30).
            try:
                iso8583.decode(body, self._probe_spec)
            except DecodeError as probe:
                raise CodecError(
                    "field not defined in dialect", probe.field, probe.pos,
                    self._typed_partial(probe.doc_dec), probe.doc_dec.get("t") or None,
                ) from None
            raise CodecError("field not defined in dialect", str(exc.args[0]), -1, {}, None) from None
        mti = doc.pop("t")
        doc.pop("p", None)
        doc.pop("1", None)  # secondary bitmap
        doc.pop("h", None)
        if not (len(mti) == 4 and set(mti) <= _DIGITS):
            raise CodecError("MTI is not 4 digits", "t", 0, {}, None)
        out: Fields = {}
        dec = self._dec
        for key, value in doc.items():
            k, kind = dec[key]
            if kind == _TEXT:
                out[k] = value
                continue
            if kind == _N and (not value or (value.isascii() and value.isdigit())):
                out[k] = value
                continue
            try:
                out[k] = self._from_wire(k, value)
            except CodecError as exc:
                exc.partial = {kk: vv for kk, vv in out.items()}
                exc.mti = mti
                # keep decoding what we can so the error carries every clean field
                for key2, value2 in doc.items():
                    k2 = int(key2)
                    if k2 not in out and k2 != k:
                        try:
                            exc.partial[k2] = self._from_wire(k2, value2)
                        except CodecError:
                            pass
                raise
        return mti, out

    def _past_bad_fields(self, body: bytes, first: DecodeError) -> Fields:
        """The clean fields after ones whose extent is known but whose content is not: any
        fixed-length field (a leading pad nibble other than 0, text that does not decode), a
        trailing pad nibble other than the dialect's, or a length prefix above the field's maximum
        (the prefix itself is readable, so where the field ends is too). Decoding is repeated with
        each such field relaxed, at most ``_MAX_RELAXED`` of them, so that F11 and F41 after a
        bad F2, F22 or F35 still decode and the request can be answered ``30`` (§12.1 step 1).
        The relaxed fields themselves are never reported."""
        spec = dict(self._probe_spec)  # an undefined bit stops decoding, with what came before it
        relaxed: set[str] = set()
        exc = first
        for _ in range(_MAX_RELAXED):
            fs = self._relaxed(exc)
            if fs is None:
                break
            spec[exc.field] = fs
            relaxed.add(exc.field)
            try:
                doc, _ = iso8583.decode(body, spec)
            except DecodeError as again:
                exc = again
                continue
            return self._typed_partial({k: v for k, v in doc.items() if k not in relaxed})
        if not relaxed:
            return {}
        return self._typed_partial({k: v for k, v in exc.doc_dec.items() if k not in relaxed and k != exc.field})

    def _relaxed(self, exc: DecodeError) -> dict[str, Any] | None:
        """The failed field's spec loosened just enough to read past it, or None when where it
        ends is unknown (truncated, an unreadable length, an undefined field)."""
        key = exc.field
        if key not in self._spec or not key.isdigit():
            return None
        fs = dict(self._spec[key])
        if not fs["len_type"]:
            # a fixed-length field ends where its length says, whatever it holds (a leading pad
            # nibble other than 0, text that does not decode): read it as that many raw bytes
            width = int(fs["max_len"])
            nbytes = (width + 1) // 2 if fs.get("len_count") == "nibbles" else width
            return {"data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": nbytes}
        if "larger than maximum" in exc.msg:
            digits = 2 * fs["len_type"] if fs["len_enc"] == "bcd" else fs["len_type"]
            fs["max_len"] = 10**digits - 1
            return fs
        data = exc.doc_enc.get(key, {}).get("data", b"")
        if "nibbles, expecting" in exc.msg and fs.get("right_pad") and data:
            fs["right_pad"] = data[-1:].hex().upper()[-1]  # the pad nibble it carries
            return fs
        return None

    def _typed_partial(self, doc: Mapping[str, str]) -> Fields:
        out: Fields = {}
        for key, value in doc.items():
            if not key.isdigit() or not value or key not in self._spec:
                continue
            try:
                out[int(key)] = self._from_wire(int(key), value)
            except CodecError:
                continue
        return out

    def _from_wire(self, key: int, value: str) -> FieldValue:
        fs = self._spec[str(key)]
        fmt = fs["fmt"]
        if fmt == "b":
            return bytes.fromhex(value)
        if fmt == "n":
            if not set(value) <= _DIGITS:
                raise CodecError("non-digit in numeric field", str(key))
            return value
        if fmt == "z":
            if not set(value) <= _Z_DIGITS:
                raise CodecError("invalid nibble in track field", str(key))
            return value.replace("D", "=")
        return value

    # ---- encode -------------------------------------------------------------------------
    def encode(self, mti: str, fields: Mapping[int, FieldValue]) -> bytes:
        doc: dict[str, str] = {"t": mti}
        if self._has_header:
            doc["h"] = ""
        enc = self._enc
        for key, value in fields.items():
            spec = enc.get(key)
            if spec is None:
                raise CodecError("field not defined in dialect", str(key))
            skey, kind, width, data_enc = spec
            # the common cases inline; anything unusual (and every error) through _to_wire
            if kind == _B and type(value) is bytes:
                doc[skey] = value.hex().upper()
            elif kind == _N and type(value) is str and value.isascii() and value.isdigit() and (
                not width or len(value) == width
            ):
                doc[skey] = value
            elif kind == _TEXT and type(value) is str and (not width or (len(value) == width and value.isascii())):
                doc[skey] = value  # variable length, or fixed and already full width (ASCII: 1 byte a char)
            else:
                doc[skey] = self._to_wire(key, self._spec[skey], value)
        try:
            data, _ = iso8583.encode(doc, self._spec)
        except EncodeError as exc:
            raise CodecError(exc.msg, exc.field) from None
        return bytes(data)

    @staticmethod
    def _to_wire(key: int, fs: Mapping[str, Any], value: FieldValue) -> str:
        fmt = fs["fmt"]
        if fmt == "b":
            if not isinstance(value, (bytes, bytearray)):
                raise CodecError("binary field needs bytes", str(key))
            return bytes(value).hex().upper()
        if not isinstance(value, str):
            raise CodecError("text/numeric field needs str", str(key))
        if fmt == "n":
            if not set(value) <= _DIGITS:
                raise CodecError("non-digit in numeric field", str(key))
            width = int(fs["max_len"])
            if fs["len_type"] == 0 and len(value) < width:
                return value.zfill(width)  # fixed n is right-aligned (§3)
            return value
        if fmt == "z":
            return value.replace("=", "D") if fs["data_enc"] == "b" else value
        if fs["len_type"] == 0:
            width = int(fs["max_len"])
            enc = str(fs["data_enc"])
            raw = value.encode(enc)
            if len(raw) > width:
                raise CodecError(f"text longer than {width} bytes", str(key))
            return value + " " * (width - len(raw))
        return value
