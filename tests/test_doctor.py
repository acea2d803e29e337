"""The signature doctor (``bedrock-sigv4``) on flows recorded by a real proxy, on the official SigV4
suite, and on raw requests.

The flow file comes from a plain mitmdump (mitmproxy's DumpMaster with ``save_stream_file``, no
balancer, so the client's signature is kept intact) in reverse mode in front of the emulator, which
judges every request as AWS does. Each mistake is made by a client before the request leaves it
(botocore's signer, then a change after signing, as a buggy middleware or a naive proxy would), so
the recorded requests are what AWS would really have received.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config as BotoConfig
from botocore.credentials import Credentials as BotoCredentials

from bedrock_balancer import doctor, sigv4
from bedrock_balancer.emulator import Emulator

from proxyharness import CLIENT_KEY, CLIENT_SECRET, targets_for

DOCTOR_KEY = "AKIDDOCTOREXAMPLE"
DOCTOR_SECRET = "doctor-secret-key-example"
MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
WIRE_PATH = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
BODY = {"messages": [{"role": "user", "content": [{"text": "hi"}]}], "inferenceConfig": {"maxTokens": 20}}
SUITE = Path(__file__).resolve().parent / "data" / "sigv4-testsuite"
SUITE_KEYS = ["--access-key", "AKIDEXAMPLE", "--secret-key", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"]
CREDS = ["--access-key", DOCTOR_KEY, "--secret-key", DOCTOR_SECRET, "--region", "us-east-1"]


class _Ready:
    def __init__(self) -> None:
        self.event = threading.Event()

    def running(self) -> None:
        self.event.set()


def run_plain_mitmdump(upstream: str, flow_file: Path, confdir: Path):
    """mitmdump -w in reverse mode, in-process (one proxy at a time: mitmproxy keeps global state)."""
    from mitmproxy.options import Options
    from mitmproxy.tools.dump import DumpMaster

    ready, holder = _Ready(), {}

    async def main() -> None:
        master = DumpMaster(Options(), with_termlog=False, with_dumper=False)
        master.addons.add(ready)
        master.options.update(
            listen_host="127.0.0.1", listen_port=0, mode=[f"reverse:{upstream}"], confdir=str(confdir),
            keep_host_header=True, save_stream_file=str(flow_file),
        )
        holder["master"], holder["loop"] = master, asyncio.get_running_loop()
        await master.run()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True, name="plain-mitmdump")
    thread.start()
    assert ready.event.wait(timeout=20), "mitmdump did not start"
    port = holder["master"].addons.get("proxyserver").listen_addrs()[0][1]

    def stop() -> None:
        holder["loop"].call_soon_threadsafe(holder["master"].shutdown)
        thread.join(timeout=10)

    return port, stop


def signed(port: int, *, region="us-east-1", service="bedrock", body: bytes | None = None, path=WIRE_PATH,
           extra_headers: dict | None = None) -> AWSRequest:
    """A request signed by botocore's own SigV4 signer, as any AWS SDK client would sign it."""
    request = AWSRequest(
        method="POST", url=f"http://127.0.0.1:{port}{path}",
        data=body if body is not None else json.dumps(BODY, separators=(",", ":")).encode(),
        headers={"Content-Type": "application/json", **(extra_headers or {})},
    )
    SigV4Auth(BotoCredentials(DOCTOR_KEY, DOCTOR_SECRET), service, region).add_auth(request)
    return request


