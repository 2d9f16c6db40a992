"""The worker's HTTP server in a process of its own, so that a request's socket calls never wait for the GIL.

Why a process. The batch loop keeps the worker's GIL busy. A thread of the worker that blocks
(``accept``, ``recv``, ``send``, ``close``: each releases the GIL) must win it back each time, a
wait of up to one switch interval plus the OS scheduler's, several times per request. Measured
on the two-core machine at half load: the worker's in-process server added 4-5 ms to the p99 of a
lookup over the same server in a process of its own (``BENCHMARKS.md``, "Shopper lookup").

How. The worker binds the listening socket (so its port and any bind error are known before the
worker starts) and starts ``python -m streams.worker.http_front``, which inherits:

* the listening socket: the child accepts, parses and writes HTTP (:class:`PooledHTTPServer`);
* one socket pair per server thread (a *channel*): the child sends a request's target and
  headers as one frame and reads the answer as one frame; a worker thread per channel blocks in
  ``recv``, answers (a lookup, a scrape, the console) and sends. A request then costs the worker
  one GIL wait (the wake-up) instead of one per socket call;
* the read end of a pipe whose write end only the worker holds: the child exits as soon as it
  reads end-of-file there, so a worker killed with ``kill -9`` takes its HTTP server with it and
  a restarted worker can bind the port again.

The child runs in a session of its own, so a Ctrl-C (or a signal to the worker's process group)
reaches the worker alone, which then shuts down in order: the child lives exactly as long as the
worker wants it. If it dies on its own, the worker logs it and starts another on the same socket.

This module imports the standard library only: the child starts in tens of milliseconds and holds
no model, table or Kafka client.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Protocol

log = logging.getLogger(__name__)

#: HTTP server threads, and channels to the worker (a forwarded lookup holds one while it waits).
SERVER_THREADS = 4
#: A frame: the lengths of its JSON head and of its body, then both.
_LENGTHS = struct.Struct(">II")
#: How long the worker waits before starting a new child after one died on its own.
RESTART_DELAY_S = 1.0
#: How long the worker's feed may wait for the child to take a frame before the child is replaced.
FEED_TIMEOUT_S = 2.0
#: Requests the child may answer from its mirror (:data:`streams.worker.lookup.LOOKUP_PATH`).
MIRRORED_PATH = "/shoppers/"
#: How often the child reports the durations of the lookups it answered.
REPORT_INTERVAL_S = 1.0


class PooledHTTPServer(HTTPServer):
    """An HTTP server whose threads each wait in ``accept()`` and answer the connection themselves.

    ``ThreadingHTTPServer`` starts a thread per request; here a request costs no thread start
    (in the worker's process, each was another wait for the GIL).
    """

    def serve(self, threads: int, name: str) -> None:
        """Start ``threads`` daemon threads answering requests until :meth:`stop`."""
        for n in range(threads):
            threading.Thread(target=self._accept_loop, name=f"{name}-{n}", daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                connection, address = self.socket.accept()
            except OSError:  # the listening socket was shut down: stop
                return
            try:
                self.finish_request(connection, address)
            except Exception:  # noqa: BLE001 - one broken request must not stop the thread
                self.handle_error(connection, address)
            finally:
                self.shutdown_request(connection)

    def stop(self) -> None:
        """Wake every thread out of ``accept()`` and close the socket."""
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected: accept() still returns with an error once the socket closes
        self.server_close()


class AnswerHandler(BaseHTTPRequestHandler):
    """A request handler that writes an answer in one piece and keeps no access log."""

    # headers and body leave in one write, without waiting for the client's ACK of the first part
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True

    def request_headers(self) -> dict[str, str]:
        """The request's headers, names in lower case (as :data:`Responder` takes them)."""
        return {name.lower(): value for name, value in self.headers.items()}

    def send_answer(self, status: int, content_type: str, headers: Iterable[Sequence[str]], body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet access log
        pass


class Answer(Protocol):
    """What the worker answers a request with (:class:`streams.worker.lookup.Reply` is one)."""

    @property
    def status(self) -> int: ...
    @property
    def body(self) -> bytes: ...
    @property
    def content_type(self) -> str: ...
    @property
    def headers(self) -> tuple[tuple[str, str], ...]: ...


#: Answers a GET: (target, request headers with lower-case names) -> the answer.
Responder = Callable[[str, Mapping[str, str]], Answer]


def encode_frame(head: Mapping[str, object], body: bytes = b"") -> bytes:
    """One message on a channel: the lengths, a JSON head, the raw body."""
    encoded = json.dumps(head, separators=(",", ":")).encode()
    return _LENGTHS.pack(len(encoded), len(body)) + encoded + body


class FrameReader:
    """Reads the frames arriving on one socket, in order, from as few ``recv`` calls as it can
    (each releases the GIL); bytes of the next frame that came with one are kept for it."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self._buffer = bytearray()

    def read(self) -> tuple[dict[str, object], bytes] | None:
        """The next frame, or None at end-of-file."""
        buffer = self._buffer
        needed = _LENGTHS.size
        while True:
            if len(buffer) >= _LENGTHS.size:
                head_length, body_length = _LENGTHS.unpack_from(buffer)
                needed = _LENGTHS.size + head_length + body_length
                if len(buffer) >= needed:
                    break
            chunk = self.connection.recv(max(65536, needed - len(buffer)))
            if not chunk:
                if buffer:
                    raise ConnectionError(f"the connection closed inside a frame ({len(buffer)} of {needed} bytes)")
                return None
            buffer += chunk
        head_end = _LENGTHS.size + head_length
        frame = json.loads(buffer[_LENGTHS.size : head_end]), bytes(buffer[head_end:needed])
        del buffer[:needed]
        return frame

    def __iter__(self) -> Iterator[tuple[dict[str, object], bytes]]:
        """The frames until end-of-file or a broken connection; a socket timeout only waits again
        (what arrived of a frame stays in the buffer)."""
        while True:
            try:
                frame = self.read()
            except TimeoutError:
                continue
            except OSError:
                return
            if frame is None:
                return
            yield frame


def _plain(status: int, text: str) -> bytes:
    """A frame answering ``status`` with a line of text."""
    return encode_frame({"status": status, "content_type": "text/plain; charset=utf-8", "headers": []}, text.encode())


class HttpFront:
    """The worker's side: starts the child on ``listening`` and answers its requests with ``respond``.

    With a ``greeting``, the child also keeps a :class:`streams.worker.lookup.LookupMirror` and answers
    the lookups it can from it: one more socket pair (the *feed*) carries the greeting first, then
    every frame given to :meth:`send`; the other way, the child reports the durations of the lookups
    it answered, about once a second, to ``on_report``.

    Args:
        listening: the bound, listening server socket; stays open here (a new child reuses it).
        respond: builds the answer to one request; runs on one of this object's threads.
        threads: the child's server threads, and so the channels and the threads answering here.
        greeting: the feed's first frame (:meth:`streams.worker.lookup.ShopperLookup.mirror_greeting`).
        on_report: takes the head of each frame the child reports.
    """

    def __init__(
        self,
        listening: socket.socket,
        respond: Responder,
        threads: int = SERVER_THREADS,
        greeting: bytes | None = None,
        on_report: Callable[[dict[str, object]], None] | None = None,
    ) -> None:
        self.listening = listening
        self.respond = respond
        self.threads = threads
        self.greeting = greeting
        self.on_report = on_report
        self.child: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._spawning = threading.Lock()  # a child is never started after stop()
        self._lifeline = -1  # the write end of the child's pipe; closing it ends the child
        self._feed: socket.socket | None = None
        self._sending = threading.Lock()

    def start(self) -> HttpFront:
        self._spawn()
        threading.Thread(target=self._watch, name="shoppulse-http-front-watch", daemon=True).start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the child (it exits at end-of-file on its pipe) and wait for it."""
        with self._spawning:
            self._stopping.set()
            self._close_lifeline()
        if self.child is not None:
            try:
                self.child.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the HTTP server process %d did not exit in %.0f s; killing it", self.child.pid, timeout_s)
                self.child.kill()
                self.child.wait()

    def send(self, frame: bytes) -> None:
        """Feed ``frame`` to the child (no-op without a greeting, or while no child runs).

        Blocks only while the child is a socket buffer behind; one that stays behind for
        :data:`FEED_TIMEOUT_S` is killed and replaced (with an empty mirror).
        """
        with self._sending:
            feed = self._feed
            if feed is None:
                return
            try:
                feed.sendall(frame)
            except TimeoutError:
                log.error("the HTTP server process fell %.0f s behind the worker's feed; replacing it", FEED_TIMEOUT_S)
                self._feed = None
                if self.child is not None:
                    self.child.kill()
            except OSError:
                self._feed = None  # the child is gone; the watcher starts another

    def _spawn(self) -> None:
        pairs = [socket.socketpair() for _ in range(self.threads)]
        feed = socket.socketpair() if self.greeting is not None else None
        lifeline_read, self._lifeline = os.pipe()
        theirs = [child_end.fileno() for _, child_end in pairs]
        arguments = ["--listen-fd", str(self.listening.fileno()), "--lifeline-fd", str(lifeline_read)]
        arguments += ["--channel-fds", ",".join(map(str, theirs))]
        passed = [self.listening.fileno(), lifeline_read, *theirs]
        if feed is not None:
            arguments += ["--feed-fd", str(feed[1].fileno())]
            passed.append(feed[1].fileno())
        try:
            self.child = subprocess.Popen(
                [sys.executable, "-m", __name__, *arguments], pass_fds=passed, start_new_session=True
            )
        finally:
            os.close(lifeline_read)
            for _, child_end in pairs:
                child_end.close()
            if feed is not None:
                feed[1].close()
        for n, (ours, _) in enumerate(pairs):
            threading.Thread(target=self._answer, args=(ours,), name=f"shoppulse-http-{n}", daemon=True).start()
        if feed is not None:
            ours_feed = feed[0]
            ours_feed.settimeout(FEED_TIMEOUT_S)
            with self._sending:
                assert self.greeting is not None
                ours_feed.sendall(self.greeting)
                self._feed = ours_feed
            threading.Thread(
                target=self._read_reports, args=(ours_feed,), name="shoppulse-http-reports", daemon=True
            ).start()
        log.info("HTTP server process %d serves the worker's port", self.child.pid)

    def _read_reports(self, feed: socket.socket) -> None:
        """Hand each frame the child reports to ``on_report`` until its feed closes."""
        with feed:
            for head, _ in FrameReader(feed):
                if self.on_report is not None:
                    self.on_report(head)

    def _close_lifeline(self) -> None:
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1

    def _watch(self) -> None:
        """Start a new child when one dies on its own."""
        while True:
            child = self.child
            assert child is not None
            code = child.wait()
            if self._stopping.is_set():
                return
            log.error(
                "the HTTP server process %d exited with code %s; starting another in %.0f s",
                child.pid,
                code,
                RESTART_DELAY_S,
            )
            self._close_lifeline()
            if self._stopping.wait(RESTART_DELAY_S):
                return
            with self._spawning:
                if self._stopping.is_set():
                    return
                self._spawn()

    def _answer(self, channel: socket.socket) -> None:
        """Answer the frames of one channel until the child closes it."""
        with channel:
            for head, _ in FrameReader(channel):
                target, headers = head["target"], head["headers"]
                assert isinstance(target, str) and isinstance(headers, dict)
                try:
                    answer = self.respond(target, headers)
                    reply = encode_frame(
                        {
                            "status": answer.status,
                            "content_type": answer.content_type,
                            "headers": [list(header) for header in answer.headers],
                        },
                        answer.body,
                    )
                except Exception:  # noqa: BLE001 - one failed answer must not end the channel
                    log.exception("answering GET %s failed", target)
                    reply = _plain(500, "the worker failed to answer this request; its log says why\n")
                try:
                    channel.sendall(reply)
                except OSError:
                    return


class Mirror(Protocol):
    """What the child answers from itself (:class:`streams.worker.lookup.LookupMirror`)."""

    def take(self, head: Mapping[str, object], body: bytes) -> None: ...
    def answer(self, target: str) -> Answer | None: ...


class _Reporter:
    """The child's record of the lookups it answered itself, sent to the worker about once a second."""

    def __init__(self, feed: socket.socket) -> None:
        self.feed = feed
        self._seconds: list[float] = []

    def observe(self, seconds: float) -> None:
        self._seconds.append(seconds)

    def run(self) -> None:
        while True:
            time.sleep(REPORT_INTERVAL_S)
            if self._seconds:
                seconds, self._seconds = self._seconds, []
                try:
                    self.feed.sendall(encode_frame({"kind": "lookup_seconds", "seconds": seconds}))
                except OSError:
                    return


def _follow(feed: FrameReader, mirror: Mirror) -> None:
    """Apply every frame the worker feeds until the feed closes."""
    for frame in feed:
        mirror.take(*frame)


def _open_mirror(feed: FrameReader) -> Mirror | None:
    """The mirror the worker's greeting describes; None (relay every request) when it cannot be built."""
    from streams.worker.lookup import LookupMirror  # noqa: PLC0415 - features and numpy only when fed

    greeting = feed.read()
    if greeting is None:
        return None
    try:
        return LookupMirror.from_greeting(greeting[0])
    except ValueError as exc:
        print(f"shoppulse HTTP server process: relaying every lookup to the worker: {exc}", file=sys.stderr)
        return None


def serve(
    listening: socket.socket, channels: list[socket.socket], lifeline: int, feed: socket.socket | None = None
) -> None:
    """The child: answer HTTP on ``listening`` through ``channels`` (and ``feed``'s mirror, if any)
    until ``lifeline`` reads end-of-file."""
    idle: queue.SimpleQueue[FrameReader] = queue.SimpleQueue()
    for channel in channels:
        idle.put(FrameReader(channel))
    fed = FrameReader(feed) if feed is not None else None
    mirror = _open_mirror(fed) if fed is not None else None
    # What exists now (the modules, numpy's among them: ~36k objects) lives as long as the process:
    # out of the cyclic collector's full passes, each of which took 18 ms over them (measured).
    gc.freeze()
    reporter = _Reporter(feed) if feed is not None and mirror is not None else None
    if fed is not None and mirror is not None and reporter is not None:
        threading.Thread(target=_follow, args=(fed, mirror), name="feed", daemon=True).start()
        threading.Thread(target=reporter.run, name="reports", daemon=True).start()

    class Relay(AnswerHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            if mirror is not None and reporter is not None and self.path.startswith(MIRRORED_PATH):
                started = time.perf_counter()
                answer = mirror.answer(self.path)
                if answer is not None:
                    self.send_answer(answer.status, answer.content_type, answer.headers, answer.body)
                    reporter.observe(time.perf_counter() - started)
                    return
            request = encode_frame({"target": self.path, "headers": self.request_headers()})
            channel = idle.get()
            try:
                channel.connection.sendall(request)
                frame = channel.read()
            except OSError:
                frame = None
            finally:
                idle.put(channel)
            if frame is None:  # the worker is gone: this process ends as soon as the lifeline says so
                self.send_error(503, "the worker behind this server is not answering")
                return
            head, body = frame
            status, content_type, headers = head["status"], head["content_type"], head["headers"]
            assert isinstance(status, int) and isinstance(content_type, str) and isinstance(headers, list)
            self.send_answer(status, content_type, headers, body)

    server = PooledHTTPServer(listening.getsockname()[:2], Relay, bind_and_activate=False)
    server.socket.close()
    server.socket = listening
    server.serve(len(channels), "shoppulse-http-front")
    while os.read(lifeline, 1):  # the worker never writes: this returns at its exit
        pass
    os._exit(0)  # noqa: SLF001 - no cleanup to wait for: the server threads hold no state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the worker's HTTP server process (started by the worker)")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--channel-fds", required=True)
    parser.add_argument("--lifeline-fd", type=int, required=True)
    parser.add_argument("--feed-fd", type=int)
    args = parser.parse_args(argv)
    channels = [socket.socket(fileno=int(fd)) for fd in args.channel_fds.split(",")]
    feed = socket.socket(fileno=args.feed_fd) if args.feed_fd is not None else None
    serve(socket.socket(fileno=args.listen_fd), channels, args.lifeline_fd, feed)


if __name__ == "__main__":
    main()
