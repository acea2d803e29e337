"""The mitmproxy glue: options, hooks, logging. The decisions live in plain modules.

Per Bedrock flow: ``request`` classifies it and hands it to the relay (see :mod:`.relay`), which
chooses a target, rewrites, signs and sends; ``responseheaders`` turns on streaming for event streams
and shows in the flow where the request really went; ``response``/``error`` log the outcome.
"""

from __future__ import annotations

import logging
import re
import ssl
import time

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy import mode_specs

from . import accesslog, affinity, classify, config as config_module, quota
from .credentials import CredentialStore
from .errors import BedrockError
from .relay import EVENT_STREAM, EXCHANGE_HEADER, Exchange, Relay, forwardable_headers, redacted, upstream_path
from .routing import Router

log = logging.getLogger("bedrock_balancer")

METADATA_KEY = "bedrock_balancer"
FAILURE_MARKER = ":warning:"
FAILOVER_MARKER = ":repeat:"


class BedrockBalancer:
    name = "bedrock_balancer"

    def __init__(self) -> None:
        self.config: config_module.Config | None = None
        self.router: Router | None = None
        self.relay: Relay | None = None
        self.access_log: accesslog.AccessLog | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "bedrock_config", str, "",
            "Path of the bedrock-balancer YAML config (targets, strategy). See the README.",
        )
        loader.add_option(
            "bedrock_regions", str, "",
            "Comma-separated regions to balance over with the default AWS credentials, e.g. us-east-1,us-west-2 "
            "(a quick alternative to bedrock_config).",
        )
        loader.add_option(
            "bedrock_access_log", str, "",
            "Path of a JSON-lines access log: one line per Bedrock request with the region that served it.",
        )
        loader.add_option(
            "bedrock_only", bool, True,
            "In regular and transparent modes, intercept only Bedrock Runtime hosts and tunnel everything else "
            "untouched (sets allow_hosts unless you set allow_hosts or ignore_hosts yourself).",
        )

    def configure(self, updated: set[str]) -> None:
        if {"bedrock_config", "bedrock_regions"} & updated:
            self.config = self._load_config()
            self.router = Router(self.config) if self.config else None
            if self.config:
                log.info("bedrock-balancer: %s over %s", self.config.strategy, ", ".join(f"{t} -> {t.endpoint_url}" for t in self.config.targets))
        if "bedrock_access_log" in updated:
            if self.access_log:
                self.access_log.close()
            try:
                self.access_log = accesslog.AccessLog(ctx.options.bedrock_access_log) if ctx.options.bedrock_access_log else None
            except config_module.ConfigError as e:
                raise exceptions.OptionsError(f"bedrock-balancer: {e}") from None
        if {"mode", "bedrock_only", "allow_hosts", "ignore_hosts"} & updated:
            self._limit_interception()
        if "connection_strategy" in updated and ctx.options.connection_strategy != "lazy":
            # The flow's destination is decided per request, so mitmproxy must not connect to the
            # client's original host first (in production that is a wasted TLS handshake with AWS).
            ctx.options.update(connection_strategy="lazy")

    def _load_config(self) -> config_module.Config | None:
        path, regions = ctx.options.bedrock_config, ctx.options.bedrock_regions
        try:
            if path and regions:
                raise config_module.ConfigError("bedrock_config and bedrock_regions: set one of them, not both")
            if path:
                return config_module.load_file(path)
            if regions:
                return config_module.from_regions(regions)
        except config_module.ConfigError as e:
            raise exceptions.OptionsError(f"bedrock-balancer: {e}") from None
        return None

    def _limit_interception(self) -> None:
        if not ctx.options.bedrock_only or ctx.options.allow_hosts or ctx.options.ignore_hosts:
            return
        patterns = [classify.BEDROCK_HOST_PATTERN]
        for spec in ctx.options.mode:
            mode = mode_specs.ProxyMode.parse(spec)
            if isinstance(mode, mode_specs.ReverseMode):
                host, port = mode.address
                patterns.append("^" + host.replace(".", r"\.") + f":{port}$")
        ctx.options.update(allow_hosts=patterns)

    async def running(self) -> None:
        if self.config is None:
            log.warning("bedrock-balancer: no targets configured; set bedrock_config or bedrock_regions")
            return
        await self._start_relay()

    async def _start_relay(self) -> None:
        if self.relay is not None:
            await self.relay.close()
        credentials = CredentialStore(self.config.targets)
        self.relay = Relay(self.config, self.router, credentials, self._upstream_ssl_context())
        await self.relay.start()
        await credentials.warm_up()

    def _upstream_ssl_context(self) -> ssl.SSLContext:
        """The same upstream trust mitmproxy itself would use (its ssl_* options)."""
        if ctx.options.ssl_insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        cafile = ctx.options.ssl_verify_upstream_trusted_ca
        capath = ctx.options.ssl_verify_upstream_trusted_confdir
        if not cafile and not capath:
            import certifi

            cafile = certifi.where()
        return ssl.create_default_context(cafile=cafile or None, capath=capath or None)

    async def done(self) -> None:
        if self.relay is not None:
            await self.relay.close()
        if self.access_log is not None:
            self.access_log.close()

    # -- hooks ---------------------------------------------------------------------------------

    def _is_bedrock(self, flow: http.HTTPFlow) -> bool:
        if self.relay is None:
            return False
        if isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode):
            return True
        return classify.is_bedrock_host(flow.request.host)

    async def request(self, flow: http.HTTPFlow) -> None:
        try:
            await self._request(flow)
        except Exception:
            # Never let a bug forward the request as it stands (to the client's original host, or to a
            # half-rewritten one): answer it here instead.
            log.exception("bedrock-balancer: internal error on %s", flow.request.pretty_url)
            if isinstance(flow.metadata.get(METADATA_KEY), (Exchange, float)):
                flow.response = _error_response(BedrockError("InternalServerException", "bedrock-balancer: internal error (see the proxy's log)"))

    async def _request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        if self.relay is not None and (flow.request.host, flow.request.port) == self.relay.address:
            flow.response = _error_response(BedrockError("AccessDeniedException", "bedrock-balancer: the relay cannot be reached through the proxy"))
            return
        if not self._is_bedrock(flow):
            return
        flow.metadata[METADATA_KEY] = started = time.monotonic()
        try:
            exchange = self._exchange_for(flow)
        except BedrockError as e:
            flow.response = _error_response(e)
            self._finish(flow, None, started, error=str(e))
            return
        flow.metadata[METADATA_KEY] = exchange
        if not exchange.request.streaming:
            # mitmproxy sends a non-streamed answer whole anyway: the relay's client fetches it (with
            # failover) and the flow gets it here, with no loopback hop and no upstream connection of
            # mitmproxy's own.
            answer = await self.relay.run(exchange)
            flow.response = http.Response.make(answer.status, answer.body, _headers(answer.headers))
            self._show_upstream_request(flow, exchange)
            return
        token = self.relay.register(exchange)
        flow.request.scheme, flow.request.host, flow.request.port = "http", *self.relay.address
        # Only the client's forwardable headers (and Host) travel even the loopback hop.
        keep = {n.lower() for n, _ in exchange.headers} | {"host", "content-length", "transfer-encoding"}
        for name in list(flow.request.headers):
            if name.lower() not in keep:
                del flow.request.headers[name]
        flow.request.headers[EXCHANGE_HEADER] = token
        flow.metadata[METADATA_KEY + ".token"] = token

    def _exchange_for(self, flow: http.HTTPFlow) -> Exchange:
        request = flow.request
        reverse = isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode)
        raw_path, _, raw_query = request.path.partition("?")
        authorization = request.headers.get("authorization")
        bedrock_request = classify.classify(
            request.method,
            raw_path,
            "" if reverse else request.host,
            authorization,
            request.headers.get(classify.GUARDRAIL_HEADER),
            fallback_region=classify.host_region(request.host) if reverse else None,
            body=request.raw_content or b"",
        )
        body = request.raw_content or b""
        return Exchange(
            request=bedrock_request,
            method=request.method,
            raw_path=raw_path,
            raw_query=raw_query,
            headers=forwardable_headers(list(request.headers.items(multi=True))),
            body=body,
            tokens=quota.estimate_tokens(body) if self.config.has_budgets and bedrock_request.model_id else 0,
            affinity_key=(
                affinity.conversation_key(bedrock_request.model_id, body)
                if self.config.affinity and bedrock_request.balanceable and bedrock_request.model_id
                else None
            ),
        )

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange = flow.metadata.get(METADATA_KEY)
        if not isinstance(exchange, Exchange):
            return
        if flow.response.headers.get("content-type", "").startswith(EVENT_STREAM):
            flow.response.stream = True
        self._show_upstream_request(flow, exchange)

    def _show_upstream_request(self, flow: http.HTTPFlow, exchange: Exchange) -> None:
        """Make the flow show the request as it went upstream, so mitmweb and saved flows tell the truth."""
        target = exchange.target
        if target is None:
            return
        request = flow.request
        # Assigned wholesale: mitmproxy's per-field setters and Headers.clear() are slow on a hot path.
        request.data.scheme, request.data.host, request.data.port = target.scheme.encode(), target.host, target.port
        request.data.path = _upstream_path_with_query(exchange).encode()
        request.headers = _headers(redacted(exchange.sent_headers))

    def response(self, flow: http.HTTPFlow) -> None:
        exchange = flow.metadata.get(METADATA_KEY)
        if isinstance(exchange, Exchange):
            self._finish(flow, exchange, exchange.started, error=exchange.error)

    def error(self, flow: http.HTTPFlow) -> None:
        exchange = flow.metadata.get(METADATA_KEY)
        if self.relay is not None:
            self.relay.discard(flow.metadata.get(METADATA_KEY + ".token"))
        if isinstance(exchange, Exchange):
            self._finish(flow, exchange, exchange.started, error=exchange.error or (flow.error.msg if flow.error else "error"))

    def _finish(self, flow: http.HTTPFlow, exchange: Exchange | None, started: float, error: str | None) -> None:
        latency_ms = (time.monotonic() - started) * 1000
        status = flow.response.status_code if flow.response is not None else None
        if exchange is not None and exchange.stream_outcome == "truncated":
            error = error or "stream truncated"
        record = access_record(flow, exchange, status, latency_ms, error)
        flow.comment = _comment(record)
        if error or (status or 0) >= 400:
            flow.marked = FAILURE_MARKER
        elif len(record["attempts"]) > 1:
            flow.marked = FAILOVER_MARKER
        log.info(_log_line(record))
        if self.access_log is not None:
            self.access_log.write(record)


