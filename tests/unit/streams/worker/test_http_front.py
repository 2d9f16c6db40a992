"""The HTTP server process: frames on a channel, answers through the worker, and a lifetime tied to the worker's."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import pytest

from streams.worker.http_front import FrameReader, HttpFront, PooledHTTPServer, encode_frame


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()


def get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read(), dict(reply.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def until(condition, timeout_s: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.02)


def listening_socket() -> socket.socket:
    server = socket.create_server(("127.0.0.1", 0))
    return server


def echo(target: str, headers: Mapping[str, str]) -> Answer:
    """Says what it was asked; fails on /boom."""
    if target == "/boom":
        raise RuntimeError("a bug in the worker")
    big = b"x" * 300_000 if target.startswith("/big") else b""
    return Answer(200, f"{target} {headers.get('x-ask', '-')}".encode() + big, headers=(("Retry-After", "3"),))


@pytest.fixture
def front():
    listening = listening_socket()
    running = HttpFront(listening, echo).start()
    url = f"http://127.0.0.1:{listening.getsockname()[1]}"
    yield running, url
    running.stop()
    listening.close()


def test_frames_are_read_whole_and_in_order_however_they_arrive():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        reader = FrameReader(ours)
        big = encode_frame({"target": "/shoppers/ü", "n": 3}, b"\x00body" * 1000)
        for start in range(0, len(big), 1000):  # one frame in pieces
            theirs.sendall(big[start : start + 1000])
        assert reader.read() == ({"target": "/shoppers/ü", "n": 3}, b"\x00body" * 1000)
        theirs.sendall(encode_frame({"n": 1}) + encode_frame({"n": 2}, b"two") + big[:5])  # several in one piece
        assert reader.read() == ({"n": 1}, b"")
        assert reader.read() == ({"n": 2}, b"two")
        theirs.close()
        with pytest.raises(ConnectionError, match="inside a frame"):
            reader.read()


def test_end_of_file_between_frames_is_the_end():
    ours, theirs = socket.socketpair()
    with ours:
        theirs.sendall(encode_frame({"n": 1}) + encode_frame({"last": True}))
        theirs.close()
        reader = FrameReader(ours)
        assert reader.read() == ({"n": 1}, b"")
        assert list(reader) == [({"last": True}, b"")]
        assert reader.read() is None


def test_a_timeout_in_the_middle_of_a_frame_only_waits_again():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(0.05)
        frame = encode_frame({"n": 1}, b"body")
        theirs.sendall(frame[:6])

        def rest() -> None:
            theirs.sendall(frame[6:])
            theirs.shutdown(socket.SHUT_WR)

        threading.Timer(0.2, rest).start()
        assert list(FrameReader(ours)) == [({"n": 1}, b"body")]


def test_requests_reach_the_worker_and_its_answers_come_back_whole(front):
    running, url = front
    request = urllib.request.Request(f"{url}/shoppers/a%20b?x=1", headers={"X-Ask": "please"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert reply.status == 200
        assert reply.read() == b"/shoppers/a%20b?x=1 please"
        assert reply.headers["Retry-After"] == "3" and reply.headers["Content-Type"] == "text/plain"
    assert running.child is not None and running.child.pid != os.getpid()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda n: get(f"{url}/big?{n}")[:2], range(40)))
    assert answers == [(200, f"/big?{n} -".encode() + b"x" * 300_000) for n in range(40)]


def test_a_failed_answer_is_a_500_and_the_next_request_is_answered(front):
    _, url = front
    status, body, _ = get(f"{url}/boom")
    assert status == 500 and b"its log says why" in body
    assert get(f"{url}/fine")[:2] == (200, b"/fine -")


def test_the_process_is_out_of_ctrl_cs_reach_and_is_restarted_when_it_dies(front):
    running, url = front
    first = running.child
    # A Ctrl-C reaches the terminal's foreground process group; the worker stops the child itself.
    assert os.getpgid(first.pid) != os.getpgid(0)
    os.kill(first.pid, signal.SIGKILL)
    until(lambda: running.child is not first, what="a new HTTP server process")
    until(lambda: get(f"{url}/again")[:2] == (200, b"/again -"), what="answers from the new process")


def test_stop_ends_the_process():
    listening = listening_socket()
    running = HttpFront(listening, echo).start()
    child = running.child
    assert child is not None
    running.stop()
    assert child.returncode == 0
    listening.close()


def test_a_worker_killed_with_sigkill_takes_its_http_process_along(tmp_path):
    script = textwrap.dedent(
        """
        import socket, sys, threading
        from streams.worker.http_front import HttpFront
        listening = socket.create_server(("127.0.0.1", 0))
        front = HttpFront(listening, lambda target, headers: None).start()
        print(listening.getsockname()[1], front.child.pid, flush=True)
        threading.Event().wait()
        """
    )
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    try:
        port, child_pid = map(int, worker.stdout.readline().split())
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        worker.kill()
        worker.wait()

    def port_is_free() -> bool:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
                probe.listen()  # bind alone succeeds next to a listening socket with SO_REUSEADDR
            except OSError:
                return False
            return True

    until(port_is_free, what=f"the exit of the HTTP server process {child_pid} (its port freed)")


def test_the_in_process_server_stops_every_thread():
    server = PooledHTTPServer(("127.0.0.1", 0), object)  # type: ignore[arg-type]
    server.serve(2, "test-pooled")
    server.stop()
    until(
        lambda: not [t for t in __import__("threading").enumerate() if t.name.startswith("test-pooled")],
        what="the server threads' exit",
    )
