"""The line per request, and mitmproxy's line when a stream starts: they reach mitmproxy's log handlers
(the terminal, mitmweb's event log), but not mitmproxy's deprecated ``add_log`` hook, which would run
every addon once per request (scripts/bench)."""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import log as mitmproxy_log

from bedrock_balancer import addon


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class LegacyRecorder(mitmproxy_log.LegacyLogEvents):
    """A LegacyLogEvents handler that records what it would turn into add_log events."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)
        self._initiated_in_test = None
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_stream_line_is_written_once_the_event_loop_is_free():
    # mitmproxy logs it between sending a stream's head and forwarding its first content event.
    server_log = logging.getLogger("mitmproxy.proxy.server")
    terminal = Recorder()
    server_log.addHandler(terminal)
    level = server_log.level
    server_log.setLevel(logging.INFO)

    async def stream_starts() -> list[str]:
        server_log.info("Streaming response from bedrock-runtime.us-west-2.amazonaws.com.")
        server_log.info("client disconnect")
        written_at_once = [r.getMessage() for r in terminal.records]
        await asyncio.sleep(0)
        return written_at_once

    try:
        addon._defer_streaming_line()
        addon._defer_streaming_line()  # idempotent
        written_at_once = asyncio.run(stream_starts())
    finally:
        server_log.removeHandler(terminal)
        server_log.setLevel(level)
        server_log.removeFilter(addon._later_if_streaming_line)
    assert written_at_once == ["client disconnect"]
    assert [r.getMessage() for r in terminal.records] == ["client disconnect", "Streaming response from bedrock-runtime.us-west-2.amazonaws.com."]
    disconnect, streaming = terminal.records
    assert streaming.created <= disconnect.created  # written later, it keeps the time it was logged


def test_request_and_stream_lines_skip_only_the_deprecated_add_log_hook():
    root = logging.getLogger()
    terminal, legacy = Recorder(), LegacyRecorder()
    root.addHandler(terminal)
    root.addHandler(legacy)
    level = addon.request_log.level
    addon.request_log.setLevel(logging.INFO)
    mitmproxy_server = logging.getLogger("mitmproxy.proxy.server")
    server_level = mitmproxy_server.level
    mitmproxy_server.setLevel(logging.INFO)
    try:
        addon._spare_legacy_log_hook()
        addon._spare_legacy_log_hook()  # idempotent: one filter, however often the proxy starts
        addon._defer_streaming_line()  # with no event loop running, the line is written at once
        addon.request_log.info("bedrock Converse m us-east-1 -> us-west-2 status=200 12ms")
        addon.log.warning("bedrock-balancer: something the operator must see")
        # As mitmproxy's ConnectionHandler.log does it, when a stream starts:
        mitmproxy_server.info("Streaming response from bedrock-runtime.us-west-2.amazonaws.com.", extra={"client": ("127.0.0.1", 5)})
        mitmproxy_server.info("client disconnect", extra={"client": ("127.0.0.1", 5)})
    finally:
        root.removeHandler(terminal)
        root.removeHandler(legacy)
        addon.request_log.setLevel(level)
        mitmproxy_server.setLevel(server_level)
        mitmproxy_server.removeFilter(addon._later_if_streaming_line)
    assert [r.getMessage() for r in terminal.records] == [
        "bedrock Converse m us-east-1 -> us-west-2 status=200 12ms",
        "bedrock-balancer: something the operator must see",
        "Streaming response from bedrock-runtime.us-west-2.amazonaws.com.",
        "client disconnect",
    ]
    assert [r.getMessage() for r in legacy.records] == ["bedrock-balancer: something the operator must see", "client disconnect"]
    assert legacy.filters.count(addon._worth_an_add_log) == 1


def test_the_line_of_a_request_that_got_no_answer_says_so_plainly():
    # The client left while the proxy waited for an upstream: there is no status, and the line says "-",
    # as it does for a missing model or region, rather than Python's "None".
    record = {
        "operation": "ConverseStream", "model": "m", "client_region": "us-east-1", "region": "us-east-1", "status": None,
        "latency_ms": 512.0, "input_tokens": None, "output_tokens": None, "attempts": [{"target": "use1"}],
        "error": "the client went away after 1 attempts; no more were made",
    }

    line = addon._log_line(record)

    assert line.startswith("bedrock ConverseStream m us-east-1 -> us-east-1 status=- 512ms ")
    assert "None" not in line
