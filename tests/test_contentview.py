"""The Bedrock content views (event stream, SigV4) and the bounded copy of streamed bodies.

Streams are captured from the emulator (real framing, real padding, real base64 chunks) and shown
through mitmproxy's own content-view machinery, so the same tests run on mitmproxy 11 and 12:

    python -m pytest tests/test_contentview.py                      # mitmproxy 11 (Python 3.11)
    /tmp/venv312/bin/python -m pytest tests/test_contentview.py     # mitmproxy 12 (Python 3.12+)
"""

from __future__ import annotations

import asyncio
import base64
import http.client as http_client
import json
import ssl
import struct
import threading
from urllib.parse import urlsplit

import boto3
import pytest
import yaml
from botocore.config import Config as BotoConfig
from mitmproxy import contentviews, http
from mitmproxy.test import taddons, tflow

from bedrock_balancer import contentview as cv
from bedrock_balancer import eventstream, sigv4

from proxyharness import PROXY_KEY, PROXY_SECRET

NEW_API = hasattr(contentviews, "Contentview")
MODEL = "anthropic.claude-3-haiku-20240307-v1%3A0"
CONVERSE = {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}
INVOKE = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}


# --------------------------------------------------------------------------------------------------
# Helpers


def capture(emu, operation: str, body: dict, region: str = "us-east-1") -> tuple[int, list[tuple[str, str]], bytes]:
    """One signed raw HTTP request to the emulator; the response body exactly as it came off the wire."""
    url = urlsplit(emu.endpoint_url(region))
    path = f"/model/{MODEL}/{operation}"
    data = json.dumps(body).encode()
    headers = [("host", url.netloc), ("content-type", "application/json")]
    headers += sigv4.sign("POST", path, "", headers, sigv4.payload_hash(data), region, "bedrock", sigv4.Credentials(PROXY_KEY, PROXY_SECRET))
    context = ssl.create_default_context(cafile=emu.ca_path)
    conn = http_client.HTTPSConnection(url.hostname, url.port, context=context, timeout=10)
    conn.putrequest("POST", path, skip_host=True, skip_accept_encoding=True)
    for name, value in headers + [("content-length", str(len(data)))]:
        conn.putheader(name, value)
    conn.endheaders(data)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, response.getheaders(), payload


def flow_with_response(body: bytes, content_type: str = cv.EVENT_STREAM) -> http.HTTPFlow:
    flow = tflow.tflow(resp=True)
    flow.response.headers["content-type"] = content_type
    flow.response.raw_content = body
    return flow


def show(message, flow, view: str = "auto") -> tuple[str | None, str, list]:
    """(chosen view name, text, styled lines or []) through mitmproxy's own content-view entry point."""
    if NEW_API:
        result = contentviews.prettify_message(message, flow, view_name=view)
        return result.view_name, result.text, []
    description, lines, error = contentviews.get_message_content_view(view, message, flow)
    assert error is None, error
    lines = list(lines)
    chosen = description if view == "auto" else view
    return chosen, "\n".join("".join(t for _, t in line) for line in lines), lines


@pytest.fixture
def views():
    with taddons.context() as tctx:
        addon = cv.BedrockViews()
        tctx.master.addons.add(addon)
        yield addon
        tctx.master.addons.remove(addon)


def frame_offsets(data: bytes) -> list[int]:
    offsets, offset = [], 0
    while offset < len(data):
        offsets.append(offset)
        offset += struct.unpack_from("!I", data, offset)[0]
    return offsets


@pytest.fixture(scope="module")
def streams(emulator):
    """Real bytes: a ConverseStream, an InvokeModelWithResponseStream, and a stream whose first frame is a throttle."""
    emulator.set_mode("us-east-1", "ok")
    status, headers, converse = capture(emulator, "converse-stream", CONVERSE)
    assert status == 200 and dict((k.lower(), v) for k, v in headers)["content-type"] == cv.EVENT_STREAM
    status, _, invoke = capture(emulator, "invoke-with-response-stream", INVOKE)
    assert status == 200
    emulator.set_mode("us-east-1", "stream_first_exception", count=1)
    status, _, throttled = capture(emulator, "converse-stream", CONVERSE)
    emulator.set_mode("us-east-1", "ok")
    assert status == 200
    return {"converse": converse, "invoke": invoke, "throttled": throttled}


