"""``shoppulse archive`` against the embedded broker: every valid input event lands in the Parquet
archive exactly once, through a crash between a part's rename and its commit and through kill -9."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from itertools import islice
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from features.archive import part_files
from features.events import InvalidEvent, parse_event
from streams.config import Settings
from streams.kafka.clients import confluent_producer_config, ensure_topics
from streams.kafka.producer import produce
from streams.sim.generator import GeneratorConfig, ShopSimulator
from streams.tools.archive import Archiver

from .kafka_helpers import WorkerProcess, isolated_settings, read_to_end

pytestmark = pytest.mark.integration


class Crash(Exception):
    """Stands for the process dying at that point."""


def send_traffic(settings: Settings, count: int, seed: int) -> None:
    config = GeneratorConfig(seed=seed, n_shoppers=count // 10, malformed_fraction=0.05, duration_days=7.0)
    config = dataclasses.replace(config, start_ms=int(time.time() * 1000) - config.span_ms)
    report = produce(
        islice(ShopSimulator(config).messages(), count),
        settings.topic_by_kind,
        confluent_producer_config(settings),
        progress=False,
    )
    assert report.failed == 0 and report.delivered == count


def valid_positions(settings: Settings) -> set[tuple[str, int, int]]:
    """(topic, partition, offset) of every valid input message, read straight from the topics."""
    kinds = {topic: kind for kind, topic in settings.topic_by_kind.items()}
    now_ms = int(time.time() * 1000)
    positions: set[tuple[str, int, int]] = set()
    for topic in settings.input_topics:
        for m in read_to_end(settings, topic):
            partition, offset = m.partition(), m.offset()
            assert partition is not None and offset is not None, "a data message has a place"
            try:
                parse_event(kinds[topic], m.key(), m.value(), now_ms)
            except InvalidEvent:
                continue
            positions.add((topic, partition, offset))
    return positions


def archived_positions(root: Path) -> Counter[tuple[str, int, int]]:
    """How often each (topic, partition, offset) is in the archive's part files."""
    seen: Counter[tuple[str, int, int]] = Counter()
    for _, path in part_files(root):
        columns = pq.read_table(path, columns=["topic", "partition", "offset"]).to_pydict()
        seen.update(zip(columns["topic"], columns["partition"], columns["offset"], strict=True))
    return seen


def assert_exactly_once(settings: Settings, root: Path) -> None:
    expected = valid_positions(settings)
    seen = archived_positions(root)
    doubled = {p: n for p, n in seen.items() if n > 1}
    assert not doubled, f"archived more than once: {sorted(doubled)[:5]}"
    missing = expected - set(seen)
    assert not missing, f"{len(missing)} valid events not archived, e.g. {sorted(missing)[:5]}"
    assert set(seen) == expected


def test_a_crash_between_a_parts_rename_and_its_commit_neither_loses_nor_doubles(broker, tmp_path: Path) -> None:
    settings = isolated_settings(broker.bootstrap_servers, tmp_path / "worker", partitions=2)
    ensure_topics(settings)
    send_traffic(settings, 3000, seed=11)
    root = tmp_path / "archive"
    renamed: list[Path] = []

    def crash_after_the_third_rename(path: Path) -> None:
        renamed.append(path)
        if len(renamed) == 3:
            raise Crash

    crashing = Archiver(settings, root, 400, 60.0, 0, after_write=crash_after_the_third_rename)
    with pytest.raises(Crash):
        crashing.run(threading.Event(), stop_at_end=True)
    assert len(part_files(root)) == 3, "the third part was renamed; its offsets were never committed"
    stats = Archiver(settings, root, 400, 60.0, 0).run(threading.Event(), stop_at_end=True)
    assert stats.invalid, "the traffic holds invalid messages: counted and skipped"
    assert_exactly_once(settings, root)


def test_kill_9_mid_way_then_a_restart_archives_each_event_once(broker, tmp_path: Path) -> None:
    settings = isolated_settings(broker.bootstrap_servers, tmp_path / "worker", partitions=4)
    ensure_topics(settings)
    send_traffic(settings, 20_000, seed=12)
    root = tmp_path / "archive"
    command = (
        "import sys; from streams.tools.cli import main; "
        f"sys.exit(main(['archive', '--dir', {str(root)!r}, '--flush-events', '300', '--stop-at-end']))"
    )
    first = WorkerProcess(settings, tmp_path / "archive-1.log", script=command)
    deadline = time.monotonic() + 60
    while len(part_files(root)) < 10 and first.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.kill()
    written_before = len(part_files(root))
    assert written_before >= 10, f"the first archiver wrote {written_before} parts:\n{first.log_tail()}"
    second = WorkerProcess(settings, tmp_path / "archive-2.log", script=command)
    assert second.process.wait(timeout=120) == 0, second.log_tail()
    assert len(part_files(root)) > written_before, "the killed archiver had not finished"
    assert_exactly_once(settings, root)
