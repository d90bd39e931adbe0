"""Headless Chromium over the Chrome DevTools Protocol, with websocket-client only.

What tests/test_report_browser.py and tools/report_screenshots.py drive a report.html with: the
system's Chromium (Debian's ``chromium``; ``$CHROMIUM`` names another binary) started headless with a
fresh profile and everything that reaches the network switched off, one page, real mouse clicks at an
element's centre, JavaScript evaluation, screenshots, and the record of what the page logged and
requested (console messages, uncaught exceptions, browser log entries, every request it made).

    with Browser(profile_dir) as browser:
        page = browser.page(width=1400, height=900)
        page.goto(Path("report.html").resolve().as_uri())
        page.click("svg rect.cell[data-node='L2H3']")
        page.wait_for("document.querySelector('#pair-title') !== null")
        page.errors(), page.requests()
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from typing import List, Optional

# No first-run UI, no background or component traffic, no QUIC, no GPU; the page's own requests are
# what the record shows.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--disable-breakpad", "--metrics-recording-only",
         "--no-default-browser-check", "--hide-scrollbars", "--mute-audio", "--remote-debugging-port=0"]
INSTALL_HINT = ("install Debian's chromium (`apt-get install chromium`; `make test` does it), or name a Chromium or "
                "Chrome binary in $CHROMIUM")


def find_chromium() -> str:
    """The Chromium binary: $CHROMIUM, else chromium / chromium-browser / google-chrome on PATH.
    Raises RuntimeError saying how to install it."""
    named = os.environ.get("CHROMIUM")
    candidates = [named] if named else ["chromium", "chromium-browser", "google-chrome"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError(f"no Chromium found ({', '.join(candidates)} not on PATH); {INSTALL_HINT}")


class Browser:
    """A headless Chromium with a fresh profile in ``profile_dir`` (a context manager)."""

    def __init__(self, profile_dir: str, binary: Optional[str] = None, timeout: float = 60.0):
        import websocket  # websocket-client

        self.binary = binary or find_chromium()
        self.timeout = timeout
        self.proc = subprocess.Popen([self.binary, *FLAGS, f"--user-data-dir={profile_dir}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = self._devtools_url()
        # no Origin header: Chromium refuses DevTools connections from other origins
        self.ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True)
        self._next_id = 0
        self.events: List[dict] = []

    def _devtools_url(self) -> str:
        seen = []
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline().decode(errors="replace")
            if not line and self.proc.poll() is not None:
                break
            seen.append(line.rstrip())
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                return m.group(1)
        self.proc.kill()
        raise RuntimeError(f"{self.binary} did not start its DevTools endpoint: " + " | ".join(seen[-5:]))

    def send(self, method: str, session: Optional[str] = None, **params) -> dict:
        """One DevTools command; its result (events that arrive meanwhile are kept in ``events``)."""
        self._next_id += 1
        msg = dict(id=self._next_id, method=method, params=params)
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _receive(self) -> dict:
        message = json.loads(self.ws.recv())
        if "method" in message:
            self.events.append(message)
        return message

    def pump(self, seconds: float) -> None:
        """Collect the events of the next ``seconds``."""
        import websocket

        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.ws.settimeout(left)
            try:
                self._receive()
            except websocket.WebSocketTimeoutException:
                break
        self.ws.settimeout(self.timeout)

    def page(self, width: int = 1400, height: int = 900) -> "Page":
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        return Page(self, session, width, height)

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    """One tab: navigation, evaluation, real clicks, screenshots, and what it logged and requested."""

    def __init__(self, browser: Browser, session: str, width: int, height: int):
        self.browser, self.session = browser, session
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params) -> dict:
        return self.browser.send(method, self.session, **params)

    def _events(self, method: str) -> List[dict]:
        return [e["params"] for e in self.browser.events if e.get("sessionId") == self.session and e["method"] == method]

    def goto(self, url: str) -> None:
        """Load ``url`` and wait for its load event."""
        loads = len(self._events("Page.loadEventFired"))
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + self.browser.timeout
        while len(self._events("Page.loadEventFired")) == loads:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading")
            self.browser.pump(0.1)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (JSON-serialisable); a thrown error is raised here."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def wait_for(self, condition: str, timeout: float = 10.0) -> None:
        """Wait until the JavaScript expression ``condition`` is truthy (in JavaScript: an element is)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.evaluate(f"Boolean({condition})"):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout} s: {condition}")
            self.browser.pump(0.05)

    def click(self, selector: str) -> None:
        """A real mouse click (move, press, release) at the centre of the first element ``selector``
        matches, scrolled into view first."""
        box = self.evaluate(f"""(() => {{
            const e = document.querySelector({json.dumps(selector)});
            if (!e) return null;
            e.scrollIntoView({{block: "center", inline: "center"}});
            const r = e.getBoundingClientRect();
            return [r.left + r.width / 2, r.top + r.height / 2];
        }})()""")
        if box is None:
            raise LookupError(f"nothing matches {selector!r}")
        x, y = box
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def select(self, selector: str, value: str) -> None:
        """Choose ``value`` in the <select> ``selector`` as a user would (a change event follows)."""
        self.evaluate(f"""(() => {{
            const e = document.querySelector({json.dumps(selector)});
            e.value = {json.dumps(value)};
            e.dispatchEvent(new Event("change", {{bubbles: true}}));
        }})()""")

    def screenshot(self, path: str) -> str:
        """A PNG of the viewport."""
        data = self.send("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    def errors(self) -> List[str]:
        """Every console error or assertion, uncaught exception and browser log error so far."""
        out = [f"console.{e['type']}: " + " ".join(str(a.get("value", a.get("description"))) for a in e.get("args", []))
               for e in self._events("Runtime.consoleAPICalled") if e["type"] in ("error", "assert")]
        out += [f"exception: {e['exceptionDetails'].get('exception', {}).get('description') or e['exceptionDetails'].get('text')}"
                for e in self._events("Runtime.exceptionThrown")]
        out += [f"log.{e['entry']['level']}: {e['entry']['text']} ({e['entry'].get('url', '')})"
                for e in self._events("Log.entryAdded") if e["entry"]["level"] == "error"]
        return out

    def requests(self) -> List[str]:
        """The URL of every request the page made (its own document's included)."""
        return [e["request"]["url"] for e in self._events("Network.requestWillBeSent")]