# --------------------------------------------------------------------------------------------------
# The event-stream view


def test_converse_stream_is_shown_frame_by_frame(views, streams):
    flow = flow_with_response(streams["converse"])
    chosen, text, _ = show(flow.response, flow)
    assert chosen and chosen.lower().startswith("bedrock event")  # chosen automatically for the content type
    frames = eventstream.decode_frames(streams["converse"])
    assert f"{len(frames)} frame(s), {len(streams['converse'])} bytes" in text
    assert "# events: messageStart, contentBlockDelta ×3, contentBlockStop, messageStop, metadata" in text
    assert '# text: "Hello from us-east-1"' in text
    assert "# usage: inputTokens=" in text and "outputTokens=3" in text
    assert text.count("- frame: ") == len(frames)
    assert '"contentBlockIndex": 0,' in text  # payload pretty-printed, one key a line
    assert '    ":event-type": contentBlockDelta' in text
    assert "⚠" not in text
    document = yaml.safe_load(text)  # the text is YAML (what mitmproxy 12 highlights)
    assert [entry["event"] for entry in document] == [f.event_type for f in frames]
    assert document[1]["payload"]["delta"] == {"text": "Hello"}


def test_invoke_stream_chunks_are_decoded_from_base64(views, streams):
    flow = flow_with_response(streams["invoke"])
    _, text, _ = show(flow.response, flow)
    document = yaml.safe_load(text)
    assert {entry["event"] for entry in document} == {"chunk"}
    decoded = [entry["bytes"] for entry in document]
    assert decoded[0]["type"] == "message_start"
    assert decoded[-1]["type"] == "message_stop" and "amazon-bedrock-invocationMetrics" in decoded[-1]
    expected = [json.loads(base64.b64decode(json.loads(f.payload)["bytes"])) for f in eventstream.decode_frames(streams["invoke"])]
    assert decoded == expected
    assert "# decoded from base64" in text and '# text: "Hello from us-east-1"' in text
    assert "inputTokenCount=" in text


def test_exception_frame_is_highlighted(views, streams):
    flow = flow_with_response(streams["throttled"])
    _, text, lines = show(flow.response, flow)
    assert "# ⚠ frame 1: exception throttlingException: Too many tokens" in text
    assert "  EXCEPTION: throttlingException  # ⚠ exception frame" in text
    assert yaml.safe_load(text)[0]["EXCEPTION"] == "throttlingException"
    if not NEW_API:  # mitmproxy 11 styles lines: the exception is in the error style
        assert any(("error", " throttlingException") in line for line in lines)


def test_corrupted_frames_are_reported_not_fatal(views, streams):
    data = bytearray(streams["converse"])
    offsets = frame_offsets(bytes(data))
    data[offsets[2] + 20] ^= 0xFF  # inside frame 3's headers: message CRC no longer matches
    flow = flow_with_response(bytes(data))
    chosen, text, _ = show(flow.response, flow)
    assert chosen and chosen.lower().startswith("bedrock event")
    assert "# ⚠ frame 3 at byte" in text and "message CRC mismatch" in text and "contents unverified" in text
    assert text.count("- frame: ") == len(offsets)  # the lengths held, so every later frame is still shown

    data = bytearray(streams["converse"])
    data[offsets[4] + 1] ^= 0x01  # frame 5's length: the prelude CRC catches it, framing is lost
    flow = flow_with_response(bytes(data))
    _, text, _ = show(flow.response, flow)
    assert "frame 5 at byte" in text and "prelude CRC mismatch" in text and "cannot be framed" in text
    assert text.count("- frame: ") == 4

    flow = flow_with_response(streams["converse"] + streams["converse"][:30])
    _, text, _ = show(flow.response, flow)
    assert "truncated: 30 trailing byte(s)" in text

    flow = flow_with_response(b"\x00\x01garbage")
    _, text, _ = show(flow.response, flow)
    assert "truncated: 9 trailing byte(s)" in text


