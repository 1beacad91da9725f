"""A real HTTP proxy in front of the emulator's REST API that records what the official client sends (method,
path, query parameters, JSON body) and can change BigQuery's figures in its answers: the emulator ignores a
job's location and estimates every query at 0 bytes, so tests of locations and budgets assert on the requests
and give the answers the figures BigQuery would."""

from __future__ import annotations

import http.client
import http.server
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Recorded:
    method: str
    path: str
    params: dict[str, str]
    body: dict[str, Any] | None

    @property
    def job_insert(self) -> bool:
        return self.method == "POST" and self.path.endswith("/jobs")

    @property
    def dry_run(self) -> bool:
        return bool((self.body or {}).get("configuration", {}).get("dryRun"))

    @property
    def query(self) -> str:
        return str((self.body or {}).get("configuration", {}).get("query", {}).get("query", ""))


class RecordingProxy:
    """Forward to ``upstream``, recording each request.

    ``answer``: a function of the request returning (status, JSON) to answer instead of forwarding, or None;
    ``rewrite``: a function changing a forwarded JSON answer in place (request, answer); ``delay``: path
    substring -> seconds to wait before forwarding.
    """

    def __init__(self, upstream: str) -> None:
        up = urlsplit(upstream)
        self.host, self.port = up.hostname or "127.0.0.1", up.port or 80
        self.requests: list[Recorded] = []
        self.answer: Callable[[Recorded], tuple[int, dict[str, Any]] | None] | None = None
        self.rewrite: Callable[[Recorded, dict[str, Any]], None] | None = None
        self.delay: dict[str, float] = {}
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                split = urlsplit(self.path)
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                seen = Recorded(self.command, split.path, {k: v[-1] for k, v in parse_qs(split.query).items()}, body)
                proxy.requests.append(seen)
                for part, seconds in proxy.delay.items():
                    if part in split.path:
                        time.sleep(seconds)
                canned = proxy.answer(seen) if proxy.answer else None
                if canned is not None:
                    self._reply(canned[0], json.dumps(canned[1]).encode(), {"Content-Type": "application/json"})
                    return
                conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host", "connection"}}
                conn.request(self.command, self.path, body=raw or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                keep = {k: v for k, v in resp.getheaders()
                        if k.lower() not in {"transfer-encoding", "connection", "content-length"}}
                conn.close()
                if proxy.rewrite and data and "json" in resp.getheader("Content-Type", ""):
                    answer = json.loads(data)
                    proxy.rewrite(seen, answer)
                    data = json.dumps(answer).encode()
                self._reply(resp.status, data, keep)

            def _reply(self, status: int, data: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle  # noqa: N815 - http.server's naming

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def jobs(self) -> list[Recorded]:
        """The job insertions (queries, dry runs included) seen so far."""
        return [r for r in self.requests if r.job_insert]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def set_bytes(processed: int, billed: int | None = None) -> Callable[[Recorded, dict[str, Any]], None]:
    """A ``rewrite`` giving every job answer BigQuery's byte figures (the emulator reports 0)."""

    def rewrite(_: Recorded, answer: dict[str, Any]) -> None:
        stats = answer.get("statistics")
        if isinstance(stats, dict):
            stats["totalBytesProcessed"] = str(processed)
            if isinstance(stats.get("query"), dict):
                stats["query"]["totalBytesProcessed"] = str(processed)
                if billed is not None:
                    stats["query"]["totalBytesBilled"] = str(billed)
        if "totalBytesProcessed" in answer:
            answer["totalBytesProcessed"] = str(processed)

    return rewrite
