"""The relay: an in-process loopback HTTP server that owns every upstream exchange.

Why a relay. mitmproxy streams a response to the client only when the response comes from the flow's
upstream server; a body an addon produces is always sent whole. Choosing, signing and sending in the
addon would therefore lose either streaming or the ability to answer for the upstream (Bedrock-format
errors for connection failures, and, later, retrying another region while still streaming). So the
addon points each Bedrock flow at this relay, and the relay does the upstream work with its own
pooled HTTP client:

    client --TLS--> mitmproxy (classify) --loopback HTTP--> relay (choose, rewrite, sign, send) --TLS--> Bedrock
                                           <-- streamed ---                      <-- streamed --

mitmproxy streams the relay's answer to the client chunk by chunk, so event-stream frames reach the
client as the upstream produces them. Upstream connections are pooled across all clients.

Security: the relay only serves exchanges the addon registered, each under a random single-use token;
anything else gets a 403 and nothing goes upstream.

This module imports aiohttp but not mitmproxy.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from . import sigv4, usage
from .classify import BedrockRequest
from .config import Config, Target
from .credentials import CredentialsUnavailable, CredentialStore
from .errors import BedrockError
from .routing import Choice, Router

log = logging.getLogger(__name__)

EXCHANGE_HEADER = "x-bedrock-balancer-exchange"
REGION_HEADER = "x-bedrock-balancer-region"
TARGET_HEADER = "x-bedrock-balancer-target"
ATTEMPTS_HEADER = "x-bedrock-balancer-attempts"
SIGNING_SERVICE = "bedrock"
EVENT_STREAM = "application/vnd.amazon.eventstream"

# Request headers that never travel upstream: the client's own authentication (the proxy signs
# afresh), hop-by-hop headers, and those the HTTP client sets itself.
DROPPED_REQUEST_HEADERS = frozenset(
    {
        "authorization",
        "x-amz-date",
        "x-amz-security-token",
        "x-amz-content-sha256",
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        EXCHANGE_HEADER,
    }
)
DROPPED_RESPONSE_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te", "trailer", "upgrade"}
)


@dataclass
class Attempt:
    target: str
    region: str
    status: int | None = None
    ms: float = 0.0
    error: str | None = None

    def as_log(self) -> dict:
        entry = {"target": self.target, "region": self.region, "status": self.status, "ms": round(self.ms, 1)}
        if self.error:
            entry["error"] = self.error
        return entry

    def as_header(self) -> str:
        return f"target={self.target};region={self.region};status={self.status or 0};ms={self.ms:.0f}"


@dataclass
class Exchange:
    """One client request on its way upstream, and what became of it."""

    request: BedrockRequest
    method: str
    raw_path: str  # without the query, exactly as the client sent it
    raw_query: str
    headers: list[tuple[str, str]]  # forwardable client headers
    body: bytes
    started: float = field(default_factory=time.monotonic)
    attempts: list[Attempt] = field(default_factory=list)
    choice: Choice | None = None
    sent_headers: list[tuple[str, str]] = field(default_factory=list)
    status: int | None = None
    error: str | None = None  # set when the proxy, not the upstream, produced the answer
    usage: usage.Usage = field(default_factory=usage.Usage)
    stream_outcome: str | None = None  # "complete", "exception:<type>" or "truncated" for event streams

    @property
    def target(self) -> Target | None:
        return self.choice.target if self.choice else None


def forwardable_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(n, v) for n, v in headers if n.lower() not in DROPPED_REQUEST_HEADERS]


def upstream_path(exchange: Exchange, choice: Choice) -> str:
    """The client's raw path, byte for byte, with only the model id segment replaced if it was rewritten."""
    request = exchange.request
    if request.raw_model_id is None or choice.raw_model_id == request.raw_model_id:
        return exchange.raw_path
    prefix = "/model/" + request.raw_model_id + "/"
    return "/model/" + choice.raw_model_id + "/" + exchange.raw_path[len(prefix):]


def signed_headers_for(exchange: Exchange, choice: Choice, path: str, credentials: sigv4.Credentials) -> list[tuple[str, str]]:
    target = choice.target
    headers = [("host", target.host_header)] + exchange.headers
    headers += sigv4.sign(
        exchange.method, path, exchange.raw_query, headers, sigv4.payload_hash(exchange.body),
        target.region, SIGNING_SERVICE, credentials,
    )
    return headers