def send(port: int, request: AWSRequest, *, path: str = WIRE_PATH, body: bytes | None = None, drop=(), replace=None) -> int:
    """Send exactly what we are told to (the mistake happens between signing and sending)."""
    import http.client

    headers = {} if "host" in {k.lower() for k in request.headers} else {"Host": f"127.0.0.1:{port}"}  # botocore signs the URL's host
    headers.update((k, v) for k, v in request.headers.items() if k.lower() not in {h.lower() for h in drop})
    headers.update(replace or {})
    data = body if body is not None else request.body
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("POST", path, skip_host=True, skip_accept_encoding=True)
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.putheader("Content-Length", str(len(data)))
    conn.endheaders(data)
    status = conn.getresponse().status
    conn.close()
    return status


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, aws_environment):
    """Real requests (one good, one per kind of mistake) through a real mitmdump -w to the emulator."""
    tmp = tmp_path_factory.mktemp("doctor")
    flow_file = tmp / "flows.mitm"
    emu = Emulator(regions=["us-east-1"], tls=False, credentials={DOCTOR_KEY: DOCTOR_SECRET}, fast=True).start()
    port, stop = run_plain_mitmdump(emu.endpoint_url("us-east-1").replace("localhost", "127.0.0.1"), flow_file, tmp / "conf")
    statuses = {}
    try:
        # 0: an unmodified boto3 client.
        client = boto3.client(
            "bedrock-runtime", region_name="us-east-1", endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id=DOCTOR_KEY, aws_secret_access_key=DOCTOR_SECRET,
            config=BotoConfig(retries={"total_max_attempts": 1}),
        )
        client.converse(modelId=MODEL, messages=BODY["messages"])
        statuses["match"] = 200
        # 1: signed for us-west-2, then the scope's region edited to us-east-1 (a naive region-moving proxy).
        r = signed(port, region="us-west-2")
        auth = r.headers["Authorization"].replace("/us-west-2/", "/us-east-1/")
        statuses["region-edited"] = send(port, r, replace={"Authorization": auth})
        # 2: a client configured for the wrong region (consistent signature, wrong scope).
        statuses["region-scope"] = send(port, signed(port, region="us-west-2"))
        # 3: signed as 'bedrock-runtime', then the scope edited to 'bedrock'.
        r = signed(port, service="bedrock-runtime")
        statuses["service-edited"] = send(port, r, replace={"Authorization": r.headers["Authorization"].replace("/bedrock-runtime/", "/bedrock/")})
        # 4: a signed header removed on the way.
        r = signed(port, extra_headers={"X-Amzn-Bedrock-Trace": "ENABLED"})
        statuses["missing-header"] = send(port, r, drop=["X-Amzn-Bedrock-Trace"])
        # 5: the client signed the path with ':' encoded once, S3-style, and sent it %3A-encoded.
        r = signed(port, path=WIRE_PATH.replace("%3A", ":"))
        statuses["single-encoding"] = send(port, r)
        # 6: a middleware re-serialised the JSON body after signing.
        r = signed(port)
        statuses["body"] = send(port, r, body=json.dumps(BODY).encode())
        # 7: a retry layer re-stamped X-Amz-Date without signing again.
        r = signed(port)
        later = (dt.datetime.strptime(r.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ") + dt.timedelta(seconds=42)).strftime("%Y%m%dT%H%M%SZ")
        statuses["date-restamped"] = send(port, r, replace={"X-Amz-Date": later})
        # 8: a client whose clock is an hour slow (the project's own signer, at a given time).
        body = json.dumps(BODY, separators=(",", ":")).encode()
        headers = [("host", f"127.0.0.1:{port}"), ("content-type", "application/json")]
        headers += sigv4.sign("POST", WIRE_PATH, "", headers, sigv4.payload_hash(body), "us-east-1", "bedrock",
                              sigv4.Credentials(DOCTOR_KEY, DOCTOR_SECRET), now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1))
        fake = AWSRequest(method="POST", url=f"http://127.0.0.1:{port}{WIRE_PATH}", data=body, headers=dict(headers))
        statuses["clock"] = send(port, fake)
    finally:
        stop()
        emu.stop()
    return flow_file, statuses


ORDER = ["match", "region-edited", "region-scope", "service-edited", "missing-header", "single-encoding", "body", "date-restamped", "clock"]


def run_doctor(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = doctor.main(list(args), out=out)
    return code, out.getvalue()


def test_every_recorded_request_reached_the_emulator_as_expected(recorded):
    flow_file, statuses = recorded
    assert statuses == {name: (200 if name == "match" else 403) for name in ORDER}
    code, out = run_doctor(str(flow_file), "--list")
    assert code == 0 and len(out.strip().splitlines()) == len(ORDER)
    assert "-> 200 [present]" in out.splitlines()[0]


def test_match_case_reproduces_the_signature(recorded):
    code, out = run_doctor(str(recorded[0]), "--index", "0", *CREDS)
    assert code == doctor.EXIT_OK, out
    assert "RESULT: signature reproduced" in out
    assert "canonical request:" in out and "/model/anthropic.claude-3-haiku-20240307-v1%253A0/converse" in out
    assert "string to sign:" in out and "AWS4-HMAC-SHA256\n" in out.replace("    ", "")
    assert DOCTOR_SECRET not in out


@pytest.mark.parametrize(
    "case, kind, words",
    [
        ("region-edited", "differs: region", "computed for region us-west-2, but the Credential scope says us-east-1"),
        ("service-edited", "differs: service", "computed for service 'bedrock-runtime'"),
        ("missing-header", "problem: signed-headers", "SignedHeaders lists x-amzn-bedrock-trace but the request does not carry it"),
        ("single-encoding", "differs: path-encoding", "encoded the path once"),
        ("body", "differs: body", "the same JSON serialised compactly"),
        ("date-restamped", "differs: date", "42 s later"),
    ],
)
def test_mismatch_names_the_input_that_differs(recorded, case, kind, words):
    code, out = run_doctor(str(recorded[0]), "--index", str(ORDER.index(case)), *CREDS)
    assert code == doctor.EXIT_MISMATCH, out
    assert "RESULT: signature MISMATCH" in out
    assert kind in out and words in out, out
    if kind.startswith("differs"):  # the two canonical requests (or strings to sign) are shown diffed
        assert "--- request" in out and "+++ signed" in out
    else:
        assert "most likely: the signed header(s) x-amzn-bedrock-trace missing from the request" in out
    # The emulator's InvalidSignatureException quoted the canonical request it computed: the same as ours.
    assert "the server's error quotes the same canonical request: the server received the request as captured" in out


def test_single_encoding_diff_shows_both_canonical_uris(recorded):
    _, out = run_doctor(str(recorded[0]), "--index", str(ORDER.index("single-encoding")), *CREDS)
    assert "-/model/anthropic.claude-3-haiku-20240307-v1%253A0/converse" in out
    assert "+/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse" in out


def test_consistent_signature_with_the_wrong_region_or_clock_is_still_a_mismatch(recorded):
    code, out = run_doctor(str(recorded[0]), "--index", str(ORDER.index("region-scope")), *CREDS)
    assert code == doctor.EXIT_MISMATCH and "RESULT: signature reproduced" in out
    assert "problem: region: the credential scope's region is us-west-2 but the request went to us-east-1" in out

    code, out = run_doctor(str(recorded[0]), "--index", str(ORDER.index("clock")), *CREDS)
    assert code == doctor.EXIT_MISMATCH and "RESULT: signature reproduced" in out
    assert "problem: clock:" in out and "before the time the proxy received the request" in out


def test_wrong_secret_finds_no_single_cause(recorded):
    code, out = run_doctor(str(recorded[0]), "--index", "0", "--access-key", DOCTOR_KEY, "--secret-key", "not-the-secret", "--region", "us-east-1")
    assert code == doctor.EXIT_MISMATCH
    assert "differs: unknown" in out and "the secret key is not the one that signed" in out
    code, out = run_doctor(str(recorded[0]), "--index", "0", "--access-key", "AKIDSOMEONEELSE", "--secret-key", "x")
    assert "problem: access-key: the request was signed with access key AKIDDOCTOREXAMPLE" in out


def test_flow_selection_by_url_and_bad_index(recorded, capsys):
    code, out = run_doctor(str(recorded[0]), "--url", r"converse$", *CREDS)
    assert code == doctor.EXIT_OK and "flow 0 of 9" in out
    code, _ = run_doctor(str(recorded[0]), "--index", "99", *CREDS)
    assert code == doctor.EXIT_USAGE and "out of range" in capsys.readouterr().err


def test_credentials_from_the_environment(recorded, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DOCTOR_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DOCTOR_SECRET)
    code, out = run_doctor(str(recorded[0]), "--index", "0", "--region", "us-east-1")
    assert code == doctor.EXIT_OK and "with environment" in out


def test_flow_saved_by_the_balancer_is_redacted_not_a_mismatch(emu, proxy_factory, client_via_proxy, tmp_path, capsys):
    """The balancer shows and saves the request it sent upstream with Signature=<redacted>."""
    flow_file = tmp_path / "balancer.mitm"
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])}, save_stream_file=str(flow_file))
    client = client_via_proxy(proxy)
    stream = client.converse_stream(modelId=MODEL, messages=BODY["messages"])
    list(stream["stream"])
    proxy.stop()  # flushes the flow file
    proxy.stop = lambda: None  # already stopped; the fixture would stop it again

    assert flow_file.stat().st_size > 0, (
        "the balancer's flow was not saved: mitmproxy cannot serialise flow.metadata values that are not "
        "plain data (addon.py keeps its Exchange object there), so -w / save_stream_file fail"
    )
    code, out = run_doctor(str(flow_file), "--access-key", CLIENT_KEY, "--secret-key", CLIENT_SECRET)
    assert code == doctor.EXIT_USAGE, out
    assert "RESULT: not checked: the request's signature is redacted" in out
    assert "problem: redacted:" in out and "bedrock-balancer" in out
    assert "MISMATCH" not in out


