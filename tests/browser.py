"""Headless Chromium (the Debian package) driven over the DevTools protocol on a pipe.

Used by tests/integration/test_status_page.py and scripts/status_screenshot.py. The
page runs in real time (no virtual time): its polls and charts are what a person sees.
Bounded: every protocol call has a deadline, and leaving the ``with`` block kills the
browser's whole process group (renderers included) and removes its profile.

``--remote-debugging-pipe``: the browser reads commands on fd 3 and writes answers and
events on fd 4, JSON messages ended by a NUL byte.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

#: Debian's packages: chromium-headless-shell (lighter; scripts/install --browser) or chromium.
BINARIES = ("chromium-headless-shell", "chromium")
INSTALL_HINT = (
    "headless Chromium not found (looked for "
    + ", ".join(BINARIES)
    + "): `bash scripts/install --browser` installs Debian's chromium-headless-shell "
    "(scripts/test does)"
)
#: No first-run work, no background fetches: the browser talks to the farm only.
FLAGS = (
    "--headless",
    "--no-sandbox",  # root and containers; the pages are our own
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--hide-scrollbars",
    "--mute-audio",
    "--no-first-run",
    "--remote-debugging-pipe",
)


def find() -> str | None:
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _above_4(fd: int) -> int:
    """``fd`` moved to a number above 4 (the redirections to fds 3 and 4 cannot clobber it)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class BrowserError(RuntimeError):
    pass


class Chromium:
    """``with Chromium() as b: b.open(url); b.wait_for("js expr"); b.html(); b.screenshot(p)``.

    ``errors`` collects the page's uncaught exceptions, console errors and browser log
    errors (a Content-Security-Policy violation is one) as text.
    """

    def __init__(self, width: int = 1280, height: int = 1600, timeout_s: float = 30.0) -> None:
        binary = find()
        if binary is None:
            raise BrowserError(INSTALL_HINT)
        self.binary, self.width, self.height, self.timeout_s = binary, width, height, timeout_s
        self.errors: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._profile = Path(tempfile.mkdtemp(prefix="ctr-farm-chromium-"))
        self._id = 0
        self._buf = b""
        self._session: str | None = None

    # -- process -----------------------------------------------------------------------
    def __enter__(self) -> Chromium:
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        cmd_r, out_w = (_above_4(fd) for fd in (cmd_r, out_w))  # never clobbered by 3<& 4>&
        argv = [
            self.binary,
            *FLAGS,
            f"--user-data-dir={self._profile}",
            f"--window-size={self.width},{self.height}",
            "about:blank",
        ]
        # bash moves our pipe ends to fds 3 and 4 (dash takes one-digit fds only; no
        # preexec_fn: it is unsafe with threads).
        script = f'exec "$@" 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-'
        with (self._profile / "chromium.log").open("wb") as log:
            self._proc = subprocess.Popen(
                ["bash", "-c", script, "bash", *argv],
                pass_fds=(cmd_r, out_w),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        os.close(cmd_r)
        os.close(out_w)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            with contextlib.suppress(BrowserError, TimeoutError, OSError):
                self._send("Browser.close", timeout_s=5.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)  # its renderers, whatever is left
            self._proc.wait(5)
        for fd in (self._cmd_w, self._out_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._profile, ignore_errors=True)

    # -- protocol ----------------------------------------------------------------------
    def _send(self, method: str, timeout_s: float | None = None, **params: Any) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self._session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self._session
        os.write(self._cmd_w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._event(reply)

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out_r], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer in time (log: {self.log()[-500:]})")
            chunk = os.read(self._out_r, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium exited: {self.log()[-2000:]}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def _event(self, event: dict[str, Any]) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details["text"])
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(
                " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(params["entry"]["text"])

    def log(self) -> str:
        path = self._profile / "chromium.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- the page ----------------------------------------------------------------------
    def open(self, url: str) -> None:
        target = self._send("Target.createTarget", url="about:blank")["targetId"]
        self._session = self._send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log"):
            self._send(f"{domain}.enable")
        self._send(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )
        answer = self._send("Page.navigate", url=url)
        if answer.get("errorText"):
            raise BrowserError(f"{url}: {answer['errorText']}")

    def evaluate(self, expression: str) -> Any:
        result = self._send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 30.0, every_s: float = 0.2) -> Any:
        """Evaluate until truthy; TimeoutError naming the expression otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(BrowserError):  # e.g. the document is not there yet
                value = self.evaluate(expression)
                if value:
                    return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still false after {timeout_s}s: {self.errors}")
            time.sleep(every_s)

    def html(self) -> str:
        return self.evaluate("document.documentElement.outerHTML")

    def screenshot(self, path: Path) -> None:
        shot = self._send("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        path.write_bytes(base64.b64decode(shot["data"]))
