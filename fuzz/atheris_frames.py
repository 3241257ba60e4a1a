"""Coverage-guided fuzzing of what a terminal's bytes meet first (protocol §1-§3, §12.1 step 1):
framing, decoding, request typing and the 30 answer, for runs longer than the hypothesis
properties in tests/fuzz (which ``make test`` runs). Not run by ``make test``.

    .venv/bin/pip install atheris          # not a declared dependency: only this harness uses it
    .venv/bin/python fuzz/atheris_frames.py -max_total_time=600 -rss_limit_mb=2048 fuzz/corpus

(``fuzz/corpus``: any directory; seeded with the golden frames of ../shared/vectors.json on the
first run.) The properties checked on every input, any violation being a crash that libFuzzer
saves as ``crash-*``: FrameReader raises nothing but FramingError; read_request never raises; a
Malformed that does not close gets a 30 that encodes and decodes; a request that decodes encodes
back to the same bytes.

Must not: open sockets or files other than the corpus, or import the pipeline (no clocks, keys).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from switch.core.codec import Codec, CodecError, load_dialect  # noqa: E402
from switch.core.framing import FrameReader, FramingError  # noqa: E402
from switch.core.messages import Malformed, Request, format_error_response, read_request  # noqa: E402

CODEC = Codec(load_dialect("terminal"))
MAX_FRAME = 2048
VECTORS = REPO.parent / "shared" / "vectors.json"


def check(data: bytes) -> None:
    """One input: a byte stream as a terminal might send it (any number of frames)."""
    reader = FrameReader(MAX_FRAME)
    reader.receive_data(data)
    for _ in range(len(data) // 13 + 2):  # a frame is at least LEN + TPDU + header
        try:
            frame = reader.next_frame()
        except FramingError:
            return  # the server closes the connection, counted
        if frame is None:
            return
        parsed = read_request(CODEC, frame)
        if isinstance(parsed, Malformed):
            if not parsed.close:
                out = format_error_response(CODEC, parsed)
                _, fields = CODEC.decode(out[13:])
                assert fields.get(39) == "30", fields
            continue
        assert isinstance(parsed, Request)
        try:
            mti, fields = CODEC.decode(frame.body)
        except CodecError as exc:  # read_request accepted what decode refuses: a bug
            raise AssertionError(f"read_request typed a body the codec refuses: {exc}") from None
        assert CODEC.encode(mti, fields) == frame.body, "decode then encode must give the same bytes"
    raise AssertionError("FrameReader kept handing out frames")


def seed_corpus(corpus: Path) -> None:
    if not corpus.is_dir() or any(corpus.iterdir()) or not VECTORS.exists():
        return
    for v in json.loads(VECTORS.read_text())["vectors"]:
        hex_ = v.get("frame_hex")
        if isinstance(hex_, str):
            (corpus / f"golden-{v['name']}").write_bytes(bytes.fromhex(hex_))


def main() -> None:
    import atheris  # type: ignore[import-not-found]

    for arg in sys.argv[1:]:
        if not arg.startswith("-"):
            Path(arg).mkdir(parents=True, exist_ok=True)
            seed_corpus(Path(arg))
    atheris.instrument_all()  # coverage of every module loaded above (switch.core, iso8583)
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