def suite_signed_request(case: Path) -> str:
    """The case's request with its Authorization (.authz), the suite's ground truth.

    (The suite's own .sreq of get-vanilla-with-session-token carries a wrong signature.)"""
    req = (case / f"{case.name}.req").read_text()
    authz = (case / f"{case.name}.authz").read_text().strip()
    head, sep, body = req.partition("\n\n")
    head = head.rstrip("\n")
    if "x-amz-security-token" in authz and "x-amz-security-token" not in head.lower():
        sreq = (case / f"{case.name}.sreq").read_text()
        head += "\n" + next(line for line in sreq.splitlines() if line.lower().startswith("x-amz-security-token:"))
    return head + "\nAuthorization: " + authz + "\n\n" + body


@pytest.mark.parametrize("case", sorted(p.parent for p in SUITE.rglob("*.req")), ids=lambda p: p.name)
def test_official_suite_requests_are_reproduced(case, tmp_path):
    request = tmp_path / "signed.http"
    request.write_text(suite_signed_request(case))
    code, out = run_doctor(str(request), *SUITE_KEYS)
    expected_creq = (case / f"{case.name}.creq").read_text()
    assert code == doctor.EXIT_OK, out
    # The suite's canonical request, the session token (a few cases sign one) shown as its length only.
    tokens = re.findall(r"^x-amz-security-token:(.*)$", expected_creq, re.M)
    for token in tokens:
        expected_creq = expected_creq.replace(f"x-amz-security-token:{token}", f"x-amz-security-token:<redacted, {len(token)} chars>")
        assert token not in out
    assert "\n".join("    " + line if line else "" for line in expected_creq.split("\n")) in out


