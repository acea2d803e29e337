"""The upstream client for whole answers: HTTP/1.1 over TLS connections pooled per target.

Why not aiohttp here. Most Bedrock requests (InvokeModel, Converse, CountTokens, the async-invoke
calls) are answered whole. For them aiohttp's client cost about 80 µs of CPU and 0.6 ms of latency a
request more than a plain asyncio protocol (``scripts/bench``), the largest single share of what the
proxy adds to a request. The exchange itself is simple: one request whose body is known, one answer
read to its end. httptools (llhttp, the parser of Node.js) parses the answer. Event streams still go
through aiohttp (:mod:`.relay`), whose streaming reads and flow control they need.

Connections are kept alive and shared by every client of the proxy, so that a client that opens a
connection per request does not pay a TLS handshake with a distant region each time.

No mitmproxy import.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

# An idle connection older than this is closed rather than reused: servers close idle connections after
# a while (load balancers in front of AWS services after about 60 s), and a request written just as the
# server closes the connection would fail and count against the target.
KEEPALIVE_S = 30.0


class UpstreamError(Exception):
    """No complete answer: the connection broke, or the answer was not HTTP."""


class UpstreamConnectError(UpstreamError):
    """The connection (TCP or TLS) to the target could not be made."""


@dataclass(slots=True)
class WholeAnswer:
    """An upstream answer read to its end (shaped like the part of aiohttp's ClientResponse the relay uses)."""

    status: int
    headers: CIMultiDictProxy
    body: bytes

    async def read(self) -> bytes:
        return self.body

    def release(self) -> None:
        """Nothing to release: the connection went back to the pool when the answer was complete."""


class UpstreamPool:
    def __init__(self, ssl_context: ssl.SSLContext, connect_timeout_s: float, read_timeout_s: float):
        self.ssl_context = ssl_context
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}

    async def request(
        self, scheme: str, host: str, port: int, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> WholeAnswer:
        """Send one request (``headers`` include Host; Content-Length is added) and read its whole answer."""
        message = _serialize(method, target, headers, body)
        key = (scheme, host, port)
        connection = self._idle_connection(key) or await self._connect(scheme, host, port)
        answer, reusable = await connection.exchange(message, self.read_timeout_s)
        if reusable and not connection.closed:
            connection.idle_since = time.monotonic()
            self._idle.setdefault(key, []).append(connection)
        else:
            connection.close()
        return answer

    def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    def _idle_connection(self, key: tuple[str, str, int]) -> _Connection | None:
        connections = self._idle.get(key)
        now = time.monotonic()
        while connections:
            connection = connections.pop()  # the most recently used: the likeliest to be still open
            if not connection.closed and now - connection.idle_since < KEEPALIVE_S:
                return connection
            connection.close()
        return None

    async def _connect(self, scheme: str, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self.ssl_context if scheme == "https" else None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, connection = await loop.create_connection(
                    _Connection, host, port, ssl=tls, server_hostname=host if tls else None
                )
        except (OSError, ssl.SSLError) as e:
            raise UpstreamConnectError(f"cannot connect to {host}:{port}: {e.strerror or e}") from None
        return connection


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one exchange at a time; the httptools parser calls the ``on_*`` methods."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._headers_complete = False
        self._message_begun = False

    async def exchange(self, message: bytes, read_timeout_s: float) -> tuple[WholeAnswer, bool]:
        """The answer to ``message``, and whether the connection may carry another exchange."""
        if self.closed:
            raise UpstreamError("the connection closed before the request was sent")
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._last_read = loop.time()
        self._timer = loop.call_at(self._last_read + read_timeout_s, self._check_read_timeout, read_timeout_s)
        self.transport.write(message)
        try:
            return await self._waiter
        except BaseException:
            self.close()  # cancelled, timed out or broken: the connection is in an unknown state
            raise
        finally:
            self._timer.cancel()
            self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _check_read_timeout(self, read_timeout_s: float) -> None:
        """Fail the exchange if nothing has arrived for ``read_timeout_s`` (a timer per exchange, not per read)."""
        loop = asyncio.get_running_loop()
        due = self._last_read + read_timeout_s
        if loop.time() < due:
            self._timer = loop.call_at(due, self._check_read_timeout, read_timeout_s)
        else:
            self._fail(TimeoutError(f"no answer for {read_timeout_s:g} s"))

    def _fail(self, error: BaseException) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():  # bytes nobody asked for: not to be trusted
            self.close()
            return
        self._last_read = asyncio.get_running_loop().time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamError(f"the answer is not valid HTTP/1.1: {e}"))
            self.close()
            return
        if self._waiter.done() and self._message_begun:
            self.close()  # more after the end of the answer: this connection cannot carry another exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is None or self._waiter.done():
            return
        if self._headers_complete and not any(name.lower() in ("content-length", "transfer-encoding") for name, _ in self._headers):
            self.on_message_complete(reusable=False)  # an answer delimited by the end of the connection
        else:
            self._fail(UpstreamError("the connection closed before the answer was complete"))

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._message_begun = True

    def on_header(self, name: bytes, value: bytes) -> None:
        # Decoded as mitmproxy and aiohttp decode headers, so that every byte goes back out as it came.
        self._headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        self._headers_complete = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self, reusable: bool = True) -> None:
        answer = WholeAnswer(self._parser.get_status_code(), CIMultiDictProxy(CIMultiDict(self._headers)), b"".join(self._body))
        reusable = reusable and self._parser.should_keep_alive()
        self._headers, self._body, self._headers_complete, self._message_begun = [], [], False, False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result((answer, reusable))


def _serialize(method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in headers:
        # The client's header values were checked for control characters and ours have none: a line break
        # here would smuggle a header or a second request, so it is a bug, and refused as one.
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} contains a line break")
        lines.append(f"{name}: {value}")
    lines.append(f"content-length: {len(body)}\r\n\r\n")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape") + body
