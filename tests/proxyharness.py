"""Run the real proxy (mitmproxy's DumpMaster with the balancer addon) for end-to-end tests.

The proxy runs on its own asyncio loop in a thread, as mitmdump would run it; tests talk to it with
real clients (boto3, the AWS CLI, curl) over loopback. Start-up is synchronised on mitmproxy's own
``running`` hook, not on sleeps.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PROXY_KEY = "AKIDPROXYEXAMPLE"
PROXY_SECRET = "proxy-secret-key-example"
CLIENT_KEY = "AKIDCLIENTEXAMPLE"
CLIENT_SECRET = "client-secret-never-forwarded"


class _Ready:
    """Added after the balancer: its running hook fires once the listeners and the relay are up."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def running(self) -> None:
        self.event.set()


@dataclass
class RunningProxy:
    master: object
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    confdir: Path
    access_log: Path
    addresses: list = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_cert(self) -> str:
        return str(self.confdir / "mitmproxy-ca-cert.pem")

    @property
    def balancer(self):
        return self.master.addons.get("bedrock_balancer")

    def access_records(self) -> list[dict]:
        # The proxy writes a request's record in a callback once the answer is on its way; a callback queued
        # now runs after it (the event loop runs callbacks in order), and then the writer thread is flushed.
        recorded = threading.Event()
        self.loop.call_soon_threadsafe(recorded.set)
        recorded.wait(10)
        self.balancer.access_log.flush()
        return [json.loads(line) for line in self.access_log.read_text().splitlines()]

    def wait_for_records(self, count: int, timeout: float = 10.0) -> list[dict]:
        """The access records once there are ``count``: a streamed flow is logged when mitmproxy has
        finished it, which can be just after the client saw its last byte. Polls a condition with a
        deadline; never sleeps for a fixed time."""
        deadline = time.monotonic() + timeout
        records = self.access_records()
        while len(records) < count and time.monotonic() < deadline:
            records = self.access_records()
        return records

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.master.shutdown)
        self.thread.join(timeout=10)


def wait_for(condition, timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds, naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def start_proxy(tmp_path: Path, config: dict, emulator, mode: str = "regular", extra_options: dict | None = None) -> RunningProxy:
    from mitmproxy.options import Options
    from mitmproxy.tools.dump import DumpMaster

    from bedrock_balancer.addon import BedrockBalancer
    from bedrock_balancer.cli import run_before_save

    confdir = tmp_path / "proxy-confdir"
    confdir.mkdir(parents=True, exist_ok=True)
    config_path = write_config(tmp_path / "balancer.yaml", config)
    access_log = tmp_path / "access.jsonl"
    ready = _Ready()
    holder: dict = {}

    async def main() -> None:
        master = DumpMaster(Options(), with_termlog=False, with_dumper=False)
        master.addons.add(BedrockBalancer())
        run_before_save(master.addons, 1)  # as the console script places it: before save (-w), after request editors
        master.addons.add(ready)
        master.options.update(**{
            "listen_host": "127.0.0.1", "listen_port": 0, "mode": [mode], "confdir": str(confdir),
            "connection_strategy": "lazy", "ssl_verify_upstream_trusted_ca": emulator.ca_path,
            "bedrock_config": str(config_path), "bedrock_access_log": str(access_log), **(extra_options or {}),
        })  # extra_options may override any of these (e.g. listen_host)
        holder["master"], holder["loop"] = master, asyncio.get_running_loop()
        await master.run()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True, name="proxy")
    thread.start()
    if not ready.event.wait(timeout=20):
        raise RuntimeError("proxy did not start")
    master = holder["master"]
    proxy = RunningProxy(master, holder["loop"], thread, confdir, access_log)
    proxy.addresses = master.addons.get("proxyserver").listen_addrs()
    return proxy


def targets_for(emulator, regions, **per_target) -> list[dict]:
    return [
        {"region": r, "endpoint_url": emulator.endpoint_url(r), "profile": "proxy", **per_target.get(r, {})}
        for r in regions
    ]


# -- security tests: a decoy that records what reaches it, raw requests through the proxy ----------


VIRTUAL_KEY = "AKIDVIRTUALTEAMA"
VIRTUAL_SECRET = "virtual-secret-of-team-a-0123456789"
OTHER_VIRTUAL_KEY = "AKIDVIRTUALTEAMB"
OTHER_VIRTUAL_SECRET = "virtual-secret-of-team-b-9876543210"
API_KEY = "ABSKdGVhbS1jLWFwaS1rZXktZm9yLXRlc3Rz"


def run_in_proxy(proxy: RunningProxy, function):
    """Call ``function()`` on the proxy's event loop (mitmproxy's state is not thread-safe) and return its result."""
    async def call():
        return function()

    return asyncio.run_coroutine_threadsafe(call(), proxy.loop).result(timeout=10)


