"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`): open a local page from
file://, time its load, evaluate a check in it, take a screenshot. Used by tests/test_gallery.py and
benchmarks/bench_gallery.py; needs only the `chromium` binary (Debian's package), no Python package and no network.

The checks run in the page from the outside (Runtime.evaluate), so the pages themselves carry no script.
"""
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
import urllib.parse

BINARIES = ("chromium", "chromium-browser", "google-chrome")

# Every image on the page is asked to load now (lazy ones too), then each one's outcome is reported.
LOAD_ALL_IMAGES = """(async () => {
  const imgs = [...document.images];
  imgs.forEach(i => { i.loading = 'eager'; });
  const settle = i => i.complete ? null
    : new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); });
  await Promise.race([Promise.all(imgs.map(settle)), new Promise(r => setTimeout(r, 20000))]);
  return {images: imgs.map(i => ({src: i.getAttribute('src'), loaded: i.complete && i.naturalWidth > 0})),
          videos: [...document.querySelectorAll('video')].map(v => ({src: v.currentSrc, error: v.error !== null})),
          text: document.body.innerText, title: document.title, scripts: document.scripts.length,
          links: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'))};
})()"""


def _high(*fds):
    """The pipe ends moved to numbers above 9, so wiring them to the child's fds 3 and 4 cannot clobber one."""
    moved = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds)
    for fd in fds:
        os.close(fd)
    return moved


def find_chromium():
    """The path of a Chromium binary on PATH, or None."""
    return next((p for p in map(shutil.which, BINARIES) if p), None)


class Browser:
    """One headless Chromium process and one tab. Use as a context manager."""

    def __init__(self, binary=None, width=1280, height=900, timeout=60):
        self.binary, self.width, self.height, self.timeout = binary or find_chromium(), width, height, timeout
        if self.binary is None:
            raise RuntimeError(f"no Chromium binary on PATH (looked for {', '.join(BINARIES)}); "
                               f"on Debian: apt-get install -y chromium")
        self.next_id, self.events, self.buffer = 0, [], b""

    def __enter__(self):
        self.profile = tempfile.mkdtemp(prefix="larp_chromium_")
        to_child, self.to_browser = _high(*os.pipe())
        self.from_browser, from_child = _high(*os.pipe())

        def wire():  # the protocol pipe is the child's fds 3 (commands in) and 4 (answers out)
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)
        self.proc = subprocess.Popen(
            [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
             "--hide-scrollbars", f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=wire,
            pass_fds=(3, 4))
        os.close(to_child)
        os.close(from_child)
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Page.enable", session=True)
            self.call("Emulation.setDeviceMetricsOverride", session=True, width=self.width, height=self.height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self.to_browser)
            os.close(self.from_browser)
            shutil.rmtree(self.profile, ignore_errors=True)

    def send(self, method, session=False, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self.to_browser, json.dumps(msg).encode() + b"\0")
        return self.next_id

    def _read(self, deadline):
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_browser], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self.proc.poll()})")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method, session=False, **params):
        """Send a command and wait for its answer; protocol events met meanwhile are kept in self.events."""
        wanted, deadline = self.send(method, session, **params), time.monotonic() + self.timeout
        while True:
            msg = self._read(deadline)
            if msg.get("id") == wanted:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def wait_event(self, method):
        deadline = time.monotonic() + self.timeout
        while True:
            for i, msg in enumerate(self.events):
                if msg.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read(deadline))

    def open(self, path):
        """Load a local file and wait for its load event. Returns the seconds from navigation to the load event."""
        self.events.clear()
        url = "file://" + urllib.parse.quote(os.path.abspath(path))
        t0 = time.perf_counter()
        result = self.call("Page.navigate", session=True, url=url)
        if result.get("errorText"):
            raise RuntimeError(f"cannot open {path}: {result['errorText']}")
        self.wait_event("Page.loadEventFired")
        return time.perf_counter() - t0

    def evaluate(self, expression):
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        result = self.call("Runtime.evaluate", session=True, expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"evaluate: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path, full_page=True):
        """Save a PNG of the page (the whole page with full_page, else the viewport)."""
        params = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics", session=True)["cssContentSize"]
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": self.width, "scale": 1,
                                                           "height": min(int(size["height"]), 8000)})
        data = self.call("Page.captureScreenshot", session=True, **params)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path
