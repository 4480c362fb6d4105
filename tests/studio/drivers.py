"""Two ways to drive a real browser through the same small interface, so one flow runs in both:

* `PlaywrightDriver`: Debian's Chromium through Playwright (real clicks, real downloads).
* `BidiDriver`: Firefox through its built-in WebDriver BiDi server. Playwright's Firefox needs its own
  patched build (not installable here) or a newer Firefox than Debian's ESR, and geckodriver is not
  packaged; BiDi itself is enough: navigate, run scripts, take screenshots. Clicks and file picks are done
  by script in the page, and a download is read from the link the page offers.

Both start a fresh profile with a fake camera, and keep the browser off the network (loopback only).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CHROMIUM_CANDIDATES = (
    "/usr/lib/chromium/chromium",  # Debian's real binary (the /usr/bin/chromium wrapper adds nothing we need)
    "/usr/bin/chromium",
    "/usr/bin/chromium-browser",
    "/usr/bin/google-chrome",
)
FIREFOX_CANDIDATES = ("/usr/bin/firefox-esr", "/usr/bin/firefox")

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
)

# Firefox: a fake camera without a permission prompt, and nothing but loopback on the network (a proxy that
# does not exist for every other address; no updates, telemetry or remote settings).
FIREFOX_PREFS = {
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "media.autoplay.default": 0,
    "browser.download.folderList": 2,
    "network.proxy.type": 1,
    "network.proxy.http": "127.0.0.1",
    "network.proxy.http_port": 9,
    "network.proxy.ssl": "127.0.0.1",
    "network.proxy.ssl_port": 9,
    "network.proxy.no_proxies_on": "localhost, 127.0.0.1",
    "network.proxy.allow_hijacking_localhost": False,
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "app.update.enabled": False,
    "app.normandy.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.region.network.url": "",
    "messaging-system.rsexperimentloader.enabled": False,
    "services.settings.server": "http://127.0.0.1:9/",
    "extensions.update.enabled": False,
}


def find_executable(env: str, candidates: tuple[str, ...]) -> str | None:
    given = os.environ.get(env)
    if given:
        return given if os.access(given, os.X_OK) else None
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def _wrap(expression: str) -> str:
    # Any expression, awaited, JSON-encoded in the page (so both drivers get plain values back).
    return f"(async () => JSON.stringify(await ({expression}) ?? null))()"


class DriverBase:
    name = "browser"

    def js(self, expression: str) -> Any:
        raise NotImplementedError

    def wait(self, predicate: str, timeout: float, what: str) -> Any:
        """Poll a JS expression until it is truthy; fail with what was expected and what the page says."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(predicate)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: timed out after {timeout:g} s waiting for {what}\n{self.page_messages()}"
                )
            time.sleep(0.1)

    def page_messages(self) -> str:
        """The studio's status lines (where it reports errors), for failure messages."""
        return self.js(
            "[...document.querySelectorAll('.msg, #stage-note, #banner')]"
            ".map(n => `${n.id}: ${n.textContent.trim()}`).filter(s => !s.endsWith(': ')).join('\\n')"
        )

    def text(self, selector: str) -> str:
        return self.js(f"document.querySelector({json.dumps(selector)}).textContent")

    def fill(self, selector: str, value: str) -> None:
        self.js(
            f"(n => {{ n.focus(); n.value = {json.dumps(value)}; n.dispatchEvent(new Event('input', {{bubbles: true}}));"
            f" n.dispatchEvent(new Event('change', {{bubbles: true}})); }})(document.querySelector({json.dumps(selector)}))"
        )


