"""A real headless Chromium (Debian's ``chromium`` package), driven over the DevTools protocol.

The protocol speaks JSON over a websocket; aiohttp (installed with Faust) is the client, so the
browser tests need no Python package beyond the project's. Where Chromium is missing,
:data:`CHROMIUM_MISSING` says what to install (``make test`` installs it where it can).
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from streams.kafka.broker import _die_with_parent

#: The browser binary: Debian's ``chromium`` package puts it on PATH as ``chromium``.
CHROMIUM = shutil.which("chromium")
CHROMIUM_MISSING = (
    "the browser tests need Debian's chromium package: `sudo apt-get install chromium` "
    "(`make test` installs it where apt-get can)"
)


class HeadlessChromium:
    """One headless Chromium with one page, a profile of its own in ``profile_dir``, and its log.

    Used as a context manager; every call blocks until the browser answered (or ``timeout_s``).
    """

    def __init__(self, profile_dir: Path, window: tuple[int, int] = (1280, 1400), timeout_s: float = 30.0) -> None:
        if CHROMIUM is None:
            raise RuntimeError(CHROMIUM_MISSING)
        profile_dir.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self.log_path = profile_dir / "chromium.log"
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [
                    CHROMIUM,
                    "--headless",
                    "--disable-gpu",
                    "--no-sandbox",  # tests run as root in CI containers, where the sandbox cannot start
                    "--no-first-run",
                    "--disable-extensions",
                    "--remote-debugging-port=0",  # the port it picked is written to DevToolsActivePort
                    f"--user-data-dir={profile_dir}",
                    f"--window-size={window[0]},{window[1]}",
                    "about:blank",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        self._loop = asyncio.new_event_loop()
        self._next_id = 0
        self._session: aiohttp.ClientSession | None = None
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        try:
            port = self._debugging_port(profile_dir / "DevToolsActivePort")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout_s) as reply:
                targets = json.load(reply)
            page_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            self._session, self._socket = self._run(self._connect(page_url))
            self.call("Page.enable")
            self.call("Runtime.enable")
        except BaseException:
            self.close()
            raise

    def _debugging_port(self, port_file: Path) -> int:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self.process.returncode}: {self.log_tail()}")
            if port_file.exists() and port_file.read_text().strip():
                return int(port_file.read_text().split()[0])
            time.sleep(0.1)
        raise TimeoutError(f"chromium wrote no DevToolsActivePort in {self.timeout_s:.0f} s: {self.log_tail()}")

    @staticmethod
    async def _connect(page_url: str) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
        session = aiohttp.ClientSession()  # made inside the loop it will run on
        return session, await session.ws_connect(page_url, max_msg_size=0)

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _run(self, coroutine: Any) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coroutine, self.timeout_s))

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self._socket is not None, "not connected"
        self._next_id += 1
        call_id = self._next_id
        await self._socket.send_json({"id": call_id, "method": method, "params": params})
        while True:  # events (Page.loadEventFired, console messages, ...) arrive in between; skip them
            message = await self._socket.receive()
            if message.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"the DevTools connection closed ({message.type.name}): {self.log_tail()}")
            reply = json.loads(message.data)
            if reply.get("id") == call_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply["result"]
                return result

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools protocol command and its result."""
        return self._run(self._call(method, params))

    def navigate(self, url: str) -> None:
        """Open ``url`` and wait until the document and its scripts have loaded."""
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", f"{url} did not finish loading")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-compatible values)."""
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression!r} threw: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout_s: float = 30.0) -> Any:
        """Evaluate ``expression`` until it is truthy; its value, or TimeoutError naming ``what``."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} within {timeout_s:.0f} s")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (beyond the window where it is longer)."""
        reply = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(reply["data"]))
        return path

    def close(self) -> None:
        if self._socket is not None:
            self._run(self._socket.close())
        if self._session is not None:
            self._run(self._session.close())
        self._loop.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