def test_views_work_with_built_frames_and_odd_headers(views):
    frames = (
        eventstream.encode_frame({":message-type": "event", ":event-type": "odd", "flag": True, "n": 7, "blob": b"\x00\x01"}, b"\xff\xfe binary")
        + eventstream.error_frame("InternalFailure", "boom: it broke")
        + eventstream.event_frame("chunk", {"bytes": "not base64!!"})
    )
    text = cv._text(cv.render_eventstream(frames)[1])
    document = yaml.safe_load(text)
    assert document[0]["headers"]["flag"] is True and document[0]["headers"]["n"] == 7
    assert document[1]["ERROR"] == "InternalFailure" and document[1]["message"] == "boom: it broke"
    assert "not valid base64" in text


def test_other_content_types_are_left_to_other_views(views):
    flow = flow_with_response(b'{"a": 1}', "application/json")
    chosen, _, _ = show(flow.response, flow)
    assert "bedrock" not in (chosen or "").lower()


# --------------------------------------------------------------------------------------------------
# The SigV4 view


CLIENT_AUTH = (
    "AWS4-HMAC-SHA256 Credential=AKIDCLIENTEXAMPLE/20250102/us-east-1/bedrock/aws4_request, "
    "SignedHeaders=content-type;host;x-amz-date, Signature=" + "ab" * 32
)


def test_sigv4_view_shows_both_sides_and_no_secret(views):
    flow = tflow.tflow(resp=True)
    flow.metadata[cv.CLIENT_SIGV4_KEY] = cv.sigv4_summary(CLIENT_AUTH, "20250102T030405Z")
    flow.request.host = "bedrock-runtime.us-west-2.amazonaws.com"
    flow.request.headers["host"] = flow.request.host
    flow.request.headers["x-amz-date"] = "20250102T030406Z"
    flow.request.headers["x-amz-security-token"] = "<redacted>"
    flow.request.headers["authorization"] = (
        "AWS4-HMAC-SHA256 Credential=AKIDPROXYEXAMPLE/20250102/us-west-2/bedrock/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, Signature=<redacted>"
    )
    for message in (flow.request, flow.response):
        chosen, text, _ = show(message, flow, cv.SIGV4_VIEW_NAME)
        document = yaml.safe_load(text)
        assert document["client sent"]["region"] == "us-east-1"
        assert document["client sent"]["signed headers"] == ["content-type", "host", "x-amz-date"]
        assert document["proxy sent"]["region"] == "us-west-2" and document["proxy sent"]["x-amz-date"] == "20250102T030406Z"
        assert document["proxy sent"]["scope"] == "20250102/us-west-2/bedrock/aws4_request"
        assert document["proxy sent"]["session token"] == "present (redacted)"
        assert "region us-east-1 -> us-west-2" in document["changes"]
        assert "signed headers added: x-amz-security-token" in document["changes"]
        assert "ab" * 32 not in text
    # Never chosen automatically.
    chosen, _, _ = show(flow.request, flow)
    assert "sigv4" not in (chosen or "").lower()


def refused_flow(answered: bool) -> http.HTTPFlow:
    """A flow as the addon leaves one it did not send upstream: the client's own request, its signature
    redacted, and the client's scope in metadata; answered by the proxy, or not at all (the client left)."""
    from bedrock_balancer.errors import BedrockError

    flow = tflow.tflow(resp=answered)
    flow.metadata[cv.CLIENT_SIGV4_KEY] = cv.sigv4_summary(CLIENT_AUTH, "20250102T030405Z")
    flow.request.host = "bedrock-runtime.us-east-1.amazonaws.com"
    flow.request.headers["host"] = flow.request.host
    flow.request.headers["x-amz-date"] = "20250102T030405Z"
    flow.request.headers["authorization"] = CLIENT_AUTH.replace("ab" * 32, "<redacted>")
    if answered:
        status, headers, body = BedrockError("ValidationException", "bedrock-balancer: the model identifier contains characters a model id cannot have").wire()
        flow.response = http.Response.make(status, body, headers)
    else:
        flow.error = tflow.terr("the client went away")
    return flow