class PlaywrightDriver(DriverBase):
    name = "chromium"

    def __init__(self, executable: str, profile: Path) -> None:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        try:
            self.context = self._pw.chromium.launch_persistent_context(
                str(profile),
                executable_path=executable,
                headless=True,
                args=list(CHROMIUM_FLAGS),
                viewport={"width": 1400, "height": 1000},
                accept_downloads=True,
            )
        except Exception:
            self._pw.stop()
            raise
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def goto(self, url: str) -> None:
        self.page.goto(url)

    def reload(self) -> None:
        self.page.reload()

    def js(self, expression: str) -> Any:
        return json.loads(self.page.evaluate(_wrap(expression)))

    def click(self, selector: str) -> None:
        self.page.click(selector)

    def click_at(self, selector: str, x: float, y: float) -> None:
        self.page.click(selector, position={"x": x, "y": y})

    def press(self, key: str) -> None:
        self.page.keyboard.press(key)

    def fill(self, selector: str, value: str) -> None:
        if self.page.locator(selector).evaluate("n => n.tagName") == "SELECT":
            self.page.select_option(selector, value)
            return
        self.page.fill(selector, value)
        self.page.locator(selector).blur()  # as a user leaving the field: the browser fires `change`

    def set_file(self, selector: str, path: Path) -> None:
        self.page.set_input_files(selector, str(path))

    def screenshot(self, path: Path, selector: str | None = None) -> None:
        self.page.mouse.move(0, 0)  # no hover tooltip over the picture
        self.page.evaluate("scrollTo(0, 0)")  # the sticky header at the top of a full-page picture
        if selector:
            self.page.locator(selector).screenshot(path=str(path))
        else:
            self.page.screenshot(path=str(path), full_page=True)

    def download(self, selector: str, timeout: float = 30) -> tuple[str, bytes]:
        with self.page.expect_download(timeout=timeout * 1000) as info:
            self.page.click(selector)
        download = info.value
        return download.suggested_filename, Path(download.path()).read_bytes()

    def close(self) -> None:
        try:
            self.page.goto("about:blank")  # the page's own goodbye: it closes its stream on the server
            self.context.close()
        finally:
            self._pw.stop()


