"""A real HTTP proxy in front of the emulator's REST API that injects faults on demand.

The official BigQuery client talks to it exactly as to BigQuery; the proxy forwards every request to
the emulator, unless told to answer an error (500, 503, 401, 403 for paths naming a table), to answer
late, or to refuse connections altogether (``close``).
"""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import struct
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


class TcpFaultProxy:
    """A real TCP proxy in front of a gRPC endpoint (the Storage Read API, ``host:port``) that cuts or refuses
    connections on demand; gRPC's HTTP/2 frames pass through untouched.

    ``cut_after_bytes``: a connection is reset (RST) once it has forwarded that many bytes server -> client,
    ``cuts`` times (-1: every connection that gets that far; a short connection, e.g. the one that opens the
    read session, is not cut and does not count); ``refuse``: every new connection is reset at once.
    ``heal()`` forwards everything again.
    """

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.cut_after_bytes: int | None = None
        self.cuts = 0
        self.refuse = False
        self.connections = 0
        self.cut_connections = 0  # connections cut so far
        self.refused = 0
        self.bytes_to_client: list[int] = []  # per connection, in the order they were accepted
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def heal(self) -> None:
        self.cut_after_bytes, self.cuts, self.refuse = None, 0, False

    def close(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for sock in list(self._sockets):
                _reset(sock)
            self._sockets.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                self.connections += 1
                if self.refuse:
                    self.refused += 1
                    _reset(client)
                    continue
                budget = self.cut_after_bytes if self.cuts != 0 else None
                index = len(self.bytes_to_client)
                self.bytes_to_client.append(0)
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                _reset(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, None, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, index, budget), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, index: int | None, budget: int | None) -> None:
        """Copy src -> dst; with a budget (server -> client), reset both once ``budget`` bytes are forwarded."""
        try:
            while data := src.recv(65536):
                if budget is not None and len(data) >= budget and self._take_cut():
                    dst.sendall(data[:budget])
                    self._count(index, budget)
                    _reset(dst)
                    _reset(src)
                    return
                dst.sendall(data)
                self._count(index, len(data))
                if budget is not None:
                    budget -= len(data)
        except OSError:
            pass
        for sock in (src, dst):  # one side ended: end the other so the peer sees it
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
            with self._lock:
                self._sockets.discard(sock)

    def _take_cut(self) -> bool:
        with self._lock:
            if self.cuts == 0 or self.cut_after_bytes is None:
                return False  # healed meanwhile, or the cuts were used up by other connections
            self.cuts -= 1 if self.cuts > 0 else 0
            self.cut_connections += 1
            return True

    def _count(self, index: int | None, n: int) -> None:
        if index is not None:
            with self._lock:
                self.bytes_to_client[index] += n


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees 'connection reset', not an orderly end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)  # wakes a thread blocked reading it (sends nothing)
    except OSError:
        pass
    sock.close()