def access_record(flow: http.HTTPFlow, exchange: Exchange | None, status: int | None, latency_ms: float, error: str | None) -> dict:
    request = exchange.request if exchange else None
    target = exchange.target if exchange else None
    record = {
        "ts": round(time.time(), 3),
        "client_region": request.client_region if request else None,
        "region": target.region if target else None,
        "target": target.name if target else None,
        "operation": request.operation if request else None,
        "model": exchange.choice.model_id if exchange and exchange.choice and exchange.choice.model_id else (request.model_id if request else None),
        "status": status,
        "latency_ms": round(latency_ms, 1),
        "attempts": [a.as_log() for a in exchange.attempts] if exchange else [],
        "input_tokens": exchange.usage.input_tokens if exchange else None,
        "output_tokens": exchange.usage.output_tokens if exchange else None,
        "client": _client_address(flow),
    }
    if request is not None and request.model_id != record["model"]:
        record["client_model"] = request.model_id
    if exchange is not None and exchange.stream_outcome:
        record["stream"] = exchange.stream_outcome
    if error:
        record["error"] = _safe(error)
    return record


def _client_address(flow: http.HTTPFlow) -> str | None:
    peer = flow.client_conn.peername
    return f"{peer[0]}:{peer[1]}" if peer else None


def _safe(text: str) -> str:
    """Nothing that looks like a credential or a signature reaches a log line."""
    text = re.sub(r"Signature=[0-9a-f]+", "Signature=<redacted>", text)
    return re.sub(r"(?i)(bearer\s+)\S+", r"\1<redacted>", text)[:500]


