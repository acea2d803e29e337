"""A small asyncio HTTP/1.1 server built on h11 (which mitmproxy already brings).

Why not ``http.server`` or an existing framework: the emulator needs things they hide or refuse.

* The request target is kept as the exact bytes received, because a SigV4 signature covers the
  path as the client encoded it.
* Header names are kept as received, in order (h11's ``raw_items``), for the same reason.
* Event-stream responses go out with chunked transfer encoding, one chunk per frame. asyncio hands
  a write to the socket at once when nothing is queued, so a client sees each frame as it is
  produced; ``drain`` after each write only adds back-pressure for slow readers.
* Faults are first-class: a handler can end the connection without answering, or in the middle of
  a streamed body (:meth:`ResponseChannel.abort`).

Keep-alive, ``Expect: 100-continue``, chunked and Content-Length request bodies are h11's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from typing import Awaitable, Callable

import h11

log = logging.getLogger(__name__)

READ_SIZE = 65536
MAX_HEADER_BYTES = 64 * 1024
# Bedrock accepts bodies up to 20 MB; anything much bigger is a client bug, not a test.
MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class HttpRequest:
    method: str
    target: bytes
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def path(self) -> bytes:
        return self.target.partition(b"?")[0]

    @property
    def query(self) -> bytes:
        return self.target.partition(b"?")[2]

    def header(self, name: str) -> str | None:
        """First value of a header, case-insensitively."""
        wanted = name.lower()
        for header_name, value in self.headers:
            if header_name.lower() == wanted:
                return value
        return None


class ResponseChannel:
    """How a handler answers one request: whole, streamed, or not at all."""

    def __init__(self, connection: h11.Connection, writer: asyncio.StreamWriter) -> None:
        self._connection = connection
        self._writer = writer
        self.started = False
        self.aborted = False

    async def _send(self, event: h11.Event) -> None:
        self.started = True
        data = self._connection.send(event)
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def respond(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        await self._send(h11.Response(status_code=status, headers=headers))
        if body:
            await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def start_stream(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Send the status line and headers; headers should ask for chunked encoding."""
        await self._send(h11.Response(status_code=status, headers=headers))

    async def send_chunk(self, data: bytes) -> None:
        await self._send(h11.Data(data=data))

    async def end_stream(self) -> None:
        await self._send(h11.EndOfMessage())

    async def send_partial(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """Promise a body (Content-Length) but deliver only ``body``: the caller then aborts."""
        await self._send(h11.Response(status_code=status, headers=headers))
        if body:
            await self._send(h11.Data(data=body))

    def abort(self) -> None:
        """End the connection without finishing the HTTP message.

        Bytes already written are still delivered, then the peer sees the end of the connection
        (a FIN, or a TLS close_notify) where it expected more of the message: the same thing a
        client sees when an upstream dies mid-answer.
        """
        self.aborted = True
        self._writer.close()


Handler = Callable[[HttpRequest, ResponseChannel], Awaitable[None]]


class HttpServer:
    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self._handler = handler
        self._ssl_context = ssl_context
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def listen(self, host: str, port: int) -> int:
        """Start listening; return the bound port (useful with port 0)."""
        server = await asyncio.start_server(
            # A deep listen queue: benchmarks open a thousand streams at once.
            self._serve_connection, host, port, ssl=self._ssl_context, reuse_address=True, backlog=4096
        )
        self._servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        self._writers.add(writer)
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            await self._serve_requests(connection, reader, writer)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except h11.RemoteProtocolError as exc:
            await self._reject_malformed(connection, writer, exc)
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _serve_requests(
        self, connection: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            request = await self._read_request(connection, reader, writer)
            if request is None:
                return
            channel = ResponseChannel(connection, writer)
            await self._handler(request, channel)
            if channel.aborted:
                return
            if connection.our_state is h11.DONE and connection.their_state is h11.DONE:
                connection.start_next_cycle()
            else:
                return

    async def _read_request(
        self, connection: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> HttpRequest | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                if connection.they_are_waiting_for_100_continue:
                    writer.write(connection.send(h11.InformationalResponse(status_code=100, headers=[])))
                connection.receive_data(await reader.read(READ_SIZE))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return HttpRequest(
                    method=head.method.decode("ascii"),
                    target=bytes(head.target),
                    headers=[
                        (name.decode("latin-1"), value.decode("latin-1"))
                        for name, value in head.headers.raw_items()
                    ],
                    body=bytes(body),
                )
            else:  # ConnectionClosed or PAUSED: nothing more to serve on this connection
                return None

    async def _reject_malformed(
        self, connection: h11.Connection, writer: asyncio.StreamWriter, exc: h11.RemoteProtocolError
    ) -> None:
        if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = str(exc).encode("utf-8", "replace")
        with contextlib.suppress(Exception):
            writer.write(
                connection.send(
                    h11.Response(
                        status_code=exc.error_status_hint,
                        headers=[("Content-Length", str(len(body))), ("Connection", "close")],
                    )
                )
            )
            writer.write(connection.send(h11.Data(data=body)))
            writer.write(connection.send(h11.EndOfMessage()))
            await writer.drain()