@pytest.mark.parametrize("answered", [True, False], ids=["refused", "client-left"])
def test_sigv4_view_of_a_request_that_never_went_upstream(views, answered):
    """Nothing was re-signed: the view must not present the client's own credentials as what the proxy sent."""
    flow = refused_flow(answered)
    _, text, _ = show(flow.request, flow, cv.SIGV4_VIEW_NAME)
    document = yaml.safe_load(text)
    assert document["client sent"]["access key"] == "AKIDCLIENTEXAMPLE"
    assert document["proxy sent"] == "nothing", text
    assert "nothing was sent upstream" in text
    assert "changes" not in document  # no rewrite happened, so none to list (not an empty list of them)
    assert text.count("AKIDCLIENTEXAMPLE") == 1
    if not answered:  # the same flow still in flight (a whole answer awaited) is not judged yet
        flow.error = None
        _, text, _ = show(flow.request, flow, cv.SIGV4_VIEW_NAME)
        assert "nothing was sent upstream" not in text


def test_sigv4_view_of_a_proxy_error_after_attempts_shows_what_went_upstream(views):
    """A proxy-made answer after upstream attempts (e.g. every target throttled) did send the request."""
    flow = refused_flow(True)
    flow.response.headers["x-bedrock-balancer-target"] = "us-west-2"
    flow.request.headers["authorization"] = (
        "AWS4-HMAC-SHA256 Credential=AKIDPROXYEXAMPLE/20250102/us-west-2/bedrock/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, Signature=<redacted>"
    )
    _, text, _ = show(flow.request, flow, cv.SIGV4_VIEW_NAME)
    document = yaml.safe_load(text)
    assert document["proxy sent"]["access key"] == "AKIDPROXYEXAMPLE"
    assert document["changes"] == ["region us-east-1 -> us-west-2", "access key AKIDCLIENTEXAMPLE -> AKIDPROXYEXAMPLE"]


def test_sigv4_view_on_a_plain_flow_never_shows_the_signature(views):
    flow = tflow.tflow()
    flow.request.headers["authorization"] = CLIENT_AUTH
    flow.request.headers["x-amz-security-token"] = "SECRET-SESSION-TOKEN"
    _, text, _ = show(flow.request, flow, cv.SIGV4_VIEW_NAME)
    document = yaml.safe_load(text)
    assert document["request"]["access key"] == "AKIDCLIENTEXAMPLE" and document["request"]["signature"] == "<present>"
    assert "ab" * 32 not in text and "SECRET-SESSION-TOKEN" not in text
    flow.request.headers["authorization"] = "Bearer ABSKsecretkey"
    _, text, _ = show(flow.request, flow, cv.SIGV4_VIEW_NAME)
    assert "ABSKsecretkey" not in text and "Bearer <redacted>" in text
    assert cv.sigv4_summary("Bearer x", None) is None


# --------------------------------------------------------------------------------------------------
# The bounded copy and the addon's registration


def test_bounded_copy_passes_chunks_unchanged_and_keeps_the_first_bytes(views, streams):
    data = streams["converse"]
    # A limit inside the third frame (frames carry random-length padding, as AWS's do; each starts with its length).
    first = int.from_bytes(data[:4], "big")
    limit = first + int.from_bytes(data[first : first + 4], "big") + 5
    flow = tflow.tflow(resp=True)
    flow.response.headers["content-type"] = cv.EVENT_STREAM
    flow.response.raw_content = None  # what mitmproxy leaves on a streamed response
    copy = cv.bounded_copy(limit, flow)
    chunks = [data[i : i + 97] for i in range(0, len(data), 97)]
    assert [copy(c) for c in chunks] == chunks
    assert flow.response.raw_content is None  # not before the end
    assert copy(b"") == b""
    assert flow.response.raw_content == data[:limit]
    assert flow.metadata[cv.STREAM_COPY_KEY] == {"kept": limit, "total": len(data), "limit": limit, "complete": True}
    _, text, _ = show(flow.response, flow)
    assert f"the first {limit} of {len(data)} streamed bytes" in text
    assert "the kept copy ends inside frame" in text and "truncated:" not in text and "⚠" not in text


def test_attach_copy_after_a_broken_stream(views, streams):
    flow = tflow.tflow(resp=True)
    flow.response.raw_content = None
    flow.response.stream = cv.bounded_copy(1 << 20)  # no flow given: the addon attaches in response/error
    flow.response.stream(streams["converse"][:200])
    assert cv.attach_copy(flow) is True
    assert flow.response.raw_content == streams["converse"][:200]
    assert flow.metadata[cv.STREAM_COPY_KEY]["complete"] is False
    assert cv.attach_copy(tflow.tflow(resp=True)) is False  # not a bounded-copy stream


