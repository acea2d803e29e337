"""The relay: an in-process loopback HTTP server that owns every upstream exchange.

Why a relay. mitmproxy streams a response to the client only when the response comes from the flow's
upstream server; a body an addon produces is always sent whole. Choosing, signing and sending in the
addon would therefore lose either streaming or the ability to answer for the upstream (Bedrock-format
errors for connection failures, and, later, retrying another region while still streaming). So the
addon hands each Bedrock exchange to the relay, and the relay does the upstream work with its own pooled
HTTP clients (:mod:`.upstream` for answers read whole, aiohttp for event streams). Non-streaming
exchanges are run from the addon's ``request`` hook; a streamed one comes in through the relay's
loopback server:

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
import asyncio.sslproto
import logging
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict
from yarl import URL

from . import eventstream, sigv4, usage
from .classify import BedrockRequest
from .config import Config, Target
from .credentials import CredentialsUnavailable, CredentialStore
from .errors import BedrockError, error_message_of, error_type_of, status_of_stream_exception
from .health import parse_retry_after
from .routing import Choice, NotYet, Router
from .state import Lease, MemoryState
from .upstream import UpstreamError, UpstreamPool, WholeAnswer

log = logging.getLogger(__name__)

EXCHANGE_HEADER = "x-bedrock-balancer-exchange"
UPSTREAM_TLS_READ_BUFFER = 32 * 1024
LISTEN_BACKLOG = 4096
# Marks the relay's provisional head on the loopback (see Relay._handle); never reaches a client.
PROVISIONAL_HEADER = "x-bedrock-balancer-provisional"
REGION_HEADER = "x-bedrock-balancer-region"
TARGET_HEADER = "x-bedrock-balancer-target"
ATTEMPTS_HEADER = "x-bedrock-balancer-attempts"
SIGNING_SERVICE = "bedrock"
EVENT_STREAM = "application/vnd.amazon.eventstream"
# The Server header aiohttp adds to every loopback answer that has none (Bedrock sends none): the
# proxy's machinery, not part of the answer, so the addon takes it off again.
LOOPBACK_SERVER = SERVER_SOFTWARE

# Request headers that never travel upstream: the client's own authentication (the proxy signs
# afresh), hop-by-hop headers, and those the HTTP client sets itself.
DROPPED_REQUEST_HEADERS = sigv4.HOP_BY_HOP_HEADERS | {
    "authorization",
    "x-amz-date",
    "x-amz-security-token",
    "x-amz-content-sha256",
    "host",
    "content-length",
    "expect",
    EXCHANGE_HEADER,
}
# Answers worth trying elsewhere: throttled (ThrottlingException, ModelNotReadyException), and server
# failures, including those of gateways in between. Client errors (400, 404, 424) are final; a 403 is not
# (see PROXY_CREDENTIAL_ERRORS).
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# A 403 from a target is about the proxy's own account there (the proxy signed the request), never the
# client's: another target may serve it. These error types mean the proxy's credentials for the whole
# target are bad; any other 403 (AccessDeniedException: no access to the model there) is the model's.
PROXY_CREDENTIAL_ERRORS = frozenset(
    {"UnrecognizedClientException", "InvalidSignatureException", "IncompleteSignatureException", "ExpiredTokenException",
     "MissingAuthenticationTokenException", "InvalidClientTokenId", "SignatureDoesNotMatch"}
)
# Exception frames that, arriving before any content, mean "this region could not start the answer".
RETRYABLE_STREAM_EXCEPTIONS = frozenset(
    {"throttlingException", "serviceUnavailableException", "internalServerException", "modelStreamErrorException", "modelNotReadyException"}
)
DROPPED_RESPONSE_HEADERS = sigv4.HOP_BY_HOP_HEADERS | {"content-length"}
# What writing to the loopback raises once mitmproxy has hung up (the client is gone); aiohttp raises
# RuntimeError on a closed transport.
LOOPBACK_GONE = (ConnectionResetError, RuntimeError)


@dataclass
class Attempt:
    target: str
    region: str
    status: int | None = None
    ms: float = 0.0
    error: str | None = None
    started: float = field(default_factory=time.monotonic, repr=False)  # monotonic

    def abandon(self) -> None:
        """The client left before this attempt had an outcome (an answer, or a stream's first event): it is
        dropped, and blames no target."""
        if self.error is None and not self.ms:  # every outcome sets ms
            self.error, self.ms = "abandoned", _ms_since(self.started)

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
    # Never in a repr (which may reach a log): the request's headers, body and the signature sent.
    headers: list[tuple[str, str]] = field(repr=False)  # forwardable client headers
    body: bytes = field(repr=False)
    started: float = field(default_factory=time.monotonic)
    attempts: list[Attempt] = field(default_factory=list)
    choice: Choice | None = None
    sent_headers: list[tuple[str, str]] = field(default_factory=list, repr=False)
    status: int | None = None
    error: str | None = None  # set when the proxy, not the upstream, produced the answer
    usage: usage.Usage = field(default_factory=usage.Usage)
    answered: bool = False  # an upstream answered it: its usage, as far as known, is what budgets keep; else none
    stream_outcome: str | None = None  # "complete", "exception:<type>", "truncated" or "client-gone" for event streams
    first_event_ms: float | None = None  # streams: from the request to the first content event
    waited_s: float = 0.0  # time spent waiting for a target to recover or for room in its budgets
    # True only while the relay waits for an upstream answer or for a cooldown: the waits the addon's client
    # watch may cancel. Never during a state update (a Redis script cancelled half-way would leave a
    # reservation or a probe behind).
    cancellable: bool = False
    # Streams: the status and headers the client gets, once the relay has decided them (see Relay._handle).
    head: tuple[int, list[tuple[str, str]]] | None = field(default=None, repr=False)
    _head_decided: asyncio.Future | None = field(default=None, repr=False)
    # Targets where the proxy's account has no access to this request (they answered 403 AccessDenied): not
    # tried again for it, whatever the strategy would choose.
    excluded: set[str] = field(default_factory=set)
    tokens: int = 0  # what the request reserves in quota budgets
    affinity_key: str | None = None
    # Whether the client has gone away: then no further attempt is made for it. (Streams learn it from
    # the loopback connection too; see Relay.start.)
    client_gone: Callable[[], bool] = field(default=lambda: False, repr=False)

    @property
    def target(self) -> Target | None:
        return self.choice.target if self.choice else None

    def decide_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        """The stream's final status and headers: what the client gets in place of the provisional head."""
        self.head = (status, headers)
        if self._head_decided is not None and not self._head_decided.done():
            self._head_decided.set_result(None)

    async def wait_for_head(self) -> tuple[int, list[tuple[str, str]]]:
        if self.head is None:
            self._head_decided = asyncio.get_running_loop().create_future()
            await self._head_decided
        return self.head


@dataclass
class Answer:
    """A whole (non-streamed) answer for the client: from upstream, or made by the proxy."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Failure:
    """An attempt that did not produce an answer worth giving the client; another target may."""

    reason: str
    status: int | None = None
    headers: list[tuple[str, str]] | None = None
    body: bytes = b""
    lasting: bool = False  # a configuration problem (credentials, access), not a passing one: waiting will not help
    refused: bool = False  # the target refused the proxy's own signature (a 403 in PROXY_CREDENTIAL_ERRORS)
    stream_exception: str | None = None  # a stream that brought this exception event before any content


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


def note_client_left(exchange: Exchange) -> None:
    """The exchange's error once its client has gone: the relay stopped for nobody, and when."""
    exchange.error = f"the client went away after {len(exchange.attempts)} attempts; no more were made"


class Relay:
    def __init__(self, config: Config, router: Router, credentials: CredentialStore, ssl_context: ssl.SSLContext, state=None):
        self.config = config
        self.router = router
        self.state = state or MemoryState(router)  # where cooldowns and budgets live (see .state)
        self.credentials = credentials
        self.ssl_context = ssl_context
        self._exchanges: dict[str, Exchange] = {}
        self._runner: web.ServerRunner | None = None
        self._session: aiohttp.ClientSession | None = None  # event streams
        self._whole = UpstreamPool(ssl_context, config.timeouts.connect_s, config.timeouts.read_s)  # whole answers
        self.address: tuple[str, int] | None = None

    async def start(self, host: str = "127.0.0.1") -> None:
        # asyncio gives every TLS connection a 256 KiB read buffer (SSLProtocol.max_size); with one
        # upstream connection per open stream that is most of the proxy's memory. A TLS record is at most
        # 16 KiB, so 32 KiB loses nothing. (mitmproxy's own TLS does not use asyncio's, only our client.)
        asyncio.sslproto.SSLProtocol.max_size = UPSTREAM_TLS_READ_BUFFER
        connector = aiohttp.TCPConnector(ssl=self.ssl_context, limit=0, keepalive_timeout=30, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bytes pass through exactly as Bedrock sent them
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, connect=self.config.timeouts.connect_s, sock_read=self.config.timeouts.read_s),
        )
        # mitmproxy closes its loopback connection when the client goes away: the handler is cancelled
        # then, so that no more upstream attempts are made (and paid for) for nobody, no region is blamed
        # for the lost connection, and the upstream stream is closed.
        server = web.Server(self._handle, access_log=None, handler_cancellation=True)
        self._runner = web.ServerRunner(server, access_log=None)
        await self._runner.setup()
        # mitmproxy opens one connection here per concurrent stream: a burst of them must not overflow
        # the listen queue (the default, 128, drops connections when hundreds of streams start at once).
        site = web.TCPSite(self._runner, host, 0, reuse_address=True, backlog=LISTEN_BACKLOG)
        await site.start()
        self.address = site._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        self._whole.close()

    def register(self, exchange: Exchange) -> str:
        token = secrets.token_urlsafe(18)
        self._exchanges[token] = exchange
        return token

    def discard(self, token: str | None) -> None:
        if token:
            self._exchanges.pop(token, None)

    # -- one client request: attempts until one answers ----------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The loopback server's handler: streaming exchanges that mitmproxy forwards here.

        The loopback answer starts with a provisional head, sent at once: mitmproxy parses it and runs its
        addons' ``responseheaders`` while the upstream works, rather than when the first content event is
        already waiting. The addon holds that head back from the client until the relay has decided the
        real status and headers (``Exchange.decide_head``), which for an event stream is once its first
        content event has arrived, so that failing over stays possible until then. The body follows: the
        event stream, or a whole answer (an error, say)."""
        exchange = self._exchanges.pop(request.headers.get(EXCHANGE_HEADER, ""), None)
        if exchange is None:
            return _web_response(_error_answer(BedrockError("AccessDeniedException", "bedrock-balancer: not a request the proxy accepted")))
        # The addon already holds the body: drain what mitmproxy sent, whatever its size (BaseRequest.read()
        # would refuse more than aiohttp's 1 MiB, which a request with an image or a document exceeds).
        while await request.content.readany():
            pass
        loopback = web.StreamResponse(headers={PROVISIONAL_HEADER: "1"})
        try:
            await _prepare(loopback, request)
            outcome = await self.run(exchange, loopback)
        except _ClientGone:
            return loopback
        except Exception:
            log.exception("bedrock-balancer: internal error in the relay")
            outcome = await self._internal_error(exchange, loopback)
        if isinstance(outcome, Answer):
            exchange.decide_head(outcome.status, outcome.headers + [("content-length", str(len(outcome.body)))])
            await _write_last(loopback, outcome.body)
        return loopback

    async def _internal_error(self, exchange: Exchange, loopback: web.StreamResponse) -> Answer | web.StreamResponse:
        """Never leave the addon waiting for a head that will not come: the client gets an error instead, as
        an answer of its own, or, once the stream's head is decided, as its last event."""
        message = "bedrock-balancer: internal error (see the proxy's log)"
        if exchange.head is None:
            return self._proxy_error(exchange, BedrockError("InternalServerException", message))
        exchange.stream_outcome = "truncated"
        await _write_last(loopback, eventstream.exception_frame("internalServerException", message))
        return loopback

    async def run(self, exchange: Exchange, loopback: web.StreamResponse | None = None) -> Answer | web.StreamResponse:
        """Attempts until one answers, or the retry budget is spent.

        Non-streaming requests are answered whole (the addon hands the Answer to mitmproxy itself, so
        they skip the loopback hop); an event stream is piped to the ``loopback`` answer as it arrives.
        """
        retry = self.config.retry
        deadline = exchange.started + retry.deadline_s
        failure: Failure | None = None  # what the client gets if no target answers: the last answer, if any
        last: Failure | None = None
        for _ in range(retry.max_attempts):
            try:
                # After a lasting failure another target may serve the request now; waiting for that one helps no one.
                chosen = await self._choose(exchange, deadline, wait=not (last and last.lasting))
            except BedrockError as e:
                return self._proxy_error(exchange, e)
            if chosen is None:  # waited for a target until the deadline, or the client left meanwhile
                break
            last = outcome = await self._attempt(exchange, *chosen, loopback)
            if not isinstance(outcome, Failure):
                return outcome
            if failure is None or outcome.status is not None or failure.status is None:
                failure = outcome  # a later stall or connection failure is no answer: it does not replace one
            if exchange.client_gone():  # nobody is waiting for another region's answer (nor paying for it)
                break
        answer = self._give_up(exchange, failure)
        if exchange.client_gone():
            note_client_left(exchange)
        return answer

    async def _choose(self, exchange: Exchange, deadline: float, wait: bool = True) -> tuple[Choice, Lease] | None:
        """A target for the next attempt, reserved in its budgets, waiting for one to recover if all are cooling down."""
        while True:
            try:
                exchange.choice, lease = await self.state.acquire(exchange.request, exchange.tokens, exchange.affinity_key, exchange.excluded)
                return exchange.choice, lease
            except NotYet as not_yet:
                now = time.monotonic()
                if not wait or not_yet.retry_at >= deadline:
                    exchange.error = not_yet.reason
                    if wait and not exchange.attempts:
                        exchange.error += f", and none will be before the request's deadline (retry.deadline_s: {self.config.retry.deadline_s:g} s)"
                    return None
                pause = max(0.0, not_yet.retry_at - now)
                exchange.waited_s += pause
                exchange.cancellable = True
                try:
                    await asyncio.sleep(pause)
                finally:
                    exchange.cancellable = False
                if exchange.client_gone():
                    return None

    def _give_up(self, exchange: Exchange, failure: Failure | None) -> Answer:
        if failure is not None and failure.status == 403 and not failure.refused:
            # AWS's message names the proxy's account and role: it goes to the proxy's log, not to the client.
            log.warning("bedrock-balancer: %s: %s", failure.reason, error_message_of(failure.body))
            message = f"bedrock-balancer: {failure.reason}: the proxy's account there has no access to this request (see the proxy's log)"
            return self._proxy_error(exchange, BedrockError("AccessDeniedException", message))
        if failure is not None and failure.status is not None and not failure.refused:  # the last upstream answer, as it was
            exchange.status = failure.status
            exchange.error = f"gave up after {len(exchange.attempts)} attempts: {failure.reason}"
            if failure.stream_exception:  # its events up to the exception, which the SDK raises as AWS's own
                exchange.stream_outcome = f"exception:{failure.stream_exception}"
            headers = [(n, v) for n, v in failure.headers or [] if n.lower() not in DROPPED_RESPONSE_HEADERS]
            return Answer(failure.status, headers + self._balancer_headers(exchange), failure.body)
        if failure is not None:
            message = f"bedrock-balancer: no target answered after {len(exchange.attempts)} attempts (last: {failure.reason})"
            return self._proxy_error(exchange, BedrockError("ServiceUnavailableException", message))
        waited = f"waited {exchange.waited_s:.1f} s: " if exchange.waited_s and not exchange.attempts else ""
        message = f"bedrock-balancer: {waited}{exchange.error or 'no target available'}"
        return self._proxy_error(exchange, BedrockError("ThrottlingException", message))

    # -- one attempt ---------------------------------------------------------------------------

    async def _attempt(
        self, exchange: Exchange, choice: Choice, lease: Lease, loopback: web.StreamResponse | None
    ) -> Answer | web.StreamResponse | Failure:
        target = choice.target
        attempt = Attempt(target.name, target.region)
        exchange.attempts.append(attempt)
        started = attempt.started
        self.router.started(target)
        upstream: aiohttp.ClientResponse | None = None
        verdict = False  # whether the cooldowns learnt anything from this attempt
        try:
            credentials = await self.credentials.get(target)
            path = upstream_path(exchange, choice)
            exchange.sent_headers = signed_headers_for(exchange, choice, path, credentials)
            async with asyncio.timeout(self.config.retry.stall_timeout_s if loopback is not None else None):
                exchange.cancellable = True
                try:
                    upstream = await self._send(exchange, target, path, streaming=loopback is not None)
                finally:
                    exchange.cancellable = False
                attempt.status = upstream.status
                if upstream.status in RETRYABLE_STATUSES or upstream.status == 403:
                    body = await upstream.read()
                    verdict = True
                    return await self._failed(exchange, lease, attempt, started, upstream, body)
                is_stream = (
                    loopback is not None
                    and upstream.status == 200
                    and upstream.headers.get("Content-Type", "").startswith(EVENT_STREAM)
                )
                if is_stream:
                    head, meter = await self._read_until_content(upstream)
            if is_stream:
                verdict = True
                if not meter.content_seen and (meter.exception is None or meter.exception in RETRYABLE_STREAM_EXCEPTIONS):
                    # Its head said 200, but it brought no answer: it counts as what it amounted to, the status of
                    # its exception outside a stream (429 for throttlingException), or none (an early end).
                    attempt.status = status_of_stream_exception(meter.exception)
                    reason = meter.exception or ("sent a corrupt frame" if meter.corrupt else "ended the stream before its first event")
                    failure = await self._unreachable(lease, attempt, started, f"stream {reason}", whole_target=False)
                    if meter.exception is not None:  # an answer after all, if no other target gives a better one
                        failure.status, failure.headers = upstream.status, list(upstream.headers.items())
                        failure.body, failure.stream_exception = bytes(head[: len(head) - meter.pending_bytes]), meter.exception
                    return failure
                await self._succeeded(exchange, lease, attempt, started)
                exchange.first_event_ms = _ms_since(exchange.started)
                exchange.answered = True
                return await self._stream(exchange, lease, upstream, loopback, head, meter)
            body = await upstream.read()
            verdict = True
            await self._succeeded(exchange, lease, attempt, started)
            exchange.usage = usage.from_response(upstream.headers.get, body)
            exchange.answered = True
            return Answer(upstream.status, self._response_headers(exchange, upstream), body)
        except CredentialsUnavailable:
            # The proxy's log has the details (profile, role, botocore's error); the client needs none of them.
            verdict = True
            await self._unreachable(lease, attempt, started, "credentials")
            return Failure(f"{target}: the proxy has no usable AWS credentials for it (see the proxy's log)", lasting=True)
        except asyncio.CancelledError:
            # The client left (the addon's client watch, or mitmproxy hanging up the loopback), or the proxy
            # is stopping: the attempt is dropped, its connection closed; no verdict on the target.
            attempt.abandon()
            raise
        except TimeoutError:
            verdict = True
            if exchange.request.streaming:
                attempt.status = None  # even if its head came: no answer
                return await self._unreachable(lease, attempt, started, "stalled before its first event", whole_target=False)
            return await self._unreachable(lease, attempt, started, "timed out")
        except (aiohttp.ClientError, UpstreamError) as e:
            verdict = True
            return await self._unreachable(lease, attempt, started, f"{type(e).__name__}: {e}".rstrip(": "))
        finally:
            self.router.finished(target)
            if not verdict:
                await self.state.release_probe(lease)
            # Settling twice is a no-op: a failed attempt's cooldown may already have released its reservation.
            # One that never got an answer used no tokens (the request still counts).
            await self.state.settle(lease, exchange.usage.total(unknown=exchange.tokens) if exchange.answered else 0)
            if upstream is not None:
                upstream.release()

    async def _send(self, exchange: Exchange, target: Target, path: str, streaming: bool) -> aiohttp.ClientResponse | WholeAnswer:
        """Send the signed request: a whole answer through the lean pool, an event stream through aiohttp."""
        if not streaming:
            target_path = f"{path}?{exchange.raw_query}" if exchange.raw_query else path
            return await self._whole.request(
                target.scheme, target.host, target.port, exchange.method, target_path, exchange.sent_headers, exchange.body
            )
        url = URL.build(scheme=target.scheme, host=target.host, port=target.port, path=path, query_string=exchange.raw_query, encoded=True)
        return await self._session.request(
            exchange.method, url, headers=CIMultiDict(exchange.sent_headers), data=exchange.body or None, allow_redirects=False
        )

    async def _failed(self, exchange, lease: Lease, attempt, started, upstream, body) -> Failure:
        choice = lease.choice
        error_type = error_type_of(upstream.headers.get, body) or str(upstream.status)
        attempt.error, attempt.ms = error_type, _ms_since(started)
        refused = upstream.status == 403 and error_type in PROXY_CREDENTIAL_ERRORS
        if upstream.status == 403 and not refused:
            # No access to the model in the proxy's account there: another target may have it. Not a cooldown:
            # with no target that has access, every request would then get a 429 that hides the cause.
            exchange.excluded.add(choice.target.name)
            await self.state.release_probe(lease)
        else:
            await self.state.failed(lease, f"{upstream.status} {error_type}", whole_target=refused, retry_after_s=parse_retry_after(upstream.headers.get))
        what = "refused the proxy's credentials:" if refused else "answered"
        return Failure(
            f"{choice.target} {what} {upstream.status} {error_type}", upstream.status, list(upstream.headers.items()), body,
            lasting=upstream.status == 403, refused=refused,
        )

    async def _unreachable(self, lease: Lease, attempt: Attempt, started: float, reason: str, whole_target: bool = True) -> Failure:
        """No usable answer: connection failure or timeout (the whole target), or a stream that never started (the model)."""
        choice = lease.choice
        attempt.error, attempt.ms = reason, _ms_since(started)
        await self.state.failed(lease, reason, whole_target=whole_target)
        return Failure(f"{choice.target} {reason}")

    async def _succeeded(self, exchange: Exchange, lease: Lease, attempt: Attempt, started: float) -> None:
        choice = lease.choice
        attempt.ms = _ms_since(started)
        exchange.status = attempt.status
        await self.state.succeeded(lease)
        self.router.observe_latency(choice.target, attempt.ms)
        if attempt.status == 200:
            self.router.remember(exchange.affinity_key, choice.target)

    async def _read_until_content(self, upstream: aiohttp.ClientResponse) -> tuple[bytearray, "usage.StreamMeter"]:
        """Read the stream until its first content frame (or exception), so failover stays possible until then."""
        meter = usage.StreamMeter()
        head = bytearray()
        while not meter.content_seen and meter.exception is None and not meter.corrupt:
            chunk = await upstream.content.readany()
            if not chunk:
                break
            head += chunk
            meter.feed(chunk)
        return head, meter

    async def _stream(
        self, exchange: Exchange, lease: Lease, upstream: aiohttp.ClientResponse, response: web.StreamResponse, head: bytearray,
        meter: "usage.StreamMeter",
    ) -> web.StreamResponse:
        """Pipe the event stream to the client frame by frame; a broken upstream ends it with an error frame."""
        pending = head  # bytes not yet written: only whole frames go out, so an error frame can follow cleanly
        try:
            # The loopback body is chunked; the client's is framed as the head says.
            exchange.decide_head(upstream.status, self._response_headers(exchange, upstream) + [("transfer-encoding", "chunked")])
            pending = await _write_whole_frames(response, pending, meter)
            while True:
                chunk = await upstream.content.readany()
                if not chunk:
                    break
                pending += chunk
                meter.feed(chunk)
                if meter.corrupt:
                    break
                pending = await _write_whole_frames(response, pending, meter)
        except _ClientGone:
            exchange.stream_outcome = "client-gone"
            exchange.usage = meter.usage
            return response
        except (aiohttp.ClientError, TimeoutError) as e:
            return await self._end_broken_stream(exchange, lease, response, meter, f"{type(e).__name__}")
        exchange.usage = meter.usage
        if pending or meter.corrupt:
            return await self._end_broken_stream(exchange, lease, response, meter, "the upstream ended in the middle of an event")
        exchange.stream_outcome = f"exception:{meter.exception}" if meter.exception else "complete"
        await response.write_eof()
        return response

    async def _end_broken_stream(self, exchange: Exchange, lease: Lease, response: web.StreamResponse, meter, why: str) -> web.StreamResponse:
        exchange.stream_outcome = "truncated"
        exchange.usage = meter.usage
        target = exchange.target
        exchange.error = f"upstream stream from {target} broke after {meter.frames} events: {why}"
        exchange.attempts[-1].error = "stream broke off"
        # Too late to fail over this answer, but the target is cooled down for the model, as one whose stream
        # breaks before its first event is, so that the next requests go elsewhere meanwhile. What the
        # answer used so far stays in the budgets.
        await self.state.settle(lease, meter.usage.total(unknown=exchange.tokens))
        await self.state.failed(lease, f"stream broke off after {meter.frames} events ({why})")
        message = f"bedrock-balancer: the answer from {target} broke off after {meter.frames} events ({why}); it is incomplete"
        await _write_last(response, eventstream.exception_frame("serviceUnavailableException", message))
        return response

    # -- answers -------------------------------------------------------------------------------

    def _response_headers(self, exchange: Exchange, upstream: aiohttp.ClientResponse) -> list[tuple[str, str]]:
        headers = [(n, v) for n, v in upstream.headers.items() if n.lower() not in DROPPED_RESPONSE_HEADERS]
        return headers + self._balancer_headers(exchange)

    def _balancer_headers(self, exchange: Exchange) -> list[tuple[str, str]]:
        headers = [(ATTEMPTS_HEADER, ", ".join(a.as_header() for a in exchange.attempts))]
        if exchange.target is not None and exchange.status is not None and exchange.status < 400:
            headers += [(REGION_HEADER, exchange.target.region), (TARGET_HEADER, exchange.target.name)]
        elif exchange.attempts:
            last = exchange.attempts[-1]
            headers += [(REGION_HEADER, last.region), (TARGET_HEADER, last.target)]
        return headers

    def _proxy_error(self, exchange: Exchange, error: BedrockError) -> Answer:
        exchange.status = error.status
        exchange.error = str(error)
        answer = _error_answer(error)
        answer.headers += self._balancer_headers(exchange)
        return answer


class _ClientGone(Exception):
    """The client (through mitmproxy) stopped reading the answer."""


async def _prepare(response: web.StreamResponse, request: web.BaseRequest) -> None:
    try:
        await response.prepare(request)
    except LOOPBACK_GONE as e:
        raise _ClientGone() from e


async def _write_whole_frames(response: web.StreamResponse, pending: bytearray, meter) -> bytearray:
    complete = len(pending) - meter.pending_bytes
    if complete > 0:
        try:
            await response.write(bytes(pending[:complete]))
        except LOOPBACK_GONE as e:
            raise _ClientGone() from e
        del pending[:complete]
    return pending


async def _write_last(response: web.StreamResponse, data: bytes) -> None:
    """The end of a loopback answer; nobody to tell if mitmproxy has hung up meanwhile (the client left)."""
    try:
        await response.write(data)
        await response.write_eof()
    except LOOPBACK_GONE:
        pass


def _ms_since(started: float) -> float:
    return (time.monotonic() - started) * 1000


def _error_answer(error: BedrockError) -> Answer:
    status, headers, body = error.wire()
    return Answer(status, list(headers.items()), body)


def _web_response(answer: Answer) -> web.Response:
    return web.Response(status=answer.status, headers=answer.headers, body=answer.body)