class BidiDriver(DriverBase):
    """Firefox over WebDriver BiDi (https://w3c.github.io/webdriver-bidi/), with just the commands needed."""

    name = "firefox"

    def __init__(self, executable: str, profile: Path) -> None:
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        prefs = "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in FIREFOX_PREFS.items())
        (profile / "user.js").write_text(prefs)
        env = {
            **os.environ,
            "MOZ_CRASHREPORTER_DISABLE": "1",
            "MOZ_HEADLESS_WIDTH": "1400",
            "MOZ_HEADLESS_HEIGHT": "1000",
        }
        self.proc = subprocess.Popen(
            [executable, "--headless", "--remote-debugging-port=0", "--no-remote", "--profile", str(profile)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        url = self._listening_url(timeout=60)
        self._exit = contextlib.ExitStack()
        self.ws = self._exit.enter_context(connect(f"{url}/session", max_size=None, open_timeout=20))
        self._ids = itertools.count(1)
        self.errors: list[str] = []
        self.command("session.new", {"capabilities": {"alwaysMatch": {"acceptInsecureCerts": False}}})
        self.command("session.subscribe", {"events": ["log.entryAdded"]})
        self.context = self.command("browsingContext.getTree", {})["contexts"][0]["context"]
        self.command(
            "browsingContext.setViewport",
            {"context": self.context, "viewport": {"width": 1400, "height": 1000}},
        )

    def _listening_url(self, timeout: float) -> str:
        found: list[str] = []

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                m = re.search(r"WebDriver BiDi listening on (ws://\S+)", line)
                if m and not found:
                    found.append(m.group(1))

        threading.Thread(target=read, daemon=True).start()  # keeps draining stderr afterwards
        deadline = time.monotonic() + timeout
        while not found:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"Firefox did not start its WebDriver BiDi server (exit {self.proc.poll()})"
                )
            time.sleep(0.05)
        return found[0]

    def command(self, method: str, params: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        my = next(self._ids)
        self.ws.send(json.dumps({"id": my, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("type") == "event":
                entry = msg.get("params", {})
                if msg.get("method") == "log.entryAdded" and entry.get("type") == "javascript":
                    self.errors.append(entry.get("text", ""))
                continue
            if msg.get("id") != my:
                continue
            if msg.get("type") == "error":
                raise RuntimeError(f"BiDi {method}: {msg.get('error')}: {msg.get('message')}")
            return msg["result"]

    def goto(self, url: str) -> None:
        self.command("browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"})

    def reload(self) -> None:
        self.command("browsingContext.reload", {"context": self.context, "wait": "complete"})

    def js(self, expression: str) -> Any:
        result = self.command(
            "script.evaluate",
            {"expression": _wrap(expression), "target": {"context": self.context}, "awaitPromise": True},
        )
        if result.get("type") == "exception":
            details = result.get("exceptionDetails", {})
            raise RuntimeError(f"page script failed: {details.get('text')}")
        return json.loads(result["result"]["value"])

    def click(self, selector: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).click()")

    def click_at(self, selector: str, x: float, y: float) -> None:
        self.js(
            f"(n => {{ const r = n.getBoundingClientRect(); n.dispatchEvent(new MouseEvent('click', "
            f"{{bubbles: true, clientX: r.left + {x}, clientY: r.top + {y}}})); }})(document.querySelector({json.dumps(selector)}))"
        )

    def press(self, key: str) -> None:
        self.js(
            f"document.activeElement.dispatchEvent(new KeyboardEvent('keydown', {{key: {json.dumps(key)}, bubbles: true}}))"
        )

    def set_file(self, selector: str, path: Path) -> None:
        data = base64.b64encode(path.read_bytes()).decode()
        kind = (
            "application/json"
            if path.suffix == ".json"
            else "video/webm"
            if path.suffix == ".webm"
            else "video/mp4"
        )
        self.js(
            f"(n => {{ const bytes = Uint8Array.from(atob({json.dumps(data)}), c => c.charCodeAt(0));"
            f" const dt = new DataTransfer(); dt.items.add(new File([bytes], {json.dumps(path.name)}, {{type: {json.dumps(kind)}}}));"
            f" n.files = dt.files; n.dispatchEvent(new Event('change', {{bubbles: true}})); }})(document.querySelector({json.dumps(selector)}))"
        )

    def screenshot(self, path: Path, selector: str | None = None) -> None:
        params: dict[str, Any] = {"context": self.context, "origin": "document"}
        if selector:
            box = self.js(
                f"(r => ({{x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}}))"
                f"(document.querySelector({json.dumps(selector)}).getBoundingClientRect())"
            )
            params["clip"] = {"type": "box", **box}
        path.write_bytes(base64.b64decode(self.command("browsingContext.captureScreenshot", params)["data"]))

    def download(self, selector: str, timeout: float = 30) -> tuple[str, bytes]:
        """Click `selector` and read what it downloads: a link's target, or the blob link the page clicks."""
        sel = json.dumps(selector)
        self.js(
            "(() => { window.__downloads = []; const click = HTMLAnchorElement.prototype.click;"
            " HTMLAnchorElement.prototype.click = function () { if (this.download) window.__downloads.push([this.download, this.href]);"
            " else click.call(this); }; })()"
        )
        self.js(
            f"(n => {{ if (n.tagName === 'A') window.__downloads.push([n.download, n.href]); else n.click(); }})(document.querySelector({sel}))"
        )
        name, href = self.wait("window.__downloads[0]", timeout, f"a download from {selector}")
        data = self.js(
            f"fetch({json.dumps(href)}).then(r => r.ok ? r.arrayBuffer() : Promise.reject(new Error(`HTTP ${{r.status}}`)))"
            ".then(b => { let s = ''; const u = new Uint8Array(b); for (let i = 0; i < u.length; i += 32768)"
            " s += String.fromCharCode.apply(null, u.subarray(i, i + 32768)); return btoa(s); })"
        )
        return name, base64.b64decode(data)

    def close(self) -> None:
        try:
            self.goto("about:blank")  # the page's own goodbye: it closes its stream on the server
            self.command("session.end", {}, timeout=10)
        except Exception:
            pass
        try:
            self._exit.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def fresh_profile(root: Path, name: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    return path


def remove_profile(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
