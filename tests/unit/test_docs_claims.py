"""What the documents say about metrics and topics holds in the code.

docs/*.md, README.md and RELIABILITY.md are read as a user would: every ``shoppulse_...``
metric they name must be one the worker exports (or be named in a sentence saying it is not),
every topic they name must be one the settings or the set-up jobs know, the number of topics
docs/deploy.md says the set-up creates must be the number docker-compose.yml's
``topic-setup`` and deploy/k8s's ``shoppulse-topics`` Job create, and its alert table must
list the rules of deploy/prometheus/alerts.yml. Like tests/unit/features/test_contracts.py
does for the event contracts, so that a document cannot lag the code unnoticed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from streams.config import Settings
from streams.kafka.clients import required_topics
from streams.worker.metrics import METRIC_NAMES, WorkerMetrics
from tests.unit.deploy.test_compose import DOCS, HISTOGRAM_SUFFIXES, ROOT, alert_rules, topic_setup_topics
from tests.unit.deploy.test_k8s import (  # noqa: F401 - job, resources, docs_by_file, topics_script are fixtures
    _flag,
    _run_topics_script,
    container,
    container_env,
    docs_by_file,
    job,
    resources,
    topics_script,
)

DOCUMENTS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md", ROOT / "RELIABILITY.md"]
_METRIC = re.compile(r"\bshoppulse_[a-z0-9_]*[a-z0-9]\b")
#: ``shop.x`` / ``shoppulse.x`` names; not file names (``dashboards/shoppulse.json``) nor the
#: dead-letter headers (``shoppulse.dlq.reason``).
_TOPIC = re.compile(r"(?<![\w./-])(?:shop|shoppulse)\.[a-z_]+(?![\w-]|\.\w)")
_FILE_SUFFIXES = (".json", ".yml", ".yaml", ".md", ".py", ".toml")
_SAYS_NOT_EXPORTED = re.compile(r"\bnot (?:yet )?exported\b|\bexported yet\b", re.I)
_NUMBER_WORDS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
}
_TOPIC_COUNT = re.compile(r"\b(\d+|" + "|".join(_NUMBER_WORDS) + r") topics\b", re.I)


def sentences(path: Path) -> list[str]:
    """A document's sentences (paragraphs, list items and table rows end one too), lines joined."""
    text = path.read_text(encoding="utf-8")
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z`*(])|\n\s*\n|\n(?=\s*[*|-] )", text)
    return [" ".join(part.split()) for part in parts if part.strip()]


def exported_metrics() -> set[str]:
    """Every metric name a scrape of a fresh worker can show, read from its registry."""
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name, *(family.name + suffix for suffix in HISTOGRAM_SUFFIXES)}
        else:
            names.add(family.name)
    return names


def topics_named(sentence: str) -> list[str]:
    return [name for name in _TOPIC.findall(sentence) if not name.endswith(_FILE_SUFFIXES)]


def count_of(word: str) -> int:
    return int(word) if word.isdigit() else _NUMBER_WORDS[word.lower()]


@pytest.fixture(scope="module")
def job_topics(job, topics_script, resources, tmp_path_factory) -> list[str]:  # noqa: F811 - fixtures, imported
    """The topics deploy/k8s/job-topics.yaml creates: its script run with a stand-in kafka-topics.sh."""
    env = container_env(container(job), resources)
    code, calls, stderr = _run_topics_script(
        topics_script, env, tmp_path_factory.mktemp("job"), env["SHOPPULSE_PARTITIONS"]
    )
    assert code == 0, stderr
    return [_flag(argv, "--topic") for argv in calls if "--create" in argv]


# --------------------------------------------------------------------------- helpers' own tests


def test_the_readers_find_what_a_person_reads():
    text = (
        "Lag is `shoppulse_consumer_lag{topic}`; see shoppulse_batch_size_bucket. Files: "
        "deploy/grafana/dashboards/shoppulse.json, `shoppulse.json`, header `shoppulse.dlq.reason`. "
        "Tail shoppulse.scores or shop.orders.\n\n* the five topics"
    )
    assert _METRIC.findall(text) == ["shoppulse_consumer_lag", "shoppulse_batch_size_bucket"]
    assert topics_named(text) == ["shoppulse.scores", "shop.orders"]
    assert [count_of(m) for m in _TOPIC_COUNT.findall(text)] == [5]
    assert set(METRIC_NAMES) <= exported_metrics(), "the registry reader misses declared families"
    assert "shoppulse_dead_letter_total" in exported_metrics() and "shoppulse_dead_letter" not in exported_metrics()


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("path", DOCUMENTS, ids=[p.name for p in DOCUMENTS])
def test_every_metric_a_document_names_is_exported(path):
    exported = exported_metrics()
    for sentence in sentences(path):
        named = set(_METRIC.findall(sentence))
        if _SAYS_NOT_EXPORTED.search(sentence):
            wrongly = sorted(named & exported)
            assert not wrongly, (
                f"{path.name} says {wrongly} are not exported, but the worker exports them: {sentence!r}"
            )
        else:
            unknown = sorted(named - exported)
            assert not unknown, (
                f"{path.name} names {unknown}, which streams/worker/metrics.py does not export: {sentence!r}"
            )


def test_the_documents_name_metrics_at_all():
    named = {name for path in DOCUMENTS for s in sentences(path) for name in _METRIC.findall(s)}
    assert len(named) >= 5, f"the metric reader found only {sorted(named)}"


# --------------------------------------------------------------------------- topics


def test_every_topic_a_document_names_exists(services, job_topics):
    settings = Settings.from_env({})
    known = {*settings.input_topics, *settings.output_topics, *topic_setup_topics(services), *job_topics}
    found = 0
    for path in DOCUMENTS:
        for sentence in sentences(path):
            unknown = sorted(set(topics_named(sentence)) - known)
            assert not unknown, (
                f"{path.name} names topics {unknown}, which ShopPulse neither reads nor writes: {sentence!r}"
            )
            found += len(topics_named(sentence))
    assert found >= len(known), "the topic reader found fewer mentions than there are topics"


def test_deploy_docs_count_the_topics_the_setup_creates(services, job_topics):
    compose_topics = topic_setup_topics(services)
    assert compose_topics == job_topics == [t.name for t in required_topics(Settings.from_env({}))]
    counted = 0
    for sentence in sentences(DOCS):
        for word in _TOPIC_COUNT.findall(sentence):
            assert count_of(word) == len(compose_topics), (
                f"docs/deploy.md counts {word} topics, the set-up creates {len(compose_topics)}: {sentence!r}"
            )
            counted += 1
        named = topics_named(sentence)
        if "creat" in sentence and len(set(named)) > 1:  # a list of what the set-up creates
            assert sorted(set(named)) == sorted(compose_topics), (
                f"docs/deploy.md lists {named} as created, the set-up creates {compose_topics}: {sentence!r}"
            )
    assert counted, "docs/deploy.md should say how many topics the set-up creates"


# --------------------------------------------------------------------------- alerts


def test_deploy_docs_alert_table_lists_every_rule_with_its_severity():
    section = DOCS.read_text(encoding="utf-8").split("\n## Alerts\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(ShopPulse\w+)` \|.*\| (\w+) \|$", section, flags=re.M)
    assert rows == [(rule["alert"], rule["labels"]["severity"]) for rule in alert_rules()], (
        "docs/deploy.md's alert table must list deploy/prometheus/alerts.yml's rules, in order"
    )
