"""A real HTTP proxy in front of the emulator's REST API that injects faults on demand.

The official BigQuery client talks to it exactly as to BigQuery; the proxy forwards every request to
the emulator, unless told to answer an error (500, 503, 401, 403 for paths naming a table), to answer
late, or to refuse connections altogether (``close``).
"""

from __future__ import annotations

import http.client
import http.server
import json
import threading
import time
from typing import Any
from urllib.parse import urlsplit

_STATUS = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 500: "INTERNAL", 503: "UNAVAILABLE"}


class FaultProxy:
    """Forward to ``upstream``; ``fail_status``/``fail_next``/``delay_s``/``deny`` choose the fault."""

    def __init__(self, upstream: str) -> None:
        up = urlsplit(upstream)
        self.upstream_host, self.upstream_port = up.hostname or "127.0.0.1", up.port or 80
        self.fail_status: int | None = None  # every request answers this status
        self.fail_next = 0  # only the next N requests answer fail_status
        self.delay_s = 0.0
        self.deny: dict[str, int] = {}  # substring of the path -> status (401/403)
        self.requests: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                proxy.requests.append(f"{self.command} {self.path}")
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                status = None
                for part, code in proxy.deny.items():
                    if part in self.path:
                        status = code
                if status is None and proxy.fail_status and (proxy.fail_next > 0 or proxy.fail_next == -1):
                    status = proxy.fail_status
                    if proxy.fail_next > 0:
                        proxy.fail_next -= 1
                if status is not None:
                    payload = json.dumps({"error": {"code": status, "status": _STATUS.get(status, "UNKNOWN"),
                                                    "message": f"injected fault {status}",
                                                    "errors": [{"reason": "injected", "message": f"injected {status}"}]}})
                    self._reply(status, payload.encode(), {"Content-Type": "application/json"})
                    return
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host", "connection"}}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                keep = {k: v for k, v in resp.getheaders()
                        if k.lower() not in {"transfer-encoding", "connection", "content-length"}}
                conn.close()
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
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def heal(self) -> None:
        self.fail_status, self.fail_next, self.delay_s, self.deny = None, 0, 0.0, {}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
