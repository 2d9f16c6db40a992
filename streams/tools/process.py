"""A ``shoppulse worker`` child process: what the demo, the benchmarks and the tests run.

The child is started with exactly the given settings (as environment variables), dies with its
parent (``PR_SET_PDEATHSIG``), and is watched through its own ``/readyz`` and ``/metrics``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from streams.config import SETTINGS_DOC, Settings
from streams.kafka.broker import _die_with_parent


def stop_on_signals() -> threading.Event:
    """An event that SIGINT and SIGTERM set, instead of killing this process.

    Install it before announcing anything another process may signal (a banner, a pid file).
    """
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, in seconds (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_bytes(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of ``/proc/PID/status`` in bytes: ``VmRSS`` (now) or ``VmHWM`` (peak RSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"/proc/{pid}/status has no {field}")


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The upper bound of the bucket holding quantile ``q`` of cumulative ``(le, count)`` buckets.

    Coarser than Prometheus' interpolation, but never below the true quantile; ``inf`` when it
    lies beyond the last finite bucket, 0 when there are no observations.
    """
    total = buckets[-1][1] if buckets else 0
    if total == 0:
        return 0.0
    return next(le for le, count in buckets if count >= q * total)


def worker_environment(settings: Settings) -> dict[str, str]:
    """Environment for a ``shoppulse worker`` child with these settings."""
    env = dict(os.environ)
    for name, (var, _, _) in SETTINGS_DOC.items():
        env[var] = str(getattr(settings, name))
    return env


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> int:
    """SIGTERM (graceful: the worker commits and closes its tables), SIGKILL after ``timeout_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def cli_module(checkout: Path | None) -> str:
    """The ``shoppulse`` command's module in ``checkout`` (None: this one). Checkouts from before
    streams/ was split by role (benchmarks compare with them) have it at ``streams/cli.py``."""
    if checkout is not None and not (checkout / "streams" / "tools" / "cli.py").exists():
        return "streams.cli"
    return "streams.tools.cli"


class WorkerProcess:
    """``shoppulse worker`` as a child process, its output kept in ``log_path``.

    ``checkout``: run the worker code of another checkout of this repository (benchmarks compare
    revisions this way); None runs this one. Paths in ``settings`` must then be absolute.
    ``script``: Python source to run instead of ``shoppulse worker`` (tests inject faults this way).
    """

    def __init__(
        self, settings: Settings, log_path: Path, checkout: Path | None = None, script: str | None = None
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        command = ["-m", cli_module(checkout), "worker"] if script is None else ["-c", script]
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, *command],
                cwd=checkout,
                env=worker_environment(settings),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://{self.settings.metrics_host}:{self.settings.metrics_port}"

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the worker's output, for error messages."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Seconds until ``/readyz`` says ready; raises with the worker's log otherwise."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if self.readiness()[0] == 200:
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready after {timeout_s} s:\n{self.log_tail()}")

    def readiness(self) -> tuple[int, str]:
        """``/readyz``: 200 and ``ready``, or 503 and ``not ready: <reason>``; OSError when nobody answers."""
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as reply:
                return reply.status, reply.read().decode().strip()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode().strip()

    def metrics_text(self, only: str | None = None) -> str:
        """The worker's ``/metrics`` page; ``only``: just that series (``name[]``)."""
        query = "" if only is None else "?" + urllib.parse.urlencode({"name[]": only})
        with urllib.request.urlopen(f"{self.url}/metrics{query}", timeout=5) as reply:
            return reply.read().decode()

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric, or the sum over its labels (a counter by its ``_total`` name);
        ``name{label="value",...}`` (labels as the page orders them): that one series."""
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in self.metrics_text(only=name.split("{", 1)[0]).splitlines()
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{")
        )

    def histogram(self, name: str) -> list[tuple[float, float]]:
        """Cumulative ``(le, count)`` buckets of an unlabelled histogram, ``le`` ascending (``inf`` last)."""
        prefix = f'{name}_bucket{{le="'
        return sorted(
            (float(line[len(prefix) : line.index('"', len(prefix))]), float(line.rsplit(" ", 1)[1]))
            for line in self.metrics_text(only=f"{name}_bucket").splitlines()
            if line.startswith(prefix)
        )

    def wait_for_metric(self, name: str, at_least: float, timeout_s: float) -> float:
        """Poll :meth:`metric` until it reaches ``at_least`` or ``timeout_s`` passes; returns the last value."""
        deadline = time.monotonic() + timeout_s
        value = self.metric(name)
        while value < at_least and time.monotonic() < deadline:
            time.sleep(0.5)
            value = self.metric(name)
        return value

    def cpu_seconds(self) -> float:
        """CPU time the worker has used so far, in seconds."""
        return cpu_seconds(self.pid)

    def memory_bytes(self, field: str = "VmRSS") -> int:
        """The worker's resident memory now (``VmRSS``) or at its peak (``VmHWM``), in bytes."""
        return memory_bytes(self.pid, field)

    def stop(self) -> int:
        """Graceful stop; returns the exit code."""
        return stop_process(self.process)

    def kill(self) -> None:
        """``kill -9``: no commit, no clean close."""
        self.process.kill()
        self.process.wait()