def test_addon_registers_and_unregisters_both_views():
    def names():
        return set(contentviews.registry) if NEW_API else {v.name.lower() for v in contentviews.views}

    wanted = {cv.EVENTSTREAM_VIEW_NAME.lower(), cv.SIGV4_VIEW_NAME.lower()}
    with taddons.context() as tctx:
        addon = cv.BedrockViews()
        tctx.master.addons.add(addon)
        assert wanted <= names()
        tctx.master.addons.remove(addon)
        assert not wanted & names()
        tctx.master.addons.add(addon)  # a script reload loads it again
        assert wanted <= names()
        tctx.master.addons.remove(addon)


class _Ready:
    def __init__(self):
        self.event = threading.Event()

    def running(self):
        self.event.set()


class _StreamWithCopy:
    """What the balancer does: stream event streams through a bounded copy; keep the flows to look at."""

    def __init__(self, limit: int):
        self.limit = limit
        self.flows: list[http.HTTPFlow] = []

    def responseheaders(self, flow):
        if flow.response.headers.get("content-type", "").startswith(cv.EVENT_STREAM):
            flow.response.stream = cv.bounded_copy(self.limit, flow)

    def response(self, flow):
        cv.attach_copy(flow)
        self.flows.append(flow)


@pytest.mark.parametrize("limit", [1 << 20, 400])
def test_streamed_response_through_a_real_proxy_keeps_a_copy(emu, tmp_path, limit):
    """A real mitmproxy streams the emulator's ConverseStream to boto3; the flow (and -w) keep the copy."""
    from mitmproxy import io as mio
    from mitmproxy.options import Options
    from mitmproxy.tools.dump import DumpMaster

    ready, copier, holder = _Ready(), _StreamWithCopy(limit), {}
    flow_file = tmp_path / "flows.mitm"

    async def main():
        master = DumpMaster(Options(), with_termlog=False, with_dumper=False)
        master.addons.add(cv.BedrockViews(), copier, ready)
        master.options.update(
            listen_host="127.0.0.1", listen_port=0, mode=[f"reverse:{emu.endpoint_url('us-east-1')}"],
            confdir=str(tmp_path / "conf"), ssl_verify_upstream_trusted_ca=emu.ca_path, save_stream_file=str(flow_file),
            keep_host_header=True,  # the client signed the Host it addressed
        )
        holder["master"], holder["loop"] = master, asyncio.get_running_loop()
        await master.run()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    assert ready.event.wait(20)
    try:
        port = holder["master"].addons.get("proxyserver").listen_addrs()[0][1]
        client = boto3.client(
            "bedrock-runtime", region_name="us-east-1", endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id=PROXY_KEY, aws_secret_access_key=PROXY_SECRET, config=BotoConfig(retries={"total_max_attempts": 1}),
        )
        response = client.converse_stream(modelId="anthropic.claude-3-haiku-20240307-v1:0", messages=CONVERSE["messages"])
        events = list(response["stream"])  # boto3 checks every CRC: the client got the stream unchanged
        assert [next(iter(e)) for e in events] == ["messageStart"] + ["contentBlockDelta"] * 3 + ["contentBlockStop", "messageStop", "metadata"]
    finally:
        holder["loop"].call_soon_threadsafe(holder["master"].shutdown)
        thread.join(10)

    (flow,) = copier.flows
    info = flow.metadata[cv.STREAM_COPY_KEY]
    assert info["complete"] and info["kept"] == min(limit, info["total"]) and len(flow.response.raw_content) == info["kept"]
    if limit > info["total"]:
        assert len(eventstream.decode_frames(flow.response.raw_content)) == len(events)
    (saved,) = [f for f in mio.FlowReader(flow_file.open("rb")).stream()]
    assert saved.response.raw_content == flow.response.raw_content  # attached before -w wrote the flow
    with taddons.context() as tctx:
        addon = cv.BedrockViews()
        tctx.master.addons.add(addon)
        _, text, _ = show(saved.response, saved)
        tctx.master.addons.remove(addon)
    if limit > info["total"]:
        assert '# text: "Hello from us-east-1"' in text and "⚠" not in text
    else:
        assert f"the first {limit} of {info['total']} streamed bytes" in text
