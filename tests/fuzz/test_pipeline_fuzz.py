"""Hostile frames through TransactionManager.handle (protocol §12.1), in memory: the §14 mock
issuers behind in-memory links, a real SQLite store in a temporary directory.

Property: handle never raises; it returns None (close) or one framed response whose MTI is the
request's + 10 and whose TPDU and header are echoed (§2); every answer is journaled first (one
more committed journal row per answered frame, counted on a separate SQLite connection).

Each example gets a fresh switch state (so a failure replays and shrinks) and sends one to three
frames, repeats included. Must not: open sockets or sleep. Hypothesis is derandomized and keeps
no example database.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from switch.core.framing import Frame, FrameReader, FramingError

from .conftest import Pipeline, open_pipeline
from .mutations import BODY_START, CODEC, HEADER, TPDU, ReplayChooser, hostile_frames, mutate, synthetic_requests, with_len
from .test_core_fuzz import F60_BAD_PAD_11, F60_BAD_PAD_17

HANDLE_LIMIT = 5.0  # seconds one handle() may take (the issuer timeout here is 0.2 s)

PIPELINE_FUZZ = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # tmp_path only holds one directory per example
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
EXAMPLE_DIRS = itertools.count()


def _frame(raw: bytes) -> Frame | None:
    reader = FrameReader(0xFFFF)
    reader.receive_data(raw)
    try:
        return reader.next_frame()
    except FramingError:
        return None  # the transport closes these; nothing reaches the manager


def _code(body: bytes) -> str:
    code = CODEC.decode(body)[1].get(39)
    return code if isinstance(code, str) else ""


async def check_one(pipeline: Pipeline, raw: bytes) -> None:
    frame = _frame(raw)
    if frame is None:
        return
    before = pipeline.journal_rows()
    with anyio.fail_after(HANDLE_LIMIT):
        data = await pipeline.manager.handle(frame)
    after = pipeline.journal_rows()
    if data is None:
        event("closed")
        assert after == before, "a close is not journaled"
        return
    assert after == before + 1, "every answer is journaled exactly once, before it is returned"
    out = FrameReader(0xFFFF)
    out.receive_data(data)
    resp = out.next_frame()
    assert resp is not None and not out.mid_frame, "a response is exactly one frame"
    mti, fields = CODEC.decode(resp.body)
    assert mti == f"{int(frame.body[:2].hex()) + 10:04d}", "§2: response MTI = request MTI + 10"
    code = fields.get(39)
    assert isinstance(code, str) and len(code) == 2
    event(f"answered {code}")
    echoed = (
        resp.tpdu == frame.tpdu
        and resp.header[:2] == frame.header[:2]
        and resp.header[2] >> 4 == frame.header[2] >> 4  # digit 6 (low nibble) is the switch's
        and resp.header[3:] == frame.header[3:]
    )
    assert echoed, "§2: TPDU and header are echoed (a repeat's too)"
    pipeline.answered.setdefault(frame.body, set()).add(resp.body)


async def check_all(tmp_path: Path, frames: list[bytes], seeded: list[tuple[int, list[int]]]) -> None:
    directory = Path(tempfile.mkdtemp(prefix=f"ex{next(EXAMPLE_DIRS)}-", dir=tmp_path))
    async with open_pipeline(directory) as pipeline:
        for index, choices in seeded:  # mutations of the signed-on terminal's valid requests
            frames.append(mutate(ReplayChooser(choices), pipeline.seeds[index]))
        for raw in frames:
            await check_one(pipeline, raw)


HOSTILE = st.one_of(hostile_frames(), synthetic_requests())


@pytest.mark.anyio
@PIPELINE_FUZZ
@given(frames=st.lists(HOSTILE, min_size=1, max_size=3).flatmap(
    lambda fs: st.sampled_from([fs, fs + fs[:1]])))  # sometimes a repeat of the first
@example(frames=[with_len(b"\0\0" + TPDU + HEADER + F60_BAD_PAD_11)])
async def test_hostile_frames_through_the_manager(tmp_path: Path, frames: list[bytes]) -> None:
    await check_all(tmp_path, list(frames), [])


@pytest.mark.anyio
@PIPELINE_FUZZ
@given(seeded=st.lists(
    st.tuples(st.integers(0, 3), st.lists(st.integers(0, 2**16), min_size=2, max_size=12)),
    min_size=1, max_size=3,
))
async def test_mutated_valid_requests_through_the_manager(
    tmp_path: Path, seeded: list[tuple[int, list[int]]]
) -> None:
    """Mutations of requests that pass every check unmutated (a signed-on terminal, a good MAC):
    the choices are drawn up front and replayed once the seeds exist (a draw inside an async test
    would raise Hypothesis's StopTest through the event loop)."""
    await check_all(tmp_path, [], seeded)


@pytest.mark.anyio
async def test_the_seeds_are_approved(pipeline: Pipeline) -> None:
    """The mutations start from requests the switch approves (guards the fuzz base itself)."""
    for seed in pipeline.seeds:
        before = pipeline.journal_rows()
        frame = _frame(seed)
        assert frame is not None
        data = await pipeline.manager.handle(frame)
        assert data is not None
        assert _code(data[BODY_START:]) == "00"
        assert pipeline.journal_rows() == before + 1


# ---- bugs the properties found ------------------------------------------------------------------------
@pytest.mark.anyio
async def test_bad_pad_in_full_length_f60_is_answered_30(pipeline: Pipeline) -> None:
    """switch/pipeline/manager.py TransactionManager._format_error -> format_error_response raises
    CodecError (F60 echoed with 18 digits, max 17): handle raises instead of answering 30."""
    frame = _frame(with_len(b"\0\0" + TPDU + HEADER + F60_BAD_PAD_17))
    assert frame is not None
    data = await pipeline.manager.handle(frame)
    assert data is not None
    assert _code(data[BODY_START:]) == "30"


@pytest.mark.anyio
async def test_a_repeat_with_another_tpdu_gets_its_own_tpdu(pipeline: Pipeline) -> None:
    """switch/pipeline/duplicates.py _resend / manager.handle: §11 matches a repeat on the bytes
    from the MTI on and answers "the same response again", but the stored response is returned
    byte for byte, so a repeat that arrives with another TPDU (another NAC route; §2: "the response
    echoes the request TPDU unchanged") is answered with the first copy's TPDU."""
    seed = pipeline.seeds[3]  # an echo test of the signed-on terminal
    first_frame = _frame(seed)
    assert first_frame is not None
    first = await pipeline.manager.handle(first_frame)
    assert first is not None and first[2:7] == seed[2:7]
    repeat = seed[:2] + bytes.fromhex("6000040000") + seed[7:]  # same body, destination 0004
    repeat_frame = _frame(repeat)
    assert repeat_frame is not None
    again = await pipeline.manager.handle(repeat_frame)
    assert again is not None
    assert again[BODY_START:] == first[BODY_START:], "the same response (§11)"
    assert again[2:7] == repeat[2:7], "with the repeat's own TPDU (§2)"