def test_raw_request_with_trailing_newline_and_crlf(tmp_path):
    body = json.dumps(BODY, separators=(",", ":")).encode()
    headers = [("host", "bedrock-runtime.us-west-2.amazonaws.com"), ("content-type", "application/json")]
    headers += sigv4.sign("POST", WIRE_PATH, "", headers, sigv4.payload_hash(body), "us-west-2", "bedrock", sigv4.Credentials(DOCTOR_KEY, DOCTOR_SECRET))
    text = f"POST {WIRE_PATH} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + f"Content-Length: {len(body)}\r\n\r\n"
    raw = tmp_path / "req.http"
    raw.write_bytes(text.encode() + body + b"\n")  # an editor's trailing newline
    code, out = run_doctor(str(raw), "--access-key", DOCTOR_KEY, "--secret-key", DOCTOR_SECRET)
    assert code == doctor.EXIT_OK, out
    assert "Content-Length says" in out  # the trailing newline was noticed and ignored
    # The host names the region: sent to us-east-1's host, the scope is wrong.
    raw.write_bytes(text.replace("us-west-2.amazonaws", "us-east-1.amazonaws").encode() + body)
    code, out = run_doctor(str(raw), "--access-key", DOCTOR_KEY, "--secret-key", DOCTOR_SECRET)
    assert code == doctor.EXIT_MISMATCH and "differs: host" not in out