def redacted(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers fit to show or store: no signature, no session token."""
    shown = []
    for name, value in headers:
        lower = name.lower()
        if lower == "authorization":
            value = value.rsplit("Signature=", 1)[0] + "Signature=<redacted>" if "Signature=" in value else "<redacted>"
        elif lower == "x-amz-security-token":
            value = "<redacted>"
        shown.append((name, value))
    return shown


class Relay:
    def __init__(self, config: Config, router: Router, credentials: CredentialStore, ssl_context: ssl.SSLContext):
        self.config = config
        self.router = router
        self.credentials = credentials
        self.ssl_context = ssl_context
        self._exchanges: dict[str, Exchange] = {}
        self._runner: web.ServerRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str = "127.0.0.1") -> None:
        connector = aiohttp.TCPConnector(ssl=self.ssl_context, limit=0, keepalive_timeout=30, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bytes pass through exactly as Bedrock sent them
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, connect=self.config.timeouts.connect_s, sock_read=self.config.timeouts.read_s),
        )
        server = web.Server(self._handle, access_log=None)
        self._runner = web.ServerRunner(server, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0, reuse_address=True)
        await site.start()
        self.address = site._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def register(self, exchange: Exchange) -> str:
        token = secrets.token_urlsafe(18)
        self._exchanges[token] = exchange
        return token

    def discard(self, token: str | None) -> None:
        if token:
            self._exchanges.pop(token, None)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        exchange = self._exchanges.pop(request.headers.get(EXCHANGE_HEADER, ""), None)
        if exchange is None:
            return _error_response(BedrockError("AccessDeniedException", "bedrock-balancer: not a request the proxy accepted"))
        await request.read()  # the addon already holds the body; drain what mitmproxy sent
        try:
            exchange.choice = self.router.choose(exchange.request)
        except BedrockError as e:
            return self._proxy_error(exchange, e)
        return await self._attempt(exchange, exchange.choice, request)

    async def _attempt(self, exchange: Exchange, choice: Choice, request: web.BaseRequest) -> web.StreamResponse:
        target = choice.target
        attempt = Attempt(target.name, target.region)
        exchange.attempts.append(attempt)
        started = time.monotonic()
        self.router.started(target)
        try:
            credentials = await self.credentials.get(target)
            path = upstream_path(exchange, choice)
            exchange.sent_headers = signed_headers_for(exchange, choice, path, credentials)
            url = URL.build(scheme=target.scheme, host=target.host, port=target.port, path=path, query_string=exchange.raw_query, encoded=True)
            async with self._session.request(
                exchange.method, url, headers=CIMultiDict(exchange.sent_headers), data=exchange.body or None, allow_redirects=False
            ) as upstream:
                attempt.status = exchange.status = upstream.status
                attempt.ms = (time.monotonic() - started) * 1000
                if upstream.headers.get("Content-Type", "").startswith(EVENT_STREAM) and upstream.status == 200:
                    return await self._stream(exchange, upstream, request)
                body = await upstream.read()
                exchange.usage = usage.from_response(upstream.headers.get, body)
                return web.Response(status=upstream.status, headers=self._response_headers(exchange, upstream), body=body)
        except CredentialsUnavailable as e:
            attempt.error = "credentials"
            return self._proxy_error(exchange, BedrockError("AccessDeniedException", f"bedrock-balancer: {e}"), attempt, started)
        except asyncio.TimeoutError:
            attempt.error = "timeout"
            message = f"bedrock-balancer: {target} did not answer in time"
            return self._proxy_error(exchange, BedrockError("ModelTimeoutException", message), attempt, started)
        except aiohttp.ClientError as e:
            attempt.error = type(e).__name__
            message = f"bedrock-balancer: could not reach {target} at {target.endpoint_url}: {e}"
            return self._proxy_error(exchange, BedrockError("ServiceUnavailableException", message), attempt, started)
        finally:
            self.router.finished(target)

    async def _stream(self, exchange: Exchange, upstream: aiohttp.ClientResponse, request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, headers=self._response_headers(exchange, upstream))
        await response.prepare(request)
        meter = usage.StreamMeter()
        try:
            async for chunk in upstream.content.iter_any():
                meter.feed(chunk)
                await response.write(chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            # The client has already received part of the stream: end it as an error, never cleanly.
            exchange.stream_outcome = "truncated"
            exchange.error = f"upstream stream broke: {type(e).__name__}"
            exchange.usage = meter.usage
            request.transport.close()
            return response
        exchange.usage = meter.usage
        if meter.incomplete or meter.corrupt:
            exchange.stream_outcome = "truncated"
            request.transport.close()
            return response
        exchange.stream_outcome = f"exception:{meter.exception}" if meter.exception else "complete"
        await response.write_eof()
        return response

    def _response_headers(self, exchange: Exchange, upstream: aiohttp.ClientResponse) -> list[tuple[str, str]]:
        headers = [(n, v) for n, v in upstream.headers.items() if n.lower() not in DROPPED_RESPONSE_HEADERS]
        return headers + self._balancer_headers(exchange)

    def _balancer_headers(self, exchange: Exchange) -> list[tuple[str, str]]:
        headers = [(ATTEMPTS_HEADER, ", ".join(a.as_header() for a in exchange.attempts))]
        if exchange.target is not None:
            headers += [(REGION_HEADER, exchange.target.region), (TARGET_HEADER, exchange.target.name)]
        return headers

    def _proxy_error(self, exchange: Exchange, error: BedrockError, attempt: Attempt | None = None, started: float = 0.0) -> web.Response:
        if attempt is not None:
            attempt.ms = (time.monotonic() - started) * 1000
        exchange.status = error.status
        exchange.error = str(error)
        status, headers, body = error.wire()
        return web.Response(status=status, headers=list(headers.items()) + self._balancer_headers(exchange), body=body)


def _error_response(error: BedrockError) -> web.Response:
    status, headers, body = error.wire()
    return web.Response(status=status, headers=headers, body=body)
