"""A real WebSocket peer (RFC 6455), stdlib only: the handshake, frames, an echo server.

Used two ways: `net.RecordingUpstream`'s `websocket_echo` handler answers an Upgrade with
a real 101 (Sec-WebSocket-Accept computed from the client's key) and then echoes frames;
and run as a script (`python ws_echo.py PORT`) it is an instance for the process backend:
`GET /` answers 200 (the health probe), a WebSocket upgrade is accepted and echoed.
Tests speak to both through the proxy with `client_frame` / `read_frame`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
import sys
from collections.abc import Awaitable, Callable

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B63"  # RFC 6455 1.3
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # the RFC's sample nonce; its accept is s3pPLMBiTxaQ9kYGzzhZRbK+xOo=


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())


def upgrade_request(path: str = "/ws", host: str = "example.com", key: bytes = KEY) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key.decode()}\r\n\r\n").encode()


def switching_protocols(key: bytes) -> bytes:
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n")


def frame(payload: bytes, opcode: int = OP_TEXT, mask: bool = False) -> bytes:
    """One final frame; clients must mask (RFC 6455 5.3), servers must not."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    return frame(payload, opcode, mask=True)


def parse_frame(take: Callable[[int], bytes]) -> tuple[int, bytes, bool]:
    """(opcode, payload, masked) of the next frame; `take(n)` returns exactly n bytes."""
    b0, b1 = take(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", take(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", take(8))[0]
    masked = bool(b1 & 0x80)
    key = take(4) if masked else b""
    payload = take(n)
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return b0 & 0x0F, payload, masked


async def read_frame(take: Callable[[int], Awaitable[bytes]]) -> tuple[int, bytes, bool]:
    """`parse_frame` over an async `take(n)` (an asyncio reader's `readexactly`)."""
    b0, b1 = await take(2)
    n = b1 & 0x7F
    ext = 2 if n == 126 else 8 if n == 127 else 0
    rest = await take(ext + (4 if b1 & 0x80 else 0))
    if ext:
        n = struct.unpack("!H" if ext == 2 else "!Q", rest[:ext])[0]
    data = bytes([b0, b1]) + rest + await take(n)
    pos = 0

    def take_sync(k: int) -> bytes:
        nonlocal pos
        pos += k
        return data[pos - k:pos]

    return parse_frame(take_sync)


async def echo_frames(take: Callable[[int], Awaitable[bytes]], writer: asyncio.StreamWriter) -> None:
    """Echo data frames (unmasked, as a server sends), answer pings, end on close.
    An unmasked frame from the client is a protocol error (RFC 6455 5.1): close 1002."""
    while True:
        try:
            opcode, payload, masked = await read_frame(take)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        if not masked:
            writer.write(frame(struct.pack("!H", 1002), OP_CLOSE))
            await writer.drain()
            return
        if opcode == OP_CLOSE:
            writer.write(frame(payload[:2], OP_CLOSE))
            await writer.drain()
            return
        writer.write(frame(payload, OP_PONG if opcode == OP_PING else opcode))
        await writer.drain()


# --- run as an instance (process backend) --------------------------------------------


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            key = headers.get("sec-websocket-key")
            if headers.get("upgrade", "").lower() == "websocket" and key:
                writer.write(switching_protocols(key.encode()))
                await writer.drain()
                await echo_frames(reader.readexactly, writer)
                return
            body = b"ws echo instance\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%b"
                         % (len(body), body))
            await writer.drain()
            if headers.get("connection", "").lower() == "close":
                return
    finally:
        writer.close()


async def _main(port: int) -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1])))
