"""A name repeated in one JSON object is bad_json wherever it stands, and names that differ never
are: decode_json_object's colon count against a parser that checks every object (hypothesis)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.events import REASON_BAD_JSON, InvalidEvent, decode_json_object


class JsonObject(tuple):
    """An object as written: its (name, escape the name?, value) members, repeats allowed."""


def _written(value, colon: str) -> str:
    """JSON text of a tree of JsonObject, lists and scalars; names escaped as \\uXXXX on request."""
    if isinstance(value, JsonObject):
        members = (
            ("".join(f"\\u{ord(c):04x}" for c in name).join('""') if escaped else json.dumps(name))
            + colon
            + _written(item, colon)
            for name, escaped, item in value
        )
        return "{" + ", ".join(members) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_written(item, colon) for item in value) + "]"
    return json.dumps(value)


def _refuse_repeats(pairs: list) -> dict:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise KeyError("repeated")
    return dict(pairs)


member_names = st.sampled_from(["a", "b", "items", "user_id", "x:y", ""])
json_trees = st.recursive(
    st.none() | st.integers(-3, 3) | st.text(alphabet='ab:"', max_size=4),
    lambda children: (
        st.lists(st.tuples(member_names, st.booleans(), children), max_size=4).map(JsonObject)
        | st.lists(children, max_size=3)
    ),
    max_leaves=12,
)
order_lines = st.lists(
    st.lists(st.tuples(member_names, st.booleans(), json_trees), max_size=4).map(JsonObject), max_size=3
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    members=st.lists(st.tuples(member_names, st.booleans(), json_trees | order_lines), max_size=5),
    colon=st.sampled_from([":", ": ", " :"]),
)
def test_repeated_names_are_bad_json_exactly_where_a_checking_parser_finds_them(members, colon):
    """decode_json_object's colon count never lets a repeat through, nor refuses distinct names."""
    text = _written(JsonObject(members), colon)
    try:
        expected = json.loads(text, object_pairs_hook=_refuse_repeats)
    except KeyError:
        expected = None
    try:
        assert decode_json_object(text.encode()) == expected, text
    except InvalidEvent as exc:
        assert expected is None and exc.reason == REASON_BAD_JSON, text
