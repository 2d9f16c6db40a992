"""The validator answers every poison-corpus case as docs/events.md says (the worker side is in
tests/integration/test_reliability.py)."""

from __future__ import annotations

import pytest

from features.events import REASONS, InvalidEvent, parse_event
from tests.poison_corpus import ACCEPTED, poison_corpus

NOW_MS = 1_760_000_000_000
CORPUS = poison_corpus(NOW_MS)


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_each_case_gets_its_documented_answer(case):
    try:
        parse_event(case.topic_kind, case.key, case.value, NOW_MS)
        got = ACCEPTED
    except InvalidEvent as exc:
        assert exc.detail, f"{case.name}: rejected as {exc.reason} without a detail"
        got = exc.reason
    assert got == case.expected, f"{case.name}: expected {case.expected}, the validator said {got}"


def test_the_corpus_covers_every_rejection_reason():
    assert {case.expected for case in CORPUS} - {ACCEPTED} == set(REASONS)
