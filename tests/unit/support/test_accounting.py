"""The accounting checker's rules, on hand-made inputs and outputs (no Kafka)."""

from __future__ import annotations

import json

from features.events import REASON_BAD_JSON, REASON_NEGATIVE_PRICE
from tests.support.accounting import Alert, DeadLetterRecord, Expected, Produced, Score, account, dead_letter_of

NOW_MS = 1_760_000_000_000
COOLDOWN_MS = 7 * 86_400_000
VIEWS = "shop.page_views"


def view(user: str, event_id: str, ts: int, price: float = 9.5) -> Produced:
    doc = {
        "event_id": event_id,
        "user_id": user,
        "ts": ts,
        "session_id": "s",
        "item_id": "i1",
        "category": "toys",
        "price": price,
    }
    return Produced(VIEWS, "page_view", user.encode(), json.dumps(doc).encode())


def dead(message: Produced, reason: str) -> DeadLetterRecord:
    return DeadLetterRecord(message.topic, message.key, message.value, reason, "what was wrong")


GOOD = [view("u1", "e1", NOW_MS - 3000), view("u1", "e2", NOW_MS - 2000), view("u2", "e3", NOW_MS - 1000)]
NEGATIVE = view("u3", "e4", NOW_MS - 500, price=-1.0)
TRUNCATED = Produced(VIEWS, "page_view", b"u4", b'{"event_id": "e5", "user_')


def expected(messages: list[Produced]) -> Expected:
    return Expected().add(messages, now_ms=NOW_MS)


def test_everything_accounted_and_a_later_score_covers_earlier_events():
    scores = [Score("u1", "e2", NOW_MS - 2000), Score("u2", "e3", NOW_MS - 1000)]  # e1 covered by e2's score
    report = account(
        expected(GOOD + [NEGATIVE, TRUNCATED]),
        scores,
        [dead(NEGATIVE, REASON_NEGATIVE_PRICE), dead(TRUNCATED, REASON_BAD_JSON)],
        [],
        COOLDOWN_MS,
    )
    assert report.ok, report.summary()
    assert (report.events_in, report.valid_events, report.scored) == (5, 3, 3)
    assert (report.invalid_events, report.dead_lettered) == (2, 2)


def test_a_missing_score_is_unaccounted():
    report = account(expected(GOOD), [Score("u1", "e2", NOW_MS - 2000)], [], [], COOLDOWN_MS)
    assert not report.ok
    assert len(report.unaccounted) == 1 and "e3 of u2" in report.unaccounted[0], report.summary()


def test_a_score_before_the_event_does_not_cover_it():
    report = account(
        expected(GOOD), [Score("u1", "e1", NOW_MS - 3000), Score("u2", "e3", NOW_MS - 1000)], [], [], COOLDOWN_MS
    )
    assert [line.split(" of ")[0] for line in report.unaccounted] == ["valid event e2"], report.summary()


def test_a_sweep_score_covers_nothing():
    report = account(expected(GOOD[2:]), [Score("u2", None, NOW_MS)], [], [], COOLDOWN_MS)
    assert report.scored == 0 and len(report.unaccounted) == 1, report.summary()


def test_a_missing_or_mislabelled_dead_letter_is_unaccounted():
    assert len(account(expected([NEGATIVE]), [], [], [], COOLDOWN_MS).unaccounted) == 1
    wrong_reason = account(expected([NEGATIVE]), [], [dead(NEGATIVE, REASON_BAD_JSON)], [], COOLDOWN_MS)
    assert len(wrong_reason.unaccounted) == 1, wrong_reason.summary()
    assert "negative_price" in wrong_reason.unaccounted[0], wrong_reason.summary()
    no_detail = DeadLetterRecord(NEGATIVE.topic, NEGATIVE.key, NEGATIVE.value, REASON_NEGATIVE_PRICE, "")
    assert len(account(expected([NEGATIVE]), [], [no_detail], [], COOLDOWN_MS).unaccounted) == 1


def test_identical_invalid_messages_need_one_dead_letter_each_and_extras_are_counted():
    twice = account(expected([NEGATIVE, NEGATIVE]), [], [dead(NEGATIVE, REASON_NEGATIVE_PRICE)], [], COOLDOWN_MS)
    assert "1 of 2" in twice.unaccounted[0], twice.summary()
    replayed = account(expected([NEGATIVE]), [], [dead(NEGATIVE, REASON_NEGATIVE_PRICE)] * 3, [], COOLDOWN_MS)
    assert replayed.ok and replayed.extra_dead_letters == 2, replayed.summary()


def test_duplicate_scores_are_counted_but_allowed():
    scores = [Score("u1", "e2", NOW_MS - 2000)] * 3 + [Score("u2", "e3", NOW_MS - 1000)]
    report = account(expected(GOOD), scores, [], [], COOLDOWN_MS)
    assert report.ok, report.summary()
    assert report.duplicate_scores == {("u1", "e2"): 3} and report.repeated_score_messages == 2


def test_a_score_for_an_event_never_produced_is_a_failure():
    scores = [Score("u1", "e2", NOW_MS - 2000), Score("u2", "e3", NOW_MS - 1000), Score("u9", "ghost", NOW_MS)]
    report = account(expected(GOOD), scores, [], [], COOLDOWN_MS)
    assert not report.ok and report.unexpected_scores == ["u9 triggered by ghost"], report.summary()


def test_repeated_event_ids_count_once_due_at_their_earliest_ts():
    again_later = view("u2", "e3", NOW_MS - 100)  # same id, later ts: the worker applies one of the two
    scores = [Score("u1", "e2", NOW_MS - 2000), Score("u2", "e3", NOW_MS - 1000)]
    report = account(expected(GOOD + [again_later]), scores, [], [], COOLDOWN_MS)
    assert report.ok and (report.valid_events, report.repeated_event_ids) == (3, 1), report.summary()


def test_a_second_alert_within_the_cooldown_is_a_failure():
    first, replay = Alert("u1", "u1:e1", NOW_MS), Alert("u1", "u1:e1", NOW_MS + 5)
    after_cooldown = Alert("u1", "u1:e9", NOW_MS + COOLDOWN_MS)
    assert account(expected([]), [], [], [first, after_cooldown], COOLDOWN_MS).ok
    report = account(expected([]), [], [], [after_cooldown, replay, first], COOLDOWN_MS)
    assert not report.ok and len(report.duplicate_alerts) == 1 and "u1:e1 fired 5 ms" in report.duplicate_alerts[0], (
        report.summary()
    )


def test_dead_letter_headers_are_read_by_name():
    headers = [
        ("shoppulse.dlq.source_topic", b"shop.cart"),
        ("shoppulse.dlq.reason", b"bad_json"),
        ("shoppulse.dlq.detail", b"broken"),
        ("other", None),
    ]
    record = dead_letter_of(b"k", b"v", headers)
    assert record == DeadLetterRecord("shop.cart", b"k", b"v", "bad_json", "broken")