def test_usage_errors(tmp_path, capsys):
    raw = tmp_path / "bearer.http"
    raw.write_text("POST /model/x/converse HTTP/1.1\nHost: bedrock-runtime.us-east-1.amazonaws.com\nAuthorization: Bearer ABSKxyz\n\n{}")
    assert run_doctor(str(raw), "--secret-key", "s")[0] == doctor.EXIT_USAGE
    assert "bearer token" in capsys.readouterr().err
    assert run_doctor(str(tmp_path / "missing"), "--secret-key", "s")[0] == doctor.EXIT_USAGE
    raw.write_text("not http at all")
    assert run_doctor(str(raw), "--secret-key", "s")[0] == doctor.EXIT_USAGE


def test_console_script_runs_and_never_prints_secrets(tmp_path):
    case = tmp_path / "post-vanilla.http"
    case.write_text(suite_signed_request(SUITE / "post-vanilla"))
    result = subprocess.run(
        [sys.executable, "-m", "bedrock_balancer.doctor", str(case), *SUITE_KEYS, "--session-token", "TOKEN-SECRET"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "wJalrXUtnFEMI" not in result.stdout + result.stderr and "TOKEN-SECRET" not in result.stdout
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    if "bedrock-sigv4" in scripts:  # installed from this checkout's pyproject
        assert scripts["bedrock-sigv4"] == "bedrock_balancer.doctor:main"


def test_redacted_flow_with_the_clients_scope_recorded(tmp_path):
    """A balancer flow as the addon stores it: redacted proxy signature, the client's scope in metadata."""
    from mitmproxy import io as mio
    from mitmproxy.test import tflow

    from bedrock_balancer import contentview

    flow = tflow.tflow(resp=True)
    flow.request.path = WIRE_PATH
    flow.request.headers["x-amz-date"] = "20250102T030405Z"
    flow.request.headers["authorization"] = (
        "AWS4-HMAC-SHA256 Credential=AKIDPROXYEXAMPLE/20250102/us-west-2/bedrock/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=<redacted>"
    )
    flow.metadata[contentview.CLIENT_SIGV4_KEY] = contentview.sigv4_summary(
        "AWS4-HMAC-SHA256 Credential=AKIDCLIENTEXAMPLE/20250102/us-east-1/bedrock/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, Signature=" + "0" * 64, "20250102T030400Z",
    )
    path = tmp_path / "one.mitm"
    with path.open("wb") as f:
        mio.FlowWriter(f).add(flow)
    code, out = run_doctor(str(path), "--secret-key", "proxy-secret")
    assert code == doctor.EXIT_USAGE and "problem: redacted:" in out and "MISMATCH" not in out
    assert "the client had signed with AKIDCLIENTEXAMPLE for 20250102/us-east-1/bedrock" in out
    assert "0" * 64 not in out


SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN999"


def token_signed_request(region: str = "us-east-1", host_region: str = "us-east-1") -> tuple[list[tuple[str, str]], bytes]:
    """Headers and body of a request signed with temporary credentials (so it carries X-Amz-Security-Token)."""
    body = json.dumps(BODY, separators=(",", ":")).encode()
    headers = [("host", f"bedrock-runtime.{host_region}.amazonaws.com"), ("content-type", "application/json")]
    headers += sigv4.sign("POST", WIRE_PATH, "", headers, sigv4.payload_hash(body), region, "bedrock",
                          sigv4.Credentials(DOCTOR_KEY, DOCTOR_SECRET, SESSION_TOKEN))
    return headers, body


@pytest.mark.parametrize("given", [False, True], ids=["token-not-given", "token-given"])
def test_session_token_is_never_printed_in_the_canonical_request(tmp_path, given):
    """README: the doctor never prints a session token, though the canonical request signs it."""
    headers, body = token_signed_request()
    raw = tmp_path / "req.http"
    raw.write_bytes((f"POST {WIRE_PATH} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
                     + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    token = ["--session-token", SESSION_TOKEN] if given else []
    code, out = run_doctor(str(raw), "--access-key", DOCTOR_KEY, "--secret-key", DOCTOR_SECRET, *token)
    # The signature is still computed over the real token...
    assert code == doctor.EXIT_OK and "RESULT: signature reproduced" in out, out
    # ...but the canonical request shows only that it is there, and how long it is.
    assert SESSION_TOKEN not in out, out
    assert f"    x-amz-security-token:<redacted, {len(SESSION_TOKEN)} chars>\n" in out


def test_session_token_is_never_printed_in_diffs(tmp_path):
    """A mismatch shows canonical requests diffed: what the client signed, and the one the server quoted."""
    from mitmproxy import io as mio
    from mitmproxy.test import tflow

    # X-Amz-Date re-stamped after signing (the doctor diffs the canonical request the client signed,
    # the token line next to the date), and the server received the token cut short (its error quotes it).
    headers, body = token_signed_request()
    restamped = (dt.datetime.strptime(dict(headers)["x-amz-date"], "%Y%m%dT%H%M%SZ") + dt.timedelta(seconds=42)).strftime("%Y%m%dT%H%M%SZ")
    headers = [(n, restamped) if n == "x-amz-date" else (n, v) for n, v in headers]
    ours = doctor.diagnose(doctor.Request("POST", WIRE_PATH, "", headers, body, "test"), None).canonical_request
    server = ours.replace(SESSION_TOKEN, SESSION_TOKEN[:-4])
    message = ("The request signature we calculated does not match the signature you provided.\n\n"
               f"The Canonical String for this request should have been\n'{server}'\n\nThe String-to-Sign should have been\n'x'\n")
    flow = tflow.tflow(resp=True)
    flow.request.method, flow.request.path, flow.request.content = "POST", WIRE_PATH, body
    flow.request.headers.clear()
    for name, value in headers:
        flow.request.headers.add(name, value)
    flow.request.timestamp_start = dt.datetime.now(dt.timezone.utc).timestamp()  # no clock problem in the way
    flow.response.status_code = 403
    flow.response.text = json.dumps({"message": message})
    path = tmp_path / "one.mitm"
    with path.open("wb") as f:
        mio.FlowWriter(f).add(flow)

    code, out = run_doctor(str(path), *CREDS)
    assert code == doctor.EXIT_MISMATCH and "differs: date" in out and "42 s later" in out, out
    flat = out.replace("    ", "").replace("  ", "")
    assert f" x-amz-security-token:<redacted, {len(SESSION_TOKEN)} chars>" in flat  # context of the date diff
    assert f"-x-amz-security-token:<redacted, {len(SESSION_TOKEN)} chars>" in flat  # the server got a shorter token
    assert f"+x-amz-security-token:<redacted, {len(SESSION_TOKEN) - 4} chars>" in flat
    assert SESSION_TOKEN[:-4] not in out, out
