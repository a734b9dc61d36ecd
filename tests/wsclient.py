"""A minimal RFC 6455 websocket client, standard library only, shared by the test suites.

The integration suite listens to ComfyUI's ``/ws`` event stream with it (tests/integration/harness.py); the browser
test talks to Chromium's DevTools endpoint with it (tests/browser/cdp.py). Enough for a server on loopback: masked
frames out; text, binary, continuation, ping, pong and close frames in. No extensions, no subprotocols, no TLS.

Imported as ``from wsclient import WebSocket``: under pytest's default import mode tests/ is on ``sys.path``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import struct
import threading
import urllib.parse

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocketClosed(ConnectionError):
    """The server sent a close frame, or the connection ended."""


class WebSocket:
    """One client connection to ``ws://host:port/path``. ``recv_message`` is meant for one reader at a time; sending is
    safe from any thread (a reader answering pings beside a writer)."""

    def __init__(self, url: str, timeout: float = 30.0):
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port or 80
        path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        self._buf = bytearray()
        self._send_lock = threading.Lock()
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        while b"\r\n\r\n" not in self._buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise WebSocketClosed("websocket handshake: connection closed")
            self._buf += chunk
        end = self._buf.index(b"\r\n\r\n")
        head = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[:end + 4]
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:] if ":" in line)}
        accept = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
        if head[0].split()[1:2] != ["101"] or headers.get("sec-websocket-accept") != accept:
            raise WebSocketClosed(f"websocket handshake failed: {head!r}")

    def _recv_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise WebSocketClosed("websocket closed by the server")
            self._buf += chunk
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def send_frame(self, opcode: int, payload: bytes = b"") -> None:
        """One final frame, masked as a client must."""
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        with self._send_lock:
            self.sock.sendall(header + mask + _mask(payload, mask))

    def send(self, text: str) -> None:
        self.send_frame(TEXT, text.encode())

    def recv_message(self) -> tuple[int, bytes] | None:
        """The next whole message as (TEXT or BINARY, payload), its fragments joined; pings are answered on the way.
        None once the server sends a close frame (answered with one); WebSocketClosed if the connection just ends."""
        message, message_op = bytearray(), None
        while True:
            b1, b2 = self._recv_exact(2)
            fin, opcode, length = b1 & 0x80, b1 & 0x0F, b2 & 0x7F
            if length == 126:
                length = struct.unpack("!H", self._recv_exact(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self._recv_exact(8))[0]
            mask = self._recv_exact(4) if b2 & 0x80 else None
            payload = self._recv_exact(length)
            if mask:
                payload = _mask(payload, mask)
            if opcode == CLOSE:
                with contextlib.suppress(OSError):
                    self.send_frame(CLOSE, payload[:2])
                return None
            if opcode == PING:
                self.send_frame(PONG, payload)
                continue
            if opcode == PONG:
                continue
            if opcode in (TEXT, BINARY):
                message, message_op = bytearray(payload), opcode
            else:  # continuation
                message += payload
            if fin:
                return message_op, bytes(message)

    def recv(self) -> str:
        """The next message as text (a binary one is decoded as UTF-8 too); WebSocketClosed once the server closes."""
        message = self.recv_message()
        if message is None:
            raise WebSocketClosed("websocket closed by the server")
        return message[1].decode("utf-8")

    def close(self) -> None:
        """Send a normal close (code 1000) and shut the socket, which also ends a reader blocked in ``recv``."""
        with contextlib.suppress(OSError):
            self.send_frame(CLOSE, struct.pack("!H", 1000))
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _mask(payload: bytes, mask: bytes) -> bytes:
    """XOR with the 4-byte mask repeated (the same operation masks and unmasks), as one big-integer XOR."""
    n = len(payload)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")