def _comment(record: dict) -> str:
    origin = record["client_region"] or "?"
    where = f"{record['region']} ({record['target']})" if record["target"] and record["target"] != record["region"] else (record["region"] or "no target")
    text = f"{origin} → {where}"
    if len(record["attempts"]) > 1:
        failed = ", ".join(f"{a['target']} {a['status'] or a.get('error', 'error')}" for a in record["attempts"][:-1])
        text += f" after {len(record['attempts'])} attempts ({failed})"
    if record.get("error"):
        text += f" · {record['error']}"
    return text


def _log_line(record: dict) -> str:
    tokens = ""
    if record["input_tokens"] is not None:
        tokens = f" tokens={record['input_tokens']}/{record['output_tokens']}"
    failed_over = len(record["attempts"]) > 1
    extra = f" attempts={len(record['attempts'])}" if failed_over else ""
    error = f" error={record['error']!r}" if record.get("error") else ""
    return (
        f"bedrock {record['operation'] or '-'} {record['model'] or '-'} "
        f"{record['client_region'] or '?'} -> {record['region'] or '-'} "
        f"status={record['status']} {record['latency_ms']:.0f}ms{tokens}{extra}{error}"
    )


def _upstream_path_with_query(exchange: Exchange) -> str:
    path = upstream_path(exchange, exchange.choice)
    return f"{path}?{exchange.raw_query}" if exchange.raw_query else path


def _headers(pairs: list[tuple[str, str]]) -> http.Headers:
    return http.Headers([(name.encode(), value.encode("utf-8", "surrogateescape")) for name, value in pairs])


def _error_response(error: BedrockError) -> http.Response:
    status, headers, body = error.wire()
    return http.Response.make(status, body, headers)
