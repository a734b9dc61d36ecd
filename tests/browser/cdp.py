"""A headless Chromium driven through the Chrome DevTools Protocol, with the standard library only.

Just what the browser test needs: start Chromium, open one page, evaluate JavaScript, collect console messages and
exceptions, take screenshots. The websocket is tests/wsclient.py's minimal RFC 6455 client, shared with the
integration suite.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from wsclient import WebSocket, WebSocketClosed

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
]


def find_chromium() -> str | None:
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def die_with_parent() -> None:
    """preexec_fn for servers and browsers started by a test: own session (their children go with them), and a
    SIGTERM when the test process dies, even without running its clean-up (Linux; a no-op elsewhere)."""
    os.setsid()
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class CDPError(RuntimeError):
    pass


@dataclass
class ConsoleEntry:
    source: str  # "console" | "exception" | "log"
    level: str  # "error", "warning", "info", ...
    text: str
    url: str = ""
    stack: list[str] = field(default_factory=list)  # "function url:line" of each call frame

    def __str__(self) -> str:
        return f"[{self.source}:{self.level}] {self.text}" + (f"  ({self.url})" if self.url else "")


@dataclass
class Browser:
    """One headless Chromium with one page. Use as a context manager."""
    executable: str
    user_data_dir: Path
    width: int = 1600
    height: int = 1000
    process: subprocess.Popen | None = None
    ws: WebSocket | None = None
    console: list[ConsoleEntry] = field(default_factory=list)
    _next_id: int = 0

    def __enter__(self) -> "Browser":
        self.user_data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.user_data_dir.parent / "chromium.log", "wb")
        self.process = subprocess.Popen(
            [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.user_data_dir}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        port_file = self.user_data_dir / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.process.poll() is not None:
                raise CDPError(f"chromium exited with {self.process.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise CDPError("chromium did not open its DevTools port within 60 s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = WebSocket(page["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        return self

    def __exit__(self, *exc) -> None:
        if self.ws:
            try:
                self.call("Browser.close", timeout=5)
            except Exception:
                pass
            self.ws.close()
        if self.process:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    # --- protocol ---------------------------------------------------------------------------------------------

    def call(self, method: str, timeout: float = 60.0, **params):
        self._next_id += 1
        call_id = self._next_id
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        self.ws.sock.settimeout(timeout)
        while True:
            try:
                message = json.loads(self.ws.recv())
            except WebSocketClosed as error:
                raise CDPError(f"{method}: websocket closed by the browser ({error})") from error
            if message.get("id") == call_id:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def _event(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(_remote_object_text(a) for a in params.get("args", []))
            stack = _stack(params.get("stackTrace"))
            frames = (params.get("stackTrace") or {}).get("callFrames") or [{}]
            self.console.append(ConsoleEntry("console", params.get("type", ""), text, frames[0].get("url", ""),
                                             stack))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exception = details.get("exception") or {}
            text = exception.get("description") or details.get("text", "")
            self.console.append(ConsoleEntry("exception", "error", text, details.get("url", ""),
                                             _stack(details.get("stackTrace"))))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.console.append(ConsoleEntry("log", entry.get("level", ""), entry.get("text", ""),
                                             entry.get("url", "")))

    def pump(self, seconds: float) -> None:
        """Let the page run for a while, collecting its console output."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.evaluate("0")
            time.sleep(0.1)

    def evaluate(self, expression: str, timeout: float = 60.0):
        result = self.call("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                           returnByValue=True, userGesture=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = (details.get("exception") or {}).get("description") or details.get("text")
            raise CDPError(f"page evaluation failed: {text}\n--- expression ---\n{expression[:2000]}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, what: str = ""):
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise CDPError(f"timed out after {timeout:.0f} s waiting for {what or expression}")
            time.sleep(0.2)

    def navigate(self, url: str, timeout: float = 60.0) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", timeout, f"{url} to load")

    def screenshot(self, path: Path, clip: dict | None = None) -> Path:
        params = {"format": "png", "captureBeyondViewport": False}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        data = self.call("Page.captureScreenshot", **params)["data"]
        path.write_bytes(base64.b64decode(data))
        return path


def _remote_object_text(obj: dict) -> str:
    if "value" in obj:
        return str(obj["value"])
    return obj.get("description") or obj.get("unserializableValue") or obj.get("type", "")


def _stack(trace: dict | None) -> list[str]:
    frames = []
    while trace:
        frames += [f"{f.get('functionName') or '<anonymous>'} {f.get('url', '')}:{f.get('lineNumber', 0) + 1}"
                   for f in trace.get("callFrames", [])]
        trace = trace.get("parent")
    return frames
