"""Where ``shoppulse models compare`` reads the live outcome counters from.

Either the workers themselves (their ``/metrics`` pages, summed: each worker counts the outcomes of
its own partitions) or a Prometheus server (one instant query per counter, summed over workers by
Prometheus; with a window, the counters' ``increase`` over it, so a comparison can cover the last
day instead of the workers' lifetimes). Plain HTTP with the standard library; the text format is
parsed by ``prometheus_client``, the library the worker exports with.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from .live_compare import COUNTERS, LABELS, Sample

#: A Prometheus range duration: 30m, 6h, 1d, 1h30m ...
_WINDOW = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


class SourceError(Exception):
    """A metrics source that could not be read (unreachable, not Prometheus, bad answer)."""


def _get(url: str, timeout_s: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (http(s) only, checked)
            body: bytes = response.read()
            return body
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SourceError(f"cannot read {url}: {exc}") from exc


def _http(url: str) -> str:
    if "://" not in url:
        url = "http://" + url
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise SourceError(f"{url}: only http and https URLs are read")
    return url


def parse_exposition(text: str) -> list[Sample]:
    """The contract's live counters in a Prometheus text page (everything else on it is skipped)."""
    try:
        return [
            (sample.name, dict(sample.labels), float(sample.value))
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name in COUNTERS
        ]
    except ValueError as exc:
        raise SourceError(f"not a Prometheus text page: {exc}") from exc


def read_worker(url: str, timeout_s: float = 5.0) -> list[Sample]:
    """A worker's ``/metrics`` page (``host:port`` alone means ``http://host:port/metrics``)."""
    url = _http(url)
    if urllib.parse.urlsplit(url).path in ("", "/"):
        url = url.rstrip("/") + "/metrics"
    return parse_exposition(_get(url, timeout_s).decode("utf-8", errors="replace"))


def prometheus_query(counter: str, window: str | None) -> str:
    """The PromQL that sums ``counter`` over workers, by the contract's labels (over ``window`` if given)."""
    series = counter if window is None else f"increase({counter}[{window}])"
    return f"sum by ({', '.join(LABELS)}) ({series})"


def query_prometheus(url: str, window: str | None = None, timeout_s: float = 10.0) -> list[Sample]:
    """Instant queries of every live counter at a Prometheus server's ``/api/v1/query``."""
    if window is not None and not _WINDOW.match(window):
        raise SourceError(f"--window {window!r} is not a Prometheus duration (e.g. 30m, 6h, 7d)")
    base = _http(url).rstrip("/")
    samples: list[Sample] = []
    for counter in COUNTERS:
        query = urllib.parse.urlencode({"query": prometheus_query(counter, window)})
        raw = _get(f"{base}/api/v1/query?{query}", timeout_s)
        try:
            answer = json.loads(raw)
            if answer.get("status") != "success":
                raise SourceError(f"Prometheus {base} refused the query: {answer.get('error', answer)}")
            for row in answer["data"]["result"]:
                samples.append((counter, dict(row["metric"]), float(row["value"][1])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise SourceError(f"{base} did not answer like Prometheus' query API: {exc}") from exc
    return samples
