"""Other real clients through the real proxy: the AWS CLI and curl's --aws-sigv4; the console script."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bedrock_balancer.eventstream import decode_frames
from proxyharness import CLIENT_KEY, CLIENT_SECRET, PROXY_KEY, targets_for, wait_for, write_config

# curl 7.88 leaves ':' unencoded in the path it signs while AWS encodes it: use model ids without ':'.
CURL_MODEL = "amazon.titan-text-express-v1"
CONVERSE_BODY = json.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}]})


def aws_cli() -> str:
    beside_python = Path(sys.executable).with_name("aws")
    found = str(beside_python) if beside_python.exists() else shutil.which("aws")
    assert found, "the AWS CLI is a test dependency (pip install -e '.[test]')"
    return found


def run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, env={**os.environ, **env}, capture_output=True, timeout=timeout)


def test_aws_cli_through_https_proxy(emu, proxy_factory, tmp_path):
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1", "us-west-2"])})
    env = {
        "HTTPS_PROXY": proxy.url, "AWS_CA_BUNDLE": proxy.ca_cert, "AWS_ACCESS_KEY_ID": CLIENT_KEY,
        "AWS_SECRET_ACCESS_KEY": CLIENT_SECRET, "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1",
    }
    outputs = []
    for _ in range(2):
        result = run([aws_cli(), "bedrock-runtime", "converse", "--model-id", "anthropic.claude-3-haiku-20240307-v1:0",
                      "--messages", json.dumps([{"role": "user", "content": [{"text": "hi"}]}])], env)
        assert result.returncode == 0, result.stderr.decode()
        outputs.append(json.loads(result.stdout)["output"]["message"]["content"][0]["text"])
    result = run([aws_cli(), "bedrock-runtime", "invoke-model", "--model-id", "anthropic.claude-3-haiku-20240307-v1:0",
                  "--body", '{"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}',
                  str(tmp_path / "out.json")], env)
    assert result.returncode == 0, result.stderr.decode()

    assert {re.search(r"Hello from (\S+)", o).group(1) for o in outputs} == {"us-east-1", "us-west-2"}
    assert "Hello from" in (tmp_path / "out.json").read_text()
    assert all(r.auth_ok and r.access_key_id == PROXY_KEY for r in emu.requests)


def test_aws_cli_error_is_the_modeled_exception(emu, proxy_factory):
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])})
    env = {
        "HTTPS_PROXY": proxy.url, "AWS_CA_BUNDLE": proxy.ca_cert, "AWS_ACCESS_KEY_ID": CLIENT_KEY,
        "AWS_SECRET_ACCESS_KEY": CLIENT_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
    }
    result = run([aws_cli(), "bedrock-runtime", "converse", "--model-id", "eu.anthropic.claude-3-haiku-20240307-v1:0",
                  "--messages", json.dumps([{"role": "user", "content": [{"text": "hi"}]}])], env)
    assert result.returncode != 0
    assert b"(ValidationException)" in result.stderr and b"no configured target" in result.stderr


def curl(*args: str) -> subprocess.CompletedProcess:
    return run(["curl", "--silent", "--show-error", "--fail-with-body", "--aws-sigv4", "aws:amz:us-east-1:bedrock",
                "--user", f"{CLIENT_KEY}:{CLIENT_SECRET}", "-H", "content-type: application/json", *args], {})


def test_curl_aws_sigv4_through_https_proxy(emu, proxy_factory):
    proxy = proxy_factory({"targets": targets_for(emu, ["us-west-2"])})

    result = curl("-x", proxy.url, "--cacert", proxy.ca_cert, "-d", CONVERSE_BODY,
                  f"https://bedrock-runtime.us-east-1.amazonaws.com/model/{CURL_MODEL}/converse")

    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["output"]["message"]["content"][0]["text"].startswith("Hello from us-west-2")
    assert [(r.region, r.auth_ok, r.access_key_id) for r in emu.requests] == [("us-west-2", True, PROXY_KEY)]


def test_curl_aws_sigv4_in_reverse_mode(emu, proxy_factory):
    proxy = proxy_factory({"targets": targets_for(emu, ["us-west-2"])}, mode="reverse:https://bedrock-runtime.us-east-1.amazonaws.com")

    result = curl("-d", CONVERSE_BODY, f"{proxy.url}/model/{CURL_MODEL}/converse")

    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["output"]["message"]["content"][0]["text"].startswith("Hello from us-west-2")
    assert [(r.region, r.auth_ok, r.access_key_id) for r in emu.requests] == [("us-west-2", True, PROXY_KEY)]


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_curl_streams_event_frames(emu, proxy_factory, http):
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])})

    result = curl("-N", http, "-x", proxy.url, "--cacert", proxy.ca_cert, "-d", CONVERSE_BODY,
                  f"https://bedrock-runtime.us-east-1.amazonaws.com/model/{CURL_MODEL}/converse-stream")

    assert result.returncode == 0, result.stderr
    events = [f.event_type for f in decode_frames(result.stdout)]
    assert events[0] == "messageStart" and events[-1] == "metadata" and "contentBlockDelta" in events


class RawH2Stream:
    """One ConverseStream over HTTP/2 through the proxy in regular mode, driven frame by frame with the h2 library
    (boto3 and curl cannot leave out content-length, or hang up at a chosen moment). No content-length is sent:
    HTTP/2 frames a body by its DATA frames."""

    HOST = "bedrock-runtime.us-east-1.amazonaws.com"

    def __init__(self, proxy, path: str = f"/model/{CURL_MODEL}/converse-stream"):
        import socket
        import ssl

        import h2.config
        import h2.connection
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        signed = AWSRequest("POST", f"https://{self.HOST}{path}", data=CONVERSE_BODY.encode(), headers={"content-type": "application/json"})
        SigV4Auth(Credentials(CLIENT_KEY, CLIENT_SECRET), "bedrock", "us-east-1").add_auth(signed)
        headers = [(":method", "POST"), (":path", path), (":scheme", "https"), (":authority", self.HOST)]
        headers += [(name.lower(), value) for name, value in signed.headers.items() if name.lower() != "host"]
        assert "content-length" not in dict(headers)

        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        raw.sendall(f"CONNECT {self.HOST}:443 HTTP/1.1\r\nHost: {self.HOST}:443\r\n\r\n".encode())
        assert raw.recv(1024).startswith(b"HTTP/1.1 200")
        tls = ssl.create_default_context(cafile=proxy.ca_cert)
        tls.set_alpn_protocols(["h2"])
        self.sock = tls.wrap_socket(raw, server_hostname=self.HOST)
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.conn.send_headers(1, headers)
        self.conn.send_data(1, CONVERSE_BODY.encode(), end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.status: bytes | None = None
        self.body = b""
        self.ended = False

    def receive(self) -> None:
        """Read what the proxy sent next."""
        import h2.events

        data = self.sock.recv(65536)
        assert data, "the proxy closed the connection"
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.status = dict(event.headers)[b":status"]
            elif isinstance(event, h2.events.DataReceived):
                self.body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, 1)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                self.ended = True
        self.sock.sendall(self.conn.data_to_send())

    def events(self) -> list[str]:
        return [f.event_type for f in decode_frames(self.body)]

    def close(self) -> None:
        self.sock.close()


def test_an_http2_stream_whose_request_has_no_content_length_streams(emu, proxy_factory):
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])})
    stream = RawH2Stream(proxy)
    try:
        while not stream.ended:
            stream.receive()
    finally:
        stream.close()

    assert stream.status == b"200", stream.body
    events = stream.events()
    assert events[0] == "messageStart" and "contentBlockDelta" in events and events[-1] == "metadata"


def test_an_http2_client_that_hangs_up_mid_stream_is_logged_as_gone_not_as_a_broken_upstream(emu, proxy_factory):
    # mitmproxy reports an HTTP/2 client's closed connection as "peer closed connection": the record must still
    # say the client went, and the truncated-streams metric (an upstream breaking off) must not count it.
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])})
    held = emu.hold_streams("us-east-1")
    stream = RawH2Stream(proxy)
    try:
        while "contentBlockDelta" not in stream.events():  # content flows; the rest is held upstream
            stream.receive()
    finally:
        stream.close()
        held.release()

    (record,) = proxy.wait_for_records(1)

    assert record["stream"] == "client-gone" and record["region"] == "us-east-1"
    assert proxy.balancer.router.cooldowns.snapshot() == []  # the region did nothing wrong


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_curl_gets_a_streaming_requests_error_whole(emu, proxy_factory, http):
    # A stream's head is held until the relay decides it; here the decision is a whole error answer.
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"]), "retry": {"max_attempts": 1}})
    emu.set_mode("us-east-1", "throttle")

    result = run(["curl", "--silent", "--show-error", "-N", http, "--aws-sigv4", "aws:amz:us-east-1:bedrock", "--user",
                  f"{CLIENT_KEY}:{CLIENT_SECRET}", "-H", "content-type: application/json", "-D", "-", "-x", proxy.url,
                  "--cacert", proxy.ca_cert, "-d", CONVERSE_BODY,
                  f"https://bedrock-runtime.us-east-1.amazonaws.com/model/{CURL_MODEL}/converse-stream"], {})

    assert result.returncode == 0, result.stderr
    body = result.stdout
    while body.startswith(b"HTTP/"):  # the proxy's answer to CONNECT, then the answer's own head
        head, _, body = body.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in header_lines)}
    assert status_line.split()[1] == "429" and headers["x-amzn-errortype"].startswith("ThrottlingException")
    assert "x-bedrock-balancer-provisional" not in headers
    assert json.loads(body)["message"]


def test_other_hosts_are_not_intercepted(emu, proxy_factory):
    """In regular mode the proxy tunnels non-Bedrock hosts untouched: a TLS client sees the real certificate."""
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])})
    port = emu.endpoint_url("eu-west-1").rsplit(":", 1)[1]

    # The emulator's own certificate (not mitmproxy's) must verify: the tunnel was not intercepted.
    result = run(["curl", "--silent", "--show-error", "-x", proxy.url, "--cacert", emu.ca_path,
                  f"https://localhost:{port}/_emulator/requests"], {})

    assert result.returncode == 0, result.stderr
    assert emu.requests == [] or all(r.access_key_id != PROXY_KEY for r in emu.requests)


def start_console_script(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "from bedrock_balancer.cli import main; main()", *args],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_console_script_serves_boto3_through_https_proxy(emu, tmp_path, monkeypatch):
    import boto3

    config = write_config(tmp_path / "balancer.yaml", {"targets": targets_for(emu, ["us-east-1", "us-west-2"])})
    process = start_console_script(
        ["--set", f"bedrock_config={config}", "--set", f"confdir={tmp_path}", "-p", "0",
         "--set", f"ssl_verify_upstream_trusted_ca={emu.ca_path}"], {},
    )
    try:
        port = None
        for line in process.stdout:  # mitmproxy prints the bound address once it listens
            if match := re.search(r"proxy listening at 127\.0\.0\.1:(\d+)", line):
                port = int(match.group(1))
                break
        assert port, "the proxy did not start"
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "mitmproxy-ca-cert.pem"))
        client = boto3.client("bedrock-runtime", region_name="us-east-1", aws_access_key_id=CLIENT_KEY, aws_secret_access_key=CLIENT_SECRET)
        regions = [client.converse(modelId="amazon.nova-lite-v1:0", messages=[{"role": "user", "content": [{"text": "hi"}]}])
                   ["ResponseMetadata"]["HTTPHeaders"]["x-bedrock-balancer-region"] for _ in range(2)]
        assert regions == ["us-east-1", "us-west-2"]
        # Other hosts are tunnelled untouched: the emulator's own certificate verifies, not mitmproxy's.
        other_port = emu.endpoint_url("eu-west-1").rsplit(":", 1)[1]
        tunnelled = run(["curl", "--silent", "--show-error", "-x", f"http://127.0.0.1:{port}", "--cacert", emu.ca_path,
                         f"https://localhost:{other_port}/_emulator/requests"], {})
        assert tunnelled.returncode == 0, tunnelled.stderr
    finally:
        process.terminate()
        output = process.communicate(timeout=10)[0]
    assert "bedrock Converse amazon.nova-lite-v1:0 us-east-1 -> us-west-2 status=200" in output
    assert PROXY_KEY not in output and CLIENT_KEY not in output


def test_the_console_script_saves_a_stream_the_client_left_with_what_it_got(emu, tmp_path, monkeypatch):
    # mitmproxy's -w writes a flow in its own error hook: the balancer's must run first (as a -s script's does),
    # or the saved flow lacks the stream's copy and the comment saying where it went.
    import boto3

    from mitmproxy import io as mio

    from bedrock_balancer import contentview

    config = write_config(tmp_path / "balancer.yaml", {"targets": targets_for(emu, ["us-east-1"])})
    flows, access_log = tmp_path / "flows.mitm", tmp_path / "access.jsonl"
    process = start_console_script(
        ["--set", f"bedrock_config={config}", "--set", f"confdir={tmp_path}", "-p", "0", "-w", str(flows),
         "--set", f"bedrock_access_log={access_log}", "--set", f"ssl_verify_upstream_trusted_ca={emu.ca_path}"], {},
    )
    held = emu.hold_streams("us-east-1")
    try:
        port = next(int(m.group(1)) for line in process.stdout if (m := re.search(r"proxy listening at 127\.0\.0\.1:(\d+)", line)))
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "mitmproxy-ca-cert.pem"))
        client = boto3.client("bedrock-runtime", region_name="us-east-1", aws_access_key_id=CLIENT_KEY, aws_secret_access_key=CLIENT_SECRET)
        response = client.converse_stream(modelId="amazon.nova-lite-v1:0", messages=[{"role": "user", "content": [{"text": "hi"}]}])
        stream = iter(response["stream"])
        next(stream), next(stream)  # content is flowing; the rest is held upstream
        response["stream"]._raw_stream.close()  # the app goes away mid-answer
        wait_for(lambda: access_log.exists() and access_log.read_text().strip(), 10, "the access record")
    finally:
        held.release()
        process.terminate()
        process.communicate(timeout=10)

    (saved,) = mio.FlowReader(flows.open("rb")).stream()
    assert json.loads(access_log.read_text())["stream"] == "client-gone"
    assert saved.comment.startswith("us-east-1 → us-east-1") and "Client disconnected" in saved.comment
    assert "contentBlockDelta" in [f.event_type for f in decode_frames(saved.response.raw_content)]
    assert saved.metadata[contentview.STREAM_COPY_KEY]["complete"] is False


def test_an_admin_address_it_cannot_listen_on_stops_startup_naming_the_option(tmp_path, emu):
    config = write_config(tmp_path / "balancer.yaml", {"targets": targets_for(emu, ["us-east-1"])})
    process = start_console_script(
        ["--set", f"bedrock_config={config}", "--set", f"confdir={tmp_path}", "-p", "0",
         "--set", "bedrock_admin=192.0.2.1:9090"], {},  # TEST-NET-1: no address of this machine
    )
    output = process.communicate(timeout=30)[0]
    assert process.returncode != 0
    assert "bedrock_admin: cannot listen on 192.0.2.1:9090" in output and "Traceback" not in output


@pytest.mark.parametrize(
    "config_text, message",
    [
        ("targets:\n  - region: us-east-1\n    wieght: 2\n", "targets[0].wieght: unknown key"),
        ("strategy: fastest\ntargets:\n  - region: us-east-1\n", "strategy: 'fastest' is not one of"),
        ("targets:\n  - region: us-eest-1\n", "targets[0].region: 'us-eest-1' is not a region botocore knows"),
    ],
)
def test_bad_config_stops_startup_naming_the_field(tmp_path, config_text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(config_text)
    process = start_console_script(["--set", f"bedrock_config={config}", "--set", f"confdir={tmp_path}", "-p", "0"], {})
    output = process.communicate(timeout=30)[0]
    assert process.returncode != 0
    assert message in output
