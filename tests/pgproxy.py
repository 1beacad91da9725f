"""A TCP proxy in front of PostgreSQL that can lose the answer to a COMMIT: it forwards the COMMIT of a
transaction that ran a given statement, lets the server commit, then drops the client's connection before
the reply reaches it. The client cannot tell whether its transaction landed ("commit outcome unknown")."""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SSL_REQUEST, GSS_REQUEST = 80877103, 80877104


class CommitCutter:
    """Listen on a free local port; forward to ``target_uri``'s host and port."""

    def __init__(self, target_uri: str, marker: bytes) -> None:
        parts = urlsplit(target_uri)
        query = dict(parse_qsl(parts.query))
        socket_dir = query.pop("host", None) if str(query.get("host", "")).startswith("/") else None
        # a Unix-socket server (the embedded one) is reached on its socket file; anything else over TCP
        self.upstream: Any = (f"{socket_dir}/.s.PGSQL.{query.pop('port', parts.port or 5432)}" if socket_dir
                              else (parts.hostname or "127.0.0.1", parts.port or 5432))
        # The proxy reads the protocol's messages, so its client speaks plain text to it; it forwards bytes as
        # they are (a TLS server behind it must accept plain clients, as the Supabase-like pooler does).
        query.pop("sslrootcert", None)
        query["sslmode"] = "disable"
        self.marker = marker
        self.armed = False
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        port = self.listener.getsockname()[1]
        netloc = parts.netloc.rsplit("@", 1)
        self.uri = urlunsplit(parts._replace(netloc=(netloc[0] + "@" if len(netloc) == 2 else "") + f"127.0.0.1:{port}",
                                             query=urlencode(query)))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if isinstance(self.upstream, str):
                server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                server.connect(self.upstream)
            else:
                server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()
            threading.Thread(target=self._client_to_server, args=(client, server), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    @staticmethod
    def _read(sock: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise OSError("closed")
            out += chunk
        return out

    def _client_to_server(self, client: socket.socket, server: socket.socket) -> None:
        """Parse the client's messages: untyped start-up messages first, then (type, length, body)."""
        seen_marker = False
        try:
            while True:  # SSLRequest / GSSENCRequest are answered with one byte; then the start-up message
                head = self._read(client, 8)
                length, code = struct.unpack("!ii", head)
                body = self._read(client, length - 8)
                server.sendall(head + body)
                if code not in (SSL_REQUEST, GSS_REQUEST):
                    break
            while True:
                head = self._read(client, 5)
                kind, length = head[:1], struct.unpack("!i", head[1:])[0]
                body = self._read(client, length - 4)
                if kind in (b"Q", b"P") and self.marker in body:
                    seen_marker = True
                is_commit = kind in (b"Q", b"P") and body.lstrip().upper().startswith(b"COMMIT")
                server.sendall(head + body)
                if is_commit and seen_marker and self.armed:
                    self.armed = False
                    self.cuts += 1
                    time.sleep(1.0)  # the server commits; its answer never reaches the client
                    client.shutdown(socket.SHUT_RDWR)
                    client.close()
                    server.close()
                    return
                if is_commit:
                    seen_marker = False
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
