"""The pooled HTTP/1.1 client for whole answers (upstream.py), against small real servers on loopback.

The end-to-end tests run it against the emulator over TLS (every non-streaming request goes through
it); these cover what the emulator never does: answers delimited by the end of the connection,
chunked answers, servers that hang, break off, or close idle connections.
"""

from __future__ import annotations

import asyncio
import functools
import ssl

import pytest

from bedrock_balancer.upstream import UpstreamConnectError, UpstreamError, UpstreamPool

HEADERS = [("host", "example.test"), ("content-type", "application/json")]


def run_async(test):
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(asyncio.wait_for(test(), 20))

    return run


class Server:
    """A loopback server that answers each request with the next of ``answers`` (bytes, or None: hang up)."""

    def __init__(self, answers: list[bytes | None], close_after_answer: bool = False):
        self.answers = list(answers)
        self.close_after_answer = close_after_answer
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if self.close_after_answer:
                    break
            else:
                await reader.read()  # no more answers: keep the connection open until the client leaves
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def pool(read_timeout_s: float = 5.0) -> UpstreamPool:
    return UpstreamPool(ssl.create_default_context(), connect_timeout_s=2.0, read_timeout_s=read_timeout_s)


async def send(client: UpstreamPool, port: int, body: bytes = b"{}"):
    return await client.request("http", "127.0.0.1", port, "POST", "/model/m/converse?x=1", HEADERS, body)


async def bodies_and_connections(answers: list[bytes], requests: int) -> tuple[list[bytes], int]:
    """Send ``requests`` requests one after another through one pool: the bodies, and the connections it took."""
    client = pool()
    async with Server(answers) as server:
        bodies = [(await send(client, server.port)).body for _ in range(requests)]
    client.close()
    return bodies, server.connections


@run_async
async def test_requests_share_one_kept_alive_connection():
    client = pool()
    async with Server([ok(b"1"), ok(b"2"), ok(b"3")]) as server:
        bodies = [(await send(client, server.port)).body for _ in range(3)]
    client.close()
    assert bodies == [b"1", b"2", b"3"]
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /model/m/converse?x=1 HTTP/1.1\r\nhost: example.test\r\n")
    assert b"content-length: 2\r\n\r\n{}" in first


@run_async
async def test_status_headers_and_body_come_back_as_sent():
    client = pool()
    answer_bytes = b"HTTP/1.1 429 Too Many Requests\r\nx-amzn-ErrorType: ThrottlingException:http://x/\r\ncontent-length: 13\r\n\r\n{\"message\":1}"
    async with Server([answer_bytes]) as server:
        answer = await send(client, server.port)
    client.close()
    assert answer.status == 429
    assert answer.headers.get("X-Amzn-ErrorType") == "ThrottlingException:http://x/"
    assert await answer.read() == b'{"message":1}'


@run_async
async def test_a_chunked_answer_is_assembled():
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    assert await bodies_and_connections([chunked, ok(b"next")], 2) == ([b"hello world", b"next"], 1)


@run_async
async def test_an_answer_delimited_by_the_end_of_the_connection_is_complete():
    client = pool()
    async with Server([b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\n\r\n<html>bad gateway</html>"], close_after_answer=True) as server:
        answer = await send(client, server.port)
    client.close()
    assert (answer.status, answer.body) == (502, b"<html>bad gateway</html>")


@run_async
async def test_an_answer_cut_short_is_an_error_not_a_shorter_answer():
    client = pool()
    async with Server([b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part"], close_after_answer=True) as server:
        with pytest.raises(UpstreamError, match="closed before the answer was complete"):
            await send(client, server.port)
    client.close()


@run_async
async def test_a_server_that_hangs_up_without_answering_is_an_error():
    client = pool()
    async with Server([None]) as server:
        with pytest.raises(UpstreamError):
            await send(client, server.port)
    client.close()


@run_async
async def test_a_server_that_never_answers_times_out():
    client = pool(read_timeout_s=0.2)
    async with Server([]) as server:  # reads the request, never answers
        with pytest.raises(TimeoutError):
            await send(client, server.port)
    client.close()


@run_async
async def test_a_connection_the_server_closed_while_idle_is_not_reused():
    client = pool()
    async with Server([ok(b"1"), ok(b"2")], close_after_answer=True) as server:
        first = await send(client, server.port)
        # The server closes its end after each answer without saying so; once the close has arrived, the
        # pool must open a new connection rather than fail the next request on the dead one.
        (idle,) = client._idle[("http", "127.0.0.1", server.port)]
        while not idle.closed:  # the close arriving, not a guess at how long it takes
            await asyncio.sleep(0.001)
        second = await send(client, server.port)
    client.close()
    assert (first.body, second.body) == (b"1", b"2")
    assert server.connections == 2


@run_async
async def test_connection_close_in_the_answer_is_honoured():
    assert await bodies_and_connections([ok(b"1", extra=b"connection: close\r\n"), ok(b"2")], 2) == ([b"1", b"2"], 2)


@run_async
async def test_bytes_after_the_end_of_an_answer_retire_the_connection():
    answers = [ok(b"1") + b"HTTP/1.1 200 OK\r\ncontent-len", ok(b"2")]
    assert await bodies_and_connections(answers, 2) == ([b"1", b"2"], 2)


@run_async
async def test_nobody_listening_is_a_connect_error():
    client = pool()
    async with Server([]) as server:
        port = server.port
    with pytest.raises(UpstreamConnectError, match=f"cannot connect to 127.0.0.1:{port}"):
        await send(client, port)


@run_async
async def test_a_line_break_in_a_header_is_refused_before_anything_is_sent():
    client = pool()
    async with Server([ok()]) as server:
        with pytest.raises(ValueError, match="line break"):
            await client.request("http", "127.0.0.1", server.port, "POST", "/", [("x-a", "1\r\nx-injected: 2")], b"")
    client.close()
    assert server.requests == []


@run_async
async def test_header_bytes_and_a_compressed_body_reach_the_client_as_they_came():
    """Nothing re-encodes an answer: not a header value's bytes, not a gzip body (mitmproxy's Response.make
    would compress it a second time)."""
    import gzip

    from bedrock_balancer.addon import _response

    body = gzip.compress(b'{"ok":true}')
    client = pool()
    raw = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\nx-note: caf\xc3\xa9 \xff\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    async with Server([raw]) as server:
        answer = await send(client, server.port)
    client.close()
    response = _response(answer.status, [(n, v) for n, v in answer.headers.items() if n.lower() != "content-length"], answer.body)
    assert response.raw_content == body
    assert response.headers.fields == ((b"content-encoding", b"gzip"), (b"x-note", b"caf\xc3\xa9 \xff"), (b"content-length", str(len(body)).encode()))


def test_a_whole_answer_leaves_nothing_for_the_garbage_collector():
    """mitmproxy's type check of ``trailers=None`` raises and catches a TypeError whose traceback holds the
    caller's frames, and so the request's objects, until the collector runs; the proxy avoids it."""
    import gc

    from bedrock_balancer.addon import _response

    def answer() -> None:
        exchange_like = bytearray(1024)  # a local of a caller: it must be freed when the call returns
        response = _response(200, [("content-type", "application/json")], b"{}")
        assert response.trailers is None and exchange_like

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        answer()
        gc.collect()
        leftovers = [o for o in gc.garbage if isinstance(o, (BaseException, bytearray))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert leftovers == []
