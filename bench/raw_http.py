"""A plain HTTP/1.1 client connection for load generators, far cheaper in CPU than httpx: a flooding process on
the server's machine takes little of its CPU. The hostile clients of bench/serve_load.py used 16.2 s of CPU in
one 21-s phase with httpx, and 6.3 s in a whole run (start-up included) with this."""

from __future__ import annotations

import asyncio


class RawConnection:
    """One kept-alive HTTP/1.1 connection that POSTs and reads answers with a Content-Length."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {content_type}\r\n"
        writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        length = next(
            int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
        )
        return int(lines[0].split()[1]), await reader.readexactly(length)

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None
