"""The JSON Schemas (draft 2020-12) of the shop event contracts, as data.

The schemas live next to this module in ``features/schemas/<topic_kind>.v<version>.json`` and
describe for other producers what :mod:`features.events` enforces; ``docs/events.md`` explains
the rules a schema cannot express. Standard library only.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from features.events import CONTRACT_VERSION, TOPIC_KINDS

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def schema_filename(topic_kind: str) -> str:
    """File name of the current contract's schema for a topic kind (see :data:`TOPIC_KINDS`)."""
    if topic_kind not in TOPIC_KINDS:
        raise ValueError(f"unknown topic kind {topic_kind!r}; expected one of {TOPIC_KINDS}")
    return f"{topic_kind}.v{CONTRACT_VERSION}.json"


def load_schema(topic_kind: str) -> dict[str, Any]:
    """The JSON Schema of a topic kind's contract, as a new dict on every call."""
    schema_file = resources.files(__package__).joinpath("schemas").joinpath(schema_filename(topic_kind))
    return json.loads(schema_file.read_text(encoding="utf-8"))
