"""/docs and /redoc of a running `bq-refresh serve`, rendered by headless Chromium (Debian's package, installed by
./dev) with every host but this machine unresolvable: Swagger UI draws the operations and the Authorize button and
ReDoc its reference, and Chromium's network log shows that the pages asked for nothing beyond localhost.
BQ_REFRESH_API_SCREENSHOT=docs/api-docs.png keeps the screenshot (the one in docs/ was made so)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bq_refresh.settings import Settings
from tests.test_api import TOKEN
from tests.test_api_serve import Serve

OFFLINE = "MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"


@pytest.fixture
def serve(env: Settings, tmp_path: Path) -> Iterator[Serve]:
    process = Serve({**os.environ, "REFRESH_API_TOKEN": TOKEN}, tmp_path / "serve.log")
    yield process
    process.stop()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, out: Path, *extra: str) -> list[str]:
    """Load ``url`` in headless Chromium, offline but for this machine; return the URLs the page asked for."""
    browser = chromium()
    assert browser is not None
    netlog = out.with_suffix(".netlog.json")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000", "--window-size=1400,1700",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             f"--host-resolver-rules={OFFLINE}", f"--log-net-log={netlog}", *extra, url]
    done = subprocess.run([browser, *flags], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    if "--dump-dom" in extra:
        out.write_bytes(done.stdout)
    return page_requests(netlog, origin=url.split("/", 3)[:3])


def page_requests(netlog: Path, origin: list[str]) -> list[str]:
    """The URLs a page loaded or asked for: the main frame and every request it initiated (Chromium's own
    background requests, which no page makes, are not counted)."""
    page = "/".join(origin)
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        if event["type"] == start and (params.get("request_type") == "main frame" or params.get("initiator") == page):
            urls.append(params["url"])
    return urls


@pytest.mark.once
@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (./dev installs Debian's package)")
def test_docs_and_redoc_render_offline_from_serve(serve: Serve, tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{serve.port}"
    local = (f"{base}/", "http://localhost:")

    asked = render(f"{base}/docs", tmp_path / "docs.html", "--dump-dom")
    dom = (tmp_path / "docs.html").read_text()
    assert '<h1 class="title">bq-refresh' in dom, dom[-3000:]
    assert "btn authorize" in dom  # the bearer scheme's Authorize button
    for path in ("/trigger", "/runs/{run_id}", "/status", "/metrics", "/healthz", "/api/refresh/trigger",
                 "/api/refresh/status"):
        assert f'data-path="{path}"' in dom, path
    assert f"{base}/static/swagger-ui-bundle.js" in asked and f"{base}/openapi.json" in asked
    assert [u for u in asked if not u.startswith(local)] == []

    asked = render(f"{base}/redoc", tmp_path / "redoc.html", "--dump-dom")
    dom = (tmp_path / "redoc.html").read_text()
    assert "Start a run" in dom and "Prometheus metrics" in dom and "earlier attempt's paths" in dom, dom[-3000:]
    assert f"{base}/static/redoc.standalone.js" in asked
    assert [u for u in asked if not u.startswith(local)] == []

    shot = tmp_path / "api-docs.png"
    render(f"{base}/docs", shot, f"--screenshot={shot}")
    assert shot.stat().st_size > 20_000
    if os.environ.get("BQ_REFRESH_API_SCREENSHOT"):
        shutil.copy(shot, os.environ["BQ_REFRESH_API_SCREENSHOT"])
