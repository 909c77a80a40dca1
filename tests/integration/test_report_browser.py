"""report.html in a real browser: Debian's Chromium, headless, driven over the DevTools protocol, shows the
iteration table with the run's numbers and decodes and paints every embedded plot.

Chromium is started with `--remote-debugging-port=0` (it picks a free port and writes it to
DevToolsActivePort in its profile directory) on 127.0.0.1, killed with its whole process group at the end.
Skipped when Chromium is absent (`make chromium` installs it), failed instead under RLOOP_REQUIRE_CHROMIUM=1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rloop.report import FIGURES, collect, iteration_rows, write_report
from tests.report_fixtures import finished_run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

START_TIMEOUT_S = 30  # a cold Chromium start on 2 busy cores is a few seconds
PAGE_TIMEOUT_S = 30
HOSTILE_DIR = "<b>bold?</b> & 'q'"  # the store path is shown on the page: as text, never as markup

# Runs in the page once it has loaded: what it shows, as plain data.
PAGE_STATE_JS = """
(async () => {
  const images = [...document.images];
  await Promise.all(images.map((img) => img.decode().catch(() => null)));
  const cells = (row) => [...row.cells].map((c) => c.innerText.trim());
  const firstNumber = document.querySelector("td.num");
  return {
    title: document.title,
    tables: [...document.querySelectorAll("table")].map((t) => ({
      header: cells(t.tHead.rows[0]),
      rows: [...t.tBodies[0].rows].map(cells),
    })),
    images: images.map((img) => {
      const r = img.getBoundingClientRect();
      return {alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth,
              naturalHeight: img.naturalHeight, x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height};
    }),
    numberAlign: firstNumber ? getComputedStyle(firstNumber).textAlign : null,
    bodyText: document.body.innerText,
    boldElements: document.querySelectorAll("b").length,
  };
})()
"""


def chromium_binary() -> str:
    found = os.environ.get("RLOOP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if Path(found).is_file():
        return found
    reason = f"Chromium not found ({found}): run `make chromium` (Debian package chromium)"
    if os.environ.get("RLOOP_REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"{reason}; RLOOP_REQUIRE_CHROMIUM=1 requires it")
    pytest.skip(reason)


class DevTools:
    """The DevTools protocol over one websocket: a call waits for its own reply, events are skipped."""

    def __init__(self, ws):
        self.ws = ws
        self.last_id = 0

    async def call(self, method: str, session: str | None = None, **params) -> dict:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await self.ws.send_json(message)
        while True:
            reply = json.loads((await self.ws.receive()).data)
            if reply.get("id") == self.last_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    async def evaluate(self, session: str, expression: str):
        res = await self.call("Runtime.evaluate", session, expression=expression, awaitPromise=True,
                              returnByValue=True)
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res["result"].get("value")


async def open_page(port: int, browser_path: str, url: str) -> dict:
    """Load `url` in a new tab, wait (polling) until it has loaded, return PAGE_STATE_JS's answer plus a
    screenshot of each image as the page paints it."""
    import aiohttp

    async with aiohttp.ClientSession() as http, http.ws_connect(f"ws://127.0.0.1:{port}{browser_path}",
                                                                max_msg_size=0) as ws:
        dt = DevTools(ws)
        target = await dt.call("Target.createTarget", url=url)
        session = (await dt.call("Target.attachToTarget", targetId=target["targetId"], flatten=True))["sessionId"]
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        loaded = "location.protocol === 'file:' && document.readyState === 'complete'"  # not the about:blank before
        while not await dt.evaluate(session, loaded):
            assert time.monotonic() < deadline, f"{url} did not load within {PAGE_TIMEOUT_S}s"
            await asyncio.sleep(0.05)
        state = await dt.evaluate(session, PAGE_STATE_JS)
        state["shots"] = []
        for img in state["images"]:
            if not (img["width"] and img["height"]):  # not laid out: nothing painted (the test says so)
                state["shots"].append(None)
                continue
            clip = {k: img[k] for k in ("x", "y", "width", "height")} | {"scale": 1}
            shot = await dt.call("Page.captureScreenshot", session, format="png", clip=clip, captureBeyondViewport=True)
            state["shots"].append(base64.b64decode(shot["data"]))
        return state


def wait_for_devtools_port(profile: Path, proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    """Chromium writes DevToolsActivePort (port, then the browser's websocket path) once it listens."""
    active = profile / "DevToolsActivePort"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        lines = active.read_text().split() if active.exists() else []
        if len(lines) == 2:
            return int(lines[0]), lines[1]
        assert proc.poll() is None, f"chromium exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    pytest.fail(f"chromium did not open its DevTools port within {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


def show_in_chromium(binary: str, html_path: Path, work: Path) -> dict:
    profile, log = work / "chromium-profile", work / "chromium.log"
    args = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--window-size=1280,900",
            "about:blank"]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port, browser_path = wait_for_devtools_port(profile, proc, log)
        return asyncio.run(asyncio.wait_for(open_page(port, browser_path, html_path.as_uri()), PAGE_TIMEOUT_S * 2))
    finally:
        stop_browser(proc)


def stop_browser(proc: subprocess.Popen) -> None:
    """SIGTERM lets Chromium close its renderer and zygote children; SIGKILL to its own process group then
    ends whatever is left (a hung browser included)."""
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def shown(tmp_path_factory) -> dict:
    binary = chromium_binary()
    work = tmp_path_factory.mktemp("browser")
    root = work / HOSTILE_DIR
    store = finished_run(root, "tiny")
    vanilla = finished_run(root, "tiny-rl", mode="rl")
    write_report([store])
    header, rows = iteration_rows(collect(store), collect(vanilla))
    return {"page": show_in_chromium(binary, Path(store.base) / "report" / "report.html", work), "header": header,
            "rows": rows, "store": store}


def test_page_shows_the_iteration_table(shown):
    page = shown["page"]
    assert page["title"] == "RLoop report: tiny"
    assert len(page["tables"]) == 1
    table = page["tables"][0]
    assert table["header"] == shown["header"]
    assert table["rows"] == [[c.strip() for c in row] for row in shown["rows"]]
    assert [r[0] for r in table["rows"]] == ["P_0 (base)", "iter 0", "iter 1", "vanilla RL (tiny-rl), end"]
    assert table["rows"][2][:5] == ["iter 1", "12", "0.500", "10", "1.250→0.750"]
    assert table["rows"][3][5] == "0.510"  # the vanilla run's last held-out avg@16
    assert page["numberAlign"] == "right"


def test_every_image_is_decoded_and_painted(shown):
    from PIL import Image

    page = shown["page"]
    assert [img["alt"] for img in page["images"]] == [f.caption for f in FIGURES]
    for img, shot in zip(page["images"], page["shots"], strict=True):
        assert img["complete"] and img["naturalWidth"] > 100 and img["naturalHeight"] > 100, img
        assert img["width"] > 100 and img["height"] > 100, img  # laid out at a visible size
        pixels = Image.open(io.BytesIO(shot)).convert("RGB")
        colors = pixels.getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 16, f"{img['alt']}: the painted area is blank ({colors})"
        assert img["alt"] in page["bodyText"]  # its caption


def test_user_text_is_shown_as_text(shown):
    page = shown["page"]
    assert f"Store: {shown['store'].uri}" in page["bodyText"] and HOSTILE_DIR in page["bodyText"]
    assert page["boldElements"] == 0  # the <b> in the store path did not become markup
