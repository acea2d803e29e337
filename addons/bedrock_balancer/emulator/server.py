"""The Bedrock Runtime emulator: one HTTP(S) listener per region, judged like AWS.

Design
------
* One asyncio event loop in a daemon thread serves every region; each region has its own port, as
  each real region has its own host. :class:`Emulator`'s public methods are called from the test's
  thread: state they touch is guarded by one lock that is never held across an ``await``, and
  wake-ups cross into the loop with ``call_soon_threadsafe``.
* Every request goes through the same pipeline, in AWS's order: route (to know which service signs
  it), authenticate (SigV4 via :mod:`.sigv4check`, or a Bedrock API key), then the operation:
  model id rules, body, injected fault (:meth:`Emulator.set_mode`), quota, answer.
* Faults are applied after authentication and validation, as in AWS, where a throttled request was
  first accepted as well-formed; a ``count`` is consumed only by requests a fault applies to
  (stream faults apply only to streaming operations).
* Each request is recorded once, as soon as its fate is known (before a stream's body is sent), so
  a test can look at :attr:`Emulator.requests` while a stream is held.
* An unauthenticated control API under ``/_emulator/`` on every port lets another process
  (benchmarks, the README demo) drive the same switches.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime as dt
import functools
import json
import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from ..eventstream import decode_frames, encode_frame, exception_frame
from . import responses as wire
from . import sts
from .httpserver import HttpRequest, HttpServer, ResponseChannel
from .models import (
    INVALID_MODEL_MESSAGE,
    display_model_name,
    estimate_input_tokens,
    model_id_error,
    reserved_tokens,
)
from .quota import Charge, SlidingWindowQuota
from .sigv4check import AuthFailure, CredentialRecord, VerifiedRequest, verify_sigv4
from .tlsutil import ensure_certificates, server_ssl_context

DEMO_ACCESS_KEY_ID = "AKIDEMULATOR"
DEMO_SECRET_ACCESS_KEY = "emulator-secret-access-key"

MODES = frozenset(
    {
        "ok",
        "throttle",
        "not_ready",
        "fail",
        "error500",
        "access_denied",
        "drop",
        "stall",
        "stream_first_exception",
        "stream_stall",
        "stream_cut",
    }
)
STREAM_ONLY_MODES = frozenset({"stream_first_exception", "stream_stall", "stream_cut"})
# Modes answered with an ordinary error: mode -> (error type, message).
ERROR_MODES = {
    "throttle": ("ThrottlingException", wire.TOO_MANY_REQUESTS),
    "not_ready": ("ModelNotReadyException", wire.MODEL_NOT_READY),
    "fail": ("ServiceUnavailableException", wire.SERVICE_UNAVAILABLE),
    "error500": ("InternalServerException", wire.INTERNAL_ERROR),
    "access_denied": ("AccessDeniedException", wire.NO_MODEL_ACCESS),
}

MODEL_OPERATIONS = {
    "invoke": "InvokeModel",
    "invoke-with-response-stream": "InvokeModelWithResponseStream",
    "converse": "Converse",
    "converse-stream": "ConverseStream",
    "count-tokens": "CountTokens",
    "invoke-with-bidirectional-stream": "InvokeModelWithBidirectionalStream",
}
STREAMING_OPERATIONS = frozenset({"InvokeModelWithResponseStream", "ConverseStream"})

_MODEL_PATH = re.compile(rb"^/model/([^/]+)/([a-z-]+)$")
_GUARDRAIL_PATH = re.compile(rb"^/guardrail/([^/]+)/version/([^/]+)/apply$")
_ASYNC_INVOKE_PATH = re.compile(rb"^/async-invoke(?:/([^/]+))?$")

STREAM_EVENT_DELAY_S = 0.005
MALFORMED_INPUT_MESSAGE = "Malformed input request, please reformat your input and try again."
# Long-term Bedrock API keys start with ABSK, short-term ones with bedrock-api-key-.
BEARER_TOKEN_PREFIXES = ("ABSK", "bedrock-api-key-")
BEARER_FORMAT_MESSAGE = "Invalid API Key format: Must start with pre-defined prefix"
BEARER_INVALID_MESSAGE = "Authentication failed: Please make sure your API Key is valid."

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer in Bedrock's error format."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message


@dataclass
class RecordedRequest:
    """One request as the emulator received and judged it.

    ``raw_path`` is the request target exactly as on the wire (percent-encoding and query
    included). ``status`` 0 means no HTTP answer was given (``drop``; ``stall`` until released).
    ``error_type`` is the AWS error type, or the stream exception type (``throttlingException``),
    or ``stream_cut`` / ``stream_stall`` / ``drop`` / ``stall`` for faults that have no AWS name.
    """

    region: str
    method: str
    raw_path: str
    operation: str | None
    model_id: str | None
    headers: list[tuple[str, str]]
    body: bytes
    access_key_id: str | None = None
    auth_ok: bool = False
    status: int = 0
    error_type: str | None = None
    ts: float = field(default_factory=time.time)
    request_id: str = ""
    auth_method: str | None = None  # "sigv4", "bearer" or None

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)

    def json(self) -> Any:
        return json.loads(self.body)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        del data["headers"], data["body"]
        data["body_size"] = len(self.body)
        return data


@dataclass
class _ModeRule:
    mode: str
    remaining: int | None


@dataclass
class _AsyncInvocation:
    invocation_arn: str
    model_arn: str
    client_request_token: str | None
    output_data_config: Any
    submit_time: dt.datetime

    @classmethod
    def start(
        cls, region: str, model_id: str, client_request_token: str | None, output_data_config: Any
    ) -> "_AsyncInvocation":
        if model_id.startswith("arn:"):
            model_arn = model_id
        else:
            model_arn = f"arn:aws:bedrock:{region}::foundation-model/{model_id}"
        invocation_id = uuid.uuid4().hex[:12]
        return cls(
            invocation_arn=f"arn:aws:bedrock:{region}:{wire.ACCOUNT_ID}:async-invoke/{invocation_id}",
            model_arn=model_arn,
            client_request_token=client_request_token,
            output_data_config=output_data_config,
            submit_time=dt.datetime.now(dt.timezone.utc),
        )

    def describe(self) -> dict[str, Any]:
        submitted = wire.iso_timestamp(self.submit_time)
        described = {
            "invocationArn": self.invocation_arn,
            "modelArn": self.model_arn,
            "status": "Completed",
            "submitTime": submitted,
            "lastModifiedTime": submitted,
            "endTime": submitted,
            "outputDataConfig": self.output_data_config,
        }
        if self.client_request_token:
            described["clientRequestToken"] = self.client_request_token
        return described


class HoldHandle:
    """Holds streaming answers after their first text event until :meth:`release` (any thread).

    Only streams that *start* while the handle is active are held. ``with emu.hold_streams():``
    releases on exit.
    """

    def __init__(self, emulator: "Emulator", region: str | None) -> None:
        self.region = region
        self._emulator = emulator
        self._released = asyncio.Event()  # bound to the emulator's loop on first use
        self._released_flag = False
        self._held = 0
        self._condition = threading.Condition()

    @property
    def released(self) -> bool:
        return self._released_flag

    @property
    def held_count(self) -> int:
        """Streams currently waiting on this handle."""
        with self._condition:
            return self._held

    def applies_to(self, region: str) -> bool:
        return not self._released_flag and self.region in (None, region)

    def release(self) -> None:
        if self._released_flag:
            return
        self._released_flag = True
        self._emulator._discard_hold(self)
        self._emulator._call_in_loop(self._released.set)

    def wait_until_held(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Block until ``count`` streams are waiting on this handle (False on timeout)."""
        with self._condition:
            return self._condition.wait_for(lambda: self._held >= count, timeout)

    async def _hold(self) -> None:
        with self._condition:
            self._held += 1
            self._condition.notify_all()
        try:
            await self._released.wait()
        finally:
            with self._condition:
                self._held -= 1

    def __enter__(self) -> "HoldHandle":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@dataclass
