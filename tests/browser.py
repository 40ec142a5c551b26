"""Open a local HTML page in headless Chromium (Debian's `chromium`) with the network off, over the DevTools
protocol: every request the page attempts, what a script on it evaluates to, and a full-page screenshot.

The network is off twice over: every host resolves to nothing (--host-resolver-rules) and every proxied
request goes to a closed port (--proxy-server); the DevTools log still sees each request attempted.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import stop_process

CHROMIUM = "chromium"


def chromium() -> str | None:
    return shutil.which(CHROMIUM)


@dataclass
class PageVisit:
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, its own included
    value: Any = None  # what `expression` evaluated to after the load event
    screenshot: bytes = b""


def visit(page: Path, expression: str, screenshot: bool = False, width: int = 1280, timeout: float = 90) -> PageVisit:
    """Load `page`, wait for its load event, evaluate `expression` (JSON-serializable), optionally screenshot."""
    from websockets.sync.client import connect

    profile = Path(tempfile.mkdtemp(prefix="tlpipe-chromium-"))
    process = subprocess.Popen([
        chromium() or CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
        "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={width},900", "about:blank",
    ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):  # Chromium writes it when ready
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit {process.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split("\n")[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as answer:
            target = next(t for t in json.load(answer) if t["type"] == "page")
        with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as socket:
            return _drive(socket, page, expression, screenshot, width, deadline)
    finally:
        stop_process(process)
        shutil.rmtree(profile, ignore_errors=True)


def _drive(socket, page: Path, expression: str, screenshot: bool, width: int, deadline: float) -> PageVisit:
    visit_ = PageVisit()
    counter = iter(range(1, 1_000_000))

    def call(method: str, **params: Any) -> dict:
        ident = next(counter)
        socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = _receive(socket, deadline)
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def _receive(socket, deadline: float) -> dict:
        message = json.loads(socket.recv(timeout=max(0.1, deadline - time.monotonic())))
        if message.get("method") == "Network.requestWillBeSent":
            visit_.requests.append(message["params"]["request"]["url"])
        if message.get("method") == "Page.loadEventFired":
            loaded.append(True)
        return message

    loaded: list[bool] = []
    call("Network.enable")
    call("Page.enable")
    call("Page.navigate", url=page.resolve().as_uri())
    while not loaded:
        _receive(socket, deadline)
    result = call("Runtime.evaluate", expression=f"JSON.stringify({expression})", returnByValue=True,
                  awaitPromise=True)
    visit_.value = json.loads(result["result"]["value"])
    if screenshot:
        height = call("Runtime.evaluate", expression="document.documentElement.scrollHeight",
                      returnByValue=True)["result"]["value"]
        shot = call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                    clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
        visit_.screenshot = base64.b64decode(shot["data"])
    return visit_