class Decoy:
    """A server that must never see a request signed with the proxy's credentials.

    It accepts plain HTTP or TLS (a certificate for localhost; proxies under test run with
    ``ssl_insecure`` so that a name mismatch could not hide a forwarded request), records every
    connection's bytes (decrypted), and answers each request ``200 {"decoy": true}``.
    """

    def __init__(self, cert_dir: Path, host: str = "127.0.0.1") -> None:
        import socket
        import ssl

        from bedrock_balancer.emulator.tlsutil import ensure_certificates, server_ssl_context

        self._tls = server_ssl_context(ensure_certificates(cert_dir))
        self._tls.check_hostname = False
        self._ssl = ssl
        self._lock = threading.Lock()
        self.received: list[bytes] = []
        self._server = socket.create_server((host, 0))
        self.host, self.port = self._server.getsockname()[:2]
        self._thread = threading.Thread(target=self._serve, daemon=True, name="decoy")
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def saw(self, text: str) -> bool:
        with self._lock:
            return any(text.encode() in data for data in self.received)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self.received)

    def close(self) -> None:
        self._server.close()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(connection,), daemon=True).start()

    def _handle(self, connection) -> None:
        import socket

        data = bytearray()
        with self._lock:
            self.received.append(b"")
            index = len(self.received) - 1
        try:
            connection.settimeout(5)
            first = connection.recv(1, socket.MSG_PEEK)
            if first == b"\x16":  # a TLS ClientHello
                connection = self._tls.wrap_socket(connection, server_side=True)
            while True:
                head_end = data.find(b"\r\n\r\n")
                if head_end >= 0:
                    length = 0
                    for line in bytes(data[:head_end]).split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length" and value.strip().isdigit():
                            length = int(value.strip())
                    if len(data) >= head_end + 4 + length:
                        break
                chunk = connection.recv(65536)
                if not chunk:
                    break
                data += chunk
                with self._lock:
                    self.received[index] = bytes(data)
            body = b'{"decoy": true}'
            connection.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
        except (OSError, self._ssl.SSLError):
            pass
        finally:
            with self._lock:
                self.received[index] = bytes(data)
            connection.close()


class RouteToDecoy:
    """A hostile network for the proxy: every connection mitmproxy opens (any name, any port) lands on the
    decoy, as if every name resolved to it. Only the relay's loopback address is left alone."""

    def __init__(self, decoy: Decoy, relay_address) -> None:
        self.decoy = decoy
        self.relay_address = tuple(relay_address)

    def server_connect(self, data) -> None:
        if data.server.error or tuple(data.server.address[:2]) == self.relay_address:
            return
        data.server.address = self.decoy.address


@dataclass
class RawResponse:
    status: int
    headers: dict
    body: bytes

    @property
    def error_type(self) -> str | None:
        return self.headers.get("x-amzn-errortype")

    def json(self):
        return json.loads(self.body)


def read_response(sock, connect: bool = False) -> RawResponse:
    """One HTTP/1.1 response from a socket: Content-Length, chunked or close-delimited (a CONNECT's 200 has no body)."""
    data = bytearray()
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    body = bytearray(body)
    chunked = headers.get("transfer-encoding", "").lower() == "chunked"

    def complete() -> bool:
        if connect and status == 200:
            return True
        if length is not None:
            return len(body) >= int(length)
        return chunked and body.endswith(b"0\r\n\r\n")

    while not complete():
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return RawResponse(status, headers, bytes(body))


def raw_request(proxy_address, request: bytes, connect: str | None = None, tls_host: str | None = None,
                source: str | None = None, ca_cert: str | None = None, timeout: float = 10):
    """Send raw bytes through the proxy and return (CONNECT response or None, response or None).

    With ``connect``, first ``CONNECT connect``; then, with ``tls_host``, speak TLS (trusting ``ca_cert``,
    the proxy's CA) inside the tunnel. ``source`` binds the client socket (to connect from a
    non-loopback address).
    """
    import socket
    import ssl

    sock = socket.create_connection(proxy_address, timeout=timeout, source_address=(source, 0) if source else None)
    try:
        connect_response = None
        if connect is not None:
            sock.sendall(f"CONNECT {connect} HTTP/1.1\r\nHost: {connect}\r\n\r\n".encode())
            connect_response = read_response(sock, connect=True)
            if connect_response.status != 200:
                return connect_response, None
            if tls_host is not None:
                context = ssl.create_default_context(cafile=ca_cert)
                sock = context.wrap_socket(sock, server_hostname=tls_host)
        sock.sendall(request)
        try:
            return connect_response, read_response(sock)
        except (IndexError, ValueError):
            return connect_response, None
    finally:
        sock.close()


def signed_request(method: str, host_header: str, raw_path: str, body: bytes = b"", *, key: str, secret: str,
                   region: str = "us-east-1", service: str = "bedrock", target: str | None = None,
                   extra_headers: list[tuple[str, str]] = (), now=None) -> bytes:
    """A raw HTTP/1.1 request signed with SigV4 as botocore signs it (``target``: the request-target, e.g. an
    absolute URL; by default the path)."""
    from bedrock_balancer import sigv4

    path, _, query = raw_path.partition("?")
    headers = [("host", host_header), ("content-type", "application/json"), *extra_headers]
    headers += sigv4.sign(method, path, query, headers, sigv4.payload_hash(body), region, service,
                          sigv4.Credentials(key, secret), now=now)
    lines = [f"{method} {target or raw_path} HTTP/1.1"] + [f"{n}: {v}" for n, v in headers]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def local_non_loopback_address() -> str:
    """An address of this machine that is not loopback: connecting from it makes a 'remote' client."""
    import ipaddress
    import socket

    candidates = []
    try:
        candidates += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.123", 9))  # no packet is sent: this only picks a route
            candidates.append(probe.getsockname()[0])
        except OSError:
            pass
    for address in candidates:
        if not ipaddress.ip_address(address).is_loopback and address != "0.0.0.0":
            return address
    raise AssertionError("these tests need a non-loopback IPv4 address on this machine (any interface)")