class _Call:
    """Per-request context handed through the pipeline."""

    region: str
    request: HttpRequest
    channel: ResponseChannel
    record: RecordedRequest
    started: float = field(default_factory=time.monotonic)
    published: bool = False

    @property
    def request_id(self) -> str:
        return self.record.request_id

    def elapsed_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    def json_answer(self, body: Any, headers: list[tuple[str, str]] = ()) -> wire.HttpAnswer:
        return wire.json_answer(200, body, self.request_id, self.region, headers)

    def error_answer(self, error_type: str, message: str, status: int | None = None) -> wire.HttpAnswer:
        return wire.error_answer(error_type, message, self.request_id, self.region, status)

    def xml_answer(self, status: int, xml: str) -> wire.HttpAnswer:
        return sts.xml_answer(status, xml, self.request_id, self.region)

    def stream_headers(self, operation: str) -> list[tuple[str, str]]:
        return wire.base_headers(self.request_id, self.region) + wire.stream_headers(operation)


class Emulator:
    """Amazon Bedrock Runtime (and a little STS) for the given regions, one port each.

    Use as a context manager or call :meth:`start` / :meth:`stop`. All public methods are safe to
    call from any thread while it runs.
    """

    def __init__(
        self,
        regions: list[str] | tuple[str, ...] = ("us-east-1", "us-west-2", "eu-west-1"),
        tls: bool = True,
        credentials: dict[str, str] | None = None,
        bearer_tokens: dict[str, str | None] | None = None,
        host: str = "127.0.0.1",
        cert_dir: str | None = None,
        clock_skew_s: float = 300,
        fast: bool = False,
        stamp_events: bool = False,
        port: int = 0,
        record_limit: int | None = None,
    ) -> None:
        """``credentials`` None accepts the demo key pair (:data:`DEMO_ACCESS_KEY_ID`).

        ``port`` 0 binds free ports; otherwise region *i* listens on ``port + i``.
        ``record_limit`` keeps only the newest records (long benchmarks); None keeps all.
        """
        if not regions:
            raise ValueError("at least one region is needed")
        if len(set(regions)) != len(regions):
            raise ValueError("regions must be distinct")
        self.regions = list(regions)
        self.tls = tls
        self.host = host
        self.clock_skew_s = clock_skew_s
        self.fast = fast
        # Benchmarks: each event's padding field "p" carries the monotonic time (ns) it was sent, so a
        # client on the same machine can measure how long each event took to reach it.
        self.stamp_events = stamp_events
        self.event_delay_s = 0.0 if fast else STREAM_EVENT_DELAY_S
        self._base_port = port
        if credentials is None:
            credentials = {DEMO_ACCESS_KEY_ID: DEMO_SECRET_ACCESS_KEY}
        self._credentials = {akid: CredentialRecord(akid, secret) for akid, secret in credentials.items()}
        self._bearer_tokens = dict(bearer_tokens or {})
        self._cert_dir = cert_dir
        self.ca_path: str | None = None
        self.ports: dict[str, int] = {}

        self._lock = threading.Lock()
        self._requests: deque[RecordedRequest] = deque(maxlen=record_limit)
        # Records ever made since the last clear(): indexes stay absolute when old ones drop out.
        self._recorded_total = 0
        self._requests_changed = threading.Condition(self._lock)
        self._modes: dict[str, dict[str | None, _ModeRule]] = {region: {} for region in self.regions}
        self._quotas: dict[str, SlidingWindowQuota | None] = {region: None for region in self.regions}
        self._holds: list[HoldHandle] = []
        self._async_invocations: dict[str, dict[str, _AsyncInvocation]] = {r: {} for r in self.regions}

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[HttpServer] = []
        self._stall_release: asyncio.Event | None = None

    # ----------------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> "Emulator":
        if self._thread is not None:
            raise RuntimeError("emulator already started")
        ssl_context = None
        if self.tls:
            if self._cert_dir is None:
                self._cert_dir = tempfile.mkdtemp(prefix="bedrock-emulator-")
                atexit.register(shutil.rmtree, self._cert_dir, True)
            paths = ensure_certificates(self._cert_dir)
            self.ca_path = str(paths.ca_cert)
            ssl_context = server_ssl_context(paths)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bedrock-emulator", daemon=True)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(ssl_context), self._loop)
        try:
            future.result(timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    async def _listen(self, ssl_context: Any) -> None:
        self._stall_release = asyncio.Event()
        for index, region in enumerate(self.regions):
            server = HttpServer(functools.partial(self._handle, region), ssl_context)
            self._servers.append(server)
            wanted = self._base_port + index if self._base_port else 0
            self.ports[region] = await server.listen(self.host, wanted)
            if self.host == "127.0.0.1":
                # endpoint_url says "localhost", which some systems resolve to ::1 first.
                with contextlib.suppress(OSError):
                    await server.listen("::1", self.ports[region])

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(self._close_servers(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
        self._loop = None
        self._thread = None

    async def _close_servers(self) -> None:
        for server in self._servers:
            await server.close()
        self._servers.clear()

    def __enter__(self) -> "Emulator":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _call_in_loop(self, callback: Any) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(callback)

    # ----------------------------------------------------------------------------------------------
    # Test-facing API

    def endpoint_url(self, region: str) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://localhost:{self.ports[region]}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the recorded requests, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._recorded_total = 0

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Block until ``count`` requests were recorded since the last clear (False on timeout)."""
        with self._requests_changed:
            return self._requests_changed.wait_for(lambda: self._recorded_total >= count, timeout)

    def requests_since(self, index: int) -> tuple[int, list[RecordedRequest]]:
        """(total recorded, records whose absolute index is >= ``index`` and still kept)."""
        with self._lock:
            first_kept = self._recorded_total - len(self._requests)
            kept = list(self._requests)
            return self._recorded_total, kept[max(0, index - first_kept) :]

    def add_credentials(self, access_key_id: str, secret_access_key: str) -> None:
        with self._lock:
            self._credentials[access_key_id] = CredentialRecord(access_key_id, secret_access_key)

    def add_bearer_token(self, token: str, region: str | None = None) -> None:
        with self._lock:
            self._bearer_tokens[token] = region

    def set_mode(self, region: str, mode: str, model: str | None = None, count: int | None = None) -> None:
        """Inject a fault for ``region`` (optionally one model id, optionally the next ``count`` calls).

        ``set_mode(region, "ok")`` clears every rule of the region.
        """
        self._check_region(region)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {sorted(MODES)}")
        if count is not None and count < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            rules = self._modes[region]
            if mode == "ok" and model is None and count is None:
                rules.clear()
            else:
                rules[model] = _ModeRule(mode, count)

    def set_quota(
        self, region: str, rpm: int | None = None, tpm: int | None = None, window_s: float = 60.0
    ) -> None:
        """Sliding-window quotas; both None removes the quota. Resets the window."""
        self._check_region(region)
        quota = None if rpm is None and tpm is None else SlidingWindowQuota(rpm, tpm, window_s)
        with self._lock:
            self._quotas[region] = quota

    def hold_streams(self, region: str | None = None) -> HoldHandle:
        if region is not None:
            self._check_region(region)
        handle = HoldHandle(self, region)
        with self._lock:
            self._holds.append(handle)
        return handle

    def release_all(self) -> None:
        """Release every held stream and every stalled request."""
        with self._lock:
            holds = list(self._holds)
        for handle in holds:
            handle.release()
        self._call_in_loop(self._release_stalled)

    def reset(self) -> None:
        """Back to a fresh emulator: no records, faults, quotas, holds or stalls."""
        self.release_all()
        self.clear()
        with self._lock:
            for region in self.regions:
                self._modes[region].clear()
                self._quotas[region] = None
                self._async_invocations[region].clear()

    def _release_by_id(self, hold_id: int | None) -> None:
        """Release one hold made through the control API, or everything when no id is given."""
        if hold_id is None:
            self.release_all()
            return
        with self._lock:
            handle = next((h for h in self._holds if id(h) == hold_id), None)
        if handle is None:
            raise ValueError(f"no active hold {hold_id}")
        handle.release()

    def _check_region(self, region: str) -> None:
        if region not in self._modes:
            raise ValueError(f"unknown region {region!r}; this emulator serves {self.regions}")

    def _discard_hold(self, handle: HoldHandle) -> None:
        with self._lock:
            if handle in self._holds:
                self._holds.remove(handle)

    def _release_stalled(self) -> None:
        if self._stall_release is not None:
            self._stall_release.set()
        self._stall_release = asyncio.Event()

    # ----------------------------------------------------------------------------------------------
    # Shared state, as seen from the loop

    def _lookup_credentials(self, access_key_id: str) -> CredentialRecord | None:
        with self._lock:
            return self._credentials.get(access_key_id)

    def _take_mode(self, region: str, model_id: str, operation: str) -> str | None:
        """The fault that applies to this call, consuming one of its ``count`` if limited."""
        with self._lock:
            rules = self._modes[region]
            key = model_id if model_id in rules else None
            rule = rules.get(key)
            if rule is None or rule.mode == "ok":
                return None
            if rule.mode in STREAM_ONLY_MODES and operation not in STREAMING_OPERATIONS:
                return None
            if rule.remaining is not None:
                rule.remaining -= 1
                if rule.remaining <= 0:
                    del rules[key]
            return rule.mode

    def _active_holds(self, region: str) -> list[HoldHandle]:
        with self._lock:
            return [handle for handle in self._holds if handle.applies_to(region)]

    def _admit(self, region: str, reservation: int) -> tuple[SlidingWindowQuota, Charge] | None:
        with self._lock:
            quota = self._quotas[region]
            if quota is None:
                return None
            outcome = quota.admit(time.monotonic(), reservation)
        if outcome == "requests":
            raise ApiError("ThrottlingException", wire.TOO_MANY_REQUESTS)
        if outcome == "tokens":
            raise ApiError("ThrottlingException", wire.TOO_MANY_TOKENS)
        return quota, outcome

    def _settle(self, admission: tuple[SlidingWindowQuota, Charge] | None, used_tokens: int) -> None:
        if admission is not None:
            quota, charge = admission
            with self._lock:
                quota.settle(charge, used_tokens)

    def _record(self, record: RecordedRequest) -> None:
        with self._requests_changed:
            self._requests.append(record)
            self._recorded_total += 1
            self._requests_changed.notify_all()

    # ----------------------------------------------------------------------------------------------
    # The request pipeline

    async def _handle(self, region: str, request: HttpRequest, channel: ResponseChannel) -> None:
        if request.path.startswith(b"/_emulator/"):
            await self._control(region, request, channel)
            return
        service, operation, model_id = _identify(request)
        record = RecordedRequest(
            region=region,
            method=request.method,
            raw_path=request.target.decode("latin-1"),
            operation=operation,
            model_id=model_id,
            headers=request.headers,
            body=request.body,
            request_id=wire.new_request_id(),
        )
        call = _Call(region, request, channel, record)
        if service == "sts":
            await self._handle_sts(call)
            return
        try:
            self._authenticate(call, service="bedrock", scope_region=region)
            if operation is None:
                raise ApiError("UnknownOperationException", "Unknown operation")
            await self._run_operation(call, operation, model_id)
        except AuthFailure as failure:
            answer = call.error_answer(failure.error_type, failure.message, failure.status)
            await self._answer(call, answer, failure.error_type)
        except ApiError as error:
            await self._answer(call, call.error_answer(error.error_type, error.message), error.error_type)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            # A bug here must not look like a network fault to the code under test.
            log.exception("emulator failed on %s %r", request.method, request.target)
            if not channel.started:
                answer = call.error_answer("InternalServerException", wire.INTERNAL_ERROR)
                await self._answer(call, answer, "InternalServerException")

    def _publish(self, call: _Call) -> None:
        """Add the call's record to :attr:`requests` (once; later changes show through)."""
        if not call.published:
            call.published = True
            self._record(call.record)

    async def _answer(self, call: _Call, answer: wire.HttpAnswer, error_type: str | None = None) -> None:
        call.record.status = answer.status
        call.record.error_type = error_type
        self._publish(call)
        await call.channel.respond(answer.status, answer.headers, answer.body)

    def _authenticate(self, call: _Call, service: str, scope_region: str | None) -> VerifiedRequest | None:
        """Judge the caller (SigV4, or a Bedrock API key for Bedrock); None for a bearer token."""
        request, record = call.request, call.record
        authorization = request.header("authorization")
        if authorization is None or not authorization.strip():
            raise AuthFailure("MissingAuthenticationTokenException", "Missing Authentication Token")
        if authorization.strip().lower().startswith("bearer ") and service == "bedrock":
            record.auth_method = "bearer"
            self._check_bearer(authorization.strip()[7:].strip(), call.region)
            record.auth_ok = True
            return None
        record.auth_method = "sigv4"
        credential = authorization.partition("Credential=")[2].split("/", 1)[0]
        record.access_key_id = credential or None
        verified = verify_sigv4(
            method=request.method,
            raw_target=request.target,
            headers=request.headers,
            body=request.body,
            authorization=authorization,
            region=scope_region,
            service=service,
            lookup_credentials=self._lookup_credentials,
            now=dt.datetime.now(dt.timezone.utc),
            clock_skew_s=self.clock_skew_s,
        )
        record.auth_ok = True
        return verified

    def _check_bearer(self, token: str, region: str) -> None:
        with self._lock:
            known = token in self._bearer_tokens
            token_region = self._bearer_tokens.get(token)
        if not known and not token.startswith(BEARER_TOKEN_PREFIXES):
            raise AuthFailure("AccessDeniedException", BEARER_FORMAT_MESSAGE)
        if not known or token_region not in (None, region):
            raise AuthFailure("AccessDeniedException", BEARER_INVALID_MESSAGE)

    async def _run_operation(self, call: _Call, operation: str, model_id: str | None) -> None:
        if model_id is not None:
            await self._model_operation(call, operation, model_id)
        elif operation == "ApplyGuardrail":
            await self._apply_guardrail(call)
        elif operation == "StartAsyncInvoke":
            await self._start_async_invoke(call)
        elif operation == "GetAsyncInvoke":
            await self._get_async_invoke(call)
        elif operation == "ListAsyncInvokes":
            await self._list_async_invokes(call)
        else:
            raise ApiError("UnknownOperationException", "Unknown operation")

    async def _model_operation(self, call: _Call, operation: str, model_id: str) -> None:
        problem = model_id_error(model_id, call.region)
        if problem:
            raise ApiError("ValidationException", problem)
        if operation == "InvokeModelWithBidirectionalStream":
            raise ApiError(
                "ValidationException",
                "InvokeModelWithBidirectionalStream needs HTTP/2; this emulator speaks HTTP/1.1 only.",
            )
        body = _json_object(call.request.body)
        mode = self._take_mode(call.region, model_id, operation)
        if mode is not None and await self._apply_fault(call, mode, operation):
            return
        input_tokens = estimate_input_tokens(body)
        if operation == "CountTokens":  # counting runs no model, so no quota either
            await self._answer(call, call.json_answer({"inputTokens": input_tokens}))
            return
        admission = self._admit(call.region, reserved_tokens(body))
        output_tokens = len(wire.reply_pieces(call.region))
        try:
            if operation in STREAMING_OPERATIONS:
                await self._stream(call, operation, model_id, input_tokens, cut=mode == "stream_cut", stall=mode == "stream_stall")
            elif operation == "InvokeModel":
                await self._invoke(call, model_id, input_tokens, output_tokens)
            else:
                await self._converse(call, input_tokens, output_tokens)
        finally:
            self._settle(admission, input_tokens + output_tokens)

    async def _apply_fault(self, call: _Call, mode: str, operation: str) -> bool:
        """Carry out a fault; True when the call is fully answered (or deliberately not)."""
        if mode in ERROR_MODES:
            raise ApiError(*ERROR_MODES[mode])
        if mode == "drop":
            call.record.error_type = "drop"
            self._publish(call)
            call.channel.abort()
            return True
        if mode == "stall":
            await self._stall(call)
            return False
        if mode == "stream_first_exception":
            call.record.status = 200
            call.record.error_type = "throttlingException"
            self._publish(call)
            await call.channel.start_stream(200, call.stream_headers(operation))
            await call.channel.send_chunk(exception_frame("throttlingException", wire.TOO_MANY_TOKENS))
            await call.channel.end_stream()
            return True
        return False  # stream_cut, stream_stall: the stream itself cuts or stalls

    async def _stall(self, call: _Call) -> None:
        """Say nothing until release_all() (or stop); then answer normally."""
        call.record.error_type = "stall"
        self._publish(call)
        assert self._stall_release is not None
        await self._stall_release.wait()
        # The published record shows the real outcome once the answer goes out.
        call.record.error_type = None

    async def _invoke(self, call: _Call, model_id: str, input_tokens: int, output_tokens: int) -> None:
        model_name = display_model_name(model_id)
        message = wire.anthropic_message(model_name, call.region, input_tokens, output_tokens)
        headers = wire.invoke_headers(input_tokens, output_tokens, call.elapsed_ms())
        await self._answer(call, call.json_answer(message, headers))

    async def _converse(self, call: _Call, input_tokens: int, output_tokens: int) -> None:
        body = wire.converse_body(call.region, input_tokens, output_tokens, call.elapsed_ms())
        await self._answer(call, call.json_answer(body))

    async def _stream(self, call: _Call, operation: str, model_id: str, input_tokens: int, cut: bool, stall: bool = False) -> None:
        """Stream the reply; after the first text event, cut (``stream_cut``) or wait for holds. With
        ``stall`` (``stream_stall``), the stream begins (200, its opening event) and then says nothing
        until release_all(): a region that accepted the request but produces nothing."""
        holds = self._active_holds(call.region)
        pieces = wire.reply_pieces(call.region)
        invoke = operation == "InvokeModelWithResponseStream"
        call.record.status = 200
        call.record.error_type = "stream_cut" if cut else "stream_stall" if stall else None
        self._publish(call)
        await call.channel.start_stream(200, call.stream_headers(operation))
        first_byte_ms = call.elapsed_ms()
        if invoke:
            head = wire.invoke_stream_head(display_model_name(model_id), input_tokens)
            deltas = [wire.invoke_stream_delta(piece) for piece in pieces]
        else:
            head = wire.converse_stream_head()
            deltas = [wire.converse_stream_delta(piece) for piece in pieces]
        for frame in head:
            await self._send_event(call, frame)
        if stall:
            assert self._stall_release is not None
            await self._stall_release.wait()
            call.record.error_type = None
        for frame in deltas[:1]:
            await self._send_event(call, frame)
        if cut:
            call.channel.abort()
            return
        for handle in holds:
            await handle._hold()
        for frame in deltas[1:]:
            await self._send_event(call, frame)
        if invoke:
            tail = wire.invoke_stream_tail(input_tokens, len(pieces), call.elapsed_ms(), first_byte_ms)
        else:
            tail = wire.converse_stream_tail(input_tokens, len(pieces), call.elapsed_ms())
        for frame in tail:
            await self._send_event(call, frame)
        await call.channel.end_stream()

    async def _send_event(self, call: _Call, frame: bytes) -> None:
        if self.event_delay_s:
            await asyncio.sleep(self.event_delay_s)
        if self.stamp_events:
            frame = _stamped(frame)
        await call.channel.send_chunk(frame)

    # ----------------------------------------------------------------------------------------------
    # Guardrails and async invocations (region-bound state)

    async def _apply_guardrail(self, call: _Call) -> None:
        body = _json_object(call.request.body)
        if "source" not in body or "content" not in body:
            raise ApiError("ValidationException", "ApplyGuardrail requires 'source' and 'content'.")
        guardrail_id = unquote(_GUARDRAIL_PATH.match(call.request.path).group(1).decode("latin-1"))
        # A guardrail lives in one region: an ARN naming another region finds nothing here.
        if guardrail_id.startswith("arn:") and f":{call.region}:" not in guardrail_id:
            raise ApiError("ResourceNotFoundException", "The guardrail identifier or version is invalid.")
        await self._answer(call, call.json_answer(wire.guardrail_body()))

    async def _start_async_invoke(self, call: _Call) -> None:
        body = _json_object(call.request.body)
        model_id = body.get("modelId")
        if not isinstance(model_id, str) or "modelInput" not in body or "outputDataConfig" not in body:
            raise ApiError(
                "ValidationException", "StartAsyncInvoke requires modelId, modelInput and outputDataConfig."
            )
        if model_id_error(model_id, call.region):
            raise ApiError("ValidationException", INVALID_MODEL_MESSAGE)
        token = body.get("clientRequestToken")
        invocations = self._async_invocations[call.region]
        with self._lock:
            # clientRequestToken makes the call idempotent, as in AWS.
            invocation = next(
                (i for i in invocations.values() if token and i.client_request_token == token), None
            )
            if invocation is None:
                invocation = _AsyncInvocation.start(call.region, model_id, token, body["outputDataConfig"])
                invocations[invocation.invocation_arn] = invocation
        await self._answer(call, call.json_answer({"invocationArn": invocation.invocation_arn}))

    async def _get_async_invoke(self, call: _Call) -> None:
        arn = unquote(_ASYNC_INVOKE_PATH.match(call.request.path).group(1).decode("latin-1"))
        with self._lock:
            invocation = self._async_invocations[call.region].get(arn)
        if invocation is None:
            raise ApiError("ResourceNotFoundException", "The specified invocation ARN does not exist.")
        await self._answer(call, call.json_answer(invocation.describe()))

    async def _list_async_invokes(self, call: _Call) -> None:
        query = dict(parse_qsl(call.request.query.decode("latin-1")))
        with self._lock:
            invocations = list(self._async_invocations[call.region].values())
        invocations.sort(key=lambda invocation: invocation.submit_time, reverse=True)
        summaries = [invocation.describe() for invocation in invocations]
        if query.get("statusEquals"):
            summaries = [s for s in summaries if s["status"] == query["statusEquals"]]
        start = int(query.get("nextToken") or 0)
        size = int(query.get("maxResults") or 1000)
        page = {"asyncInvokeSummaries": summaries[start : start + size]}
        if start + size < len(summaries):
            page["nextToken"] = str(start + size)
        await self._answer(call, call.json_answer(page))

    # ----------------------------------------------------------------------------------------------
    # STS

    async def _handle_sts(self, call: _Call) -> None:
        form = sts.parse_form(call.request.body)
        action = form.get("Action", "")
        try:
            try:
                # STS is global: any region in the credential scope will do.
                verified = self._authenticate(call, service="sts", scope_region=None)
            except AuthFailure as failure:
                default = (failure.error_type, failure.status)
                code, status = sts.STS_AUTH_ERRORS.get(failure.error_type, default)
                raise sts.StsError(code, failure.message, status) from None
            xml = self._sts_action(action, form, verified)
            await self._answer(call, call.xml_answer(200, sts.close_result(xml, action, call.request_id)))
        except sts.StsError as error:
            xml = sts.error_xml(error.code, error.message, call.request_id)
            await self._answer(call, call.xml_answer(error.status, xml), error.code)

    def _sts_action(self, action: str, form: dict[str, str], verified: VerifiedRequest | None) -> str:
        if action == "AssumeRole":
            record, xml = sts.assume_role(form, dt.datetime.now(dt.timezone.utc))
            with self._lock:
                self._credentials[record.access_key_id] = record
            return xml
        if action == "GetCallerIdentity":
            assert verified is not None
            return sts.get_caller_identity_xml(verified.access_key_id, verified.temporary)
        version = form.get("Version", "NO_VERSION_SPECIFIED")
        raise sts.StsError("InvalidAction", f"Could not find operation {action} for version {version}")

    # ----------------------------------------------------------------------------------------------
    # Control API

    async def _control(self, region: str, request: HttpRequest, channel: ResponseChannel) -> None:
        try:
            status, body = self._control_action(region, request)
        except (ValueError, TypeError, KeyError) as exc:
            status, body = 400, {"error": str(exc)}
        payload = wire.compact_json(body)
        headers = [("Content-Type", wire.JSON_CONTENT_TYPE), ("Content-Length", str(len(payload)))]
        await channel.respond(status, headers, payload)

    def _control_action(self, region: str, request: HttpRequest) -> tuple[int, Any]:
        action = request.path[len(b"/_emulator/") :].decode("latin-1")
        params = json.loads(request.body) if request.body.strip() else {}
        if not isinstance(params, dict):
            raise ValueError("the body must be a JSON object")
        target_region = params.get("region") or region
        if (request.method, action) == ("GET", "health"):
            return 200, {"region": region, "regions": {r: self.endpoint_url(r) for r in self.regions}}
        if (request.method, action) == ("GET", "requests"):
            since = int(dict(parse_qsl(request.query.decode("latin-1"))).get("since", 0))
            total, records = self.requests_since(since)
            return 200, {"total": total, "requests": [r.summary() for r in records]}
        if request.method != "POST":
            return 404, {"error": f"no control action {request.method} {action}"}
        if action == "mode":
            self.set_mode(target_region, params["mode"], params.get("model"), params.get("count"))
        elif action == "quota":
            window_s = float(params.get("window_s", 60.0))
            self.set_quota(target_region, params.get("rpm"), params.get("tpm"), window_s)
        elif action == "hold":
            handle = self.hold_streams(params.get("region"))
            return 200, {"hold_id": id(handle)}
        elif action == "release":
            self._release_by_id(params.get("hold_id"))
        elif action == "clear":
            self.clear()
        elif action == "reset":
            self.reset()
        else:
            return 404, {"error": f"no control action POST {action}"}
        return 200, {"ok": True}


def _identify(request: HttpRequest) -> tuple[str, str | None, str | None]:
    """(signing service, operation name, decoded model id) from method, raw path and body.

    The operation is None for anything Bedrock Runtime would not route.
    """
    path, method = request.path, request.method
    if sts.is_sts_request(method, path, request.header("content-type")):
        return "sts", sts.parse_form(request.body).get("Action") or None, None
    match = _MODEL_PATH.match(path)
    if match:
        operation = MODEL_OPERATIONS.get(match.group(2).decode("ascii"))
        if operation is None or method != "POST":
            return "bedrock", None, None
        return "bedrock", operation, unquote(match.group(1).decode("latin-1"))
    if _GUARDRAIL_PATH.match(path) and method == "POST":
        return "bedrock", "ApplyGuardrail", None
    match = _ASYNC_INVOKE_PATH.match(path)
    if match:
        if match.group(1) is None:
            return "bedrock", {"POST": "StartAsyncInvoke", "GET": "ListAsyncInvokes"}.get(method), None
        return "bedrock", ("GetAsyncInvoke" if method == "GET" else None), None
    return "bedrock", None, None


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict):
        raise ApiError("ValidationException", MALFORMED_INPUT_MESSAGE)
    return value


def _stamped(frame: bytes) -> bytes:
    """The same event with its padding replaced by the send time (``t<monotonic ns>``)."""
    (decoded,) = decode_frames(frame)
    payload = json.loads(decoded.payload)
    payload["p"] = f"t{time.monotonic_ns()}"
    return encode_frame(decoded.headers, json.dumps(payload, separators=(",", ":")).encode())
