"""``make demo`` announces the console at an address a browser on this machine can open."""

from __future__ import annotations

import pytest

from streams.config import Settings
from streams.tools.demo import console_url


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "http://127.0.0.1:9200/console"),
        ("0.0.0.0", "http://127.0.0.1:9200/console"),  # a wildcard bind is reached on loopback
        ("::", "http://127.0.0.1:9200/console"),
        ("10.1.2.3", "http://10.1.2.3:9200/console"),
    ],
)
def test_the_console_url_is_one_a_local_browser_opens(host: str, expected: str) -> None:
    assert console_url(Settings.from_env({}, metrics_host=host, metrics_port=9200)) == expected
