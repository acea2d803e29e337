"""The mitmproxy glue: options, hooks, logging. The decisions live in plain modules.

Per Bedrock flow: ``request`` checks it (hygiene, client authentication, per-client limits; see
:mod:`.clientauth`), classifies it and hands it to the relay (see :mod:`.relay`), which chooses a target,
rewrites, signs and sends; ``responseheaders`` turns on streaming for event streams and shows in the flow
where the request really went; ``response``/``error`` log the outcome.

Who may use the proxy: ``client_connected`` refuses clients on other hosts unless clients authenticate
(or ``bedrock_allow_unauthenticated`` says otherwise); ``http_connect``, ``request`` and
``server_connect`` keep the proxy's own listeners out of reach and let clients on other hosts reach
nothing but Bedrock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import re
import socket
import ssl
import time

from mitmproxy import command, ctx, exceptions, http
from mitmproxy.connection import ConnectionState
from mitmproxy import log as mitmproxy_log
from mitmproxy.net.http import status_codes, url
from mitmproxy.proxy import mode_specs

from . import accesslog, admin, affinity, classify, clientauth, config as config_module, contentview, quota
from .credentials import CredentialStore
from .errors import BedrockError
from .relay import EVENT_STREAM, EXCHANGE_HEADER, LOOPBACK_SERVER, PROVISIONAL_HEADER, Exchange, Relay, forwardable_headers, note_client_left, redacted, upstream_path
from . import state as state_module
from .routing import Router

log = logging.getLogger("bedrock_balancer")
request_log = logging.getLogger("bedrock_balancer.requests")  # the line per request
# mitmproxy's line when a response starts streaming, and the logger it comes from.
MITMPROXY_SERVER_LOG = "mitmproxy.proxy.server"
STREAMING_LINE = "Streaming response from "
DEFERRED_ATTRIBUTE = "bedrock_balancer_deferred"  # on a log record the addon let through a moment later

METADATA_KEY = "bedrock_balancer"
CLIENT_NAME_KEY = METADATA_KEY + ".client_name"
DEFAULT_STREAM_COPY = 1024 * 1024
# Bedrock's largest documented request is an InvokeModel body of 20 MB; 25 MiB leaves headroom.
DEFAULT_MAX_BODY = 25 * 1024 * 1024
# mitmproxy buffers a request body before the request hook sees it. Its own body_size_limit (which
# answers a plain 413 instead of buffering more) is set this far above bedrock_max_body, so no body can
# exhaust memory while every body up to it still gets a Bedrock-format 413.
BODY_BACKSTOP_HEADROOM = 64 * 1024 * 1024
LOOP_TURNS_TO_READ_THE_LOOPBACK = 2
CLIENT_WATCH_INTERVAL_S = 0.5  # how soon a whole answer's wait notices that its client has left
FAILURE_MARKER = ":warning:"
FAILOVER_MARKER = ":repeat:"
NO_TARGETS = BedrockError(
    "ServiceUnavailableException",
    "bedrock-balancer: no targets configured (options bedrock_config or bedrock_regions); nothing was sent to AWS",
)


@dataclasses.dataclass
class _FlowState:
    """What the addon keeps about one Bedrock flow between its hooks.

    Kept by the addon, keyed by flow id, not in flow.metadata: mitmproxy must be able to serialise
    metadata (saved flows, mitmweb), and an Exchange holds the request and its signature."""

    started: float  # monotonic, when the request hook took the flow
    exchange: Exchange | None = None  # once classified
    relay_token: str | None = None  # streamed flows: the relay's handle on the exchange
    reservation: tuple | None = None  # under per-client limits: (reservation, tokens reserved)
    # The hook's task while it waits for the relay: a whole answer's request hook, or a stream's
    # responseheaders hook waiting for the head (which the client watch may always cancel).
    waiting: asyncio.Task | None = None
    waiting_for_head: bool = False
    client_left: bool = False  # the client watch cancelled that wait


class BedrockBalancer:
    name = "bedrock_balancer"

    def __init__(self) -> None:
        self.config: config_module.Config | None = None
        self.router: Router | None = None
        self.relay: Relay | None = None
        self.access_log: accesslog.AccessLog | None = None
        self.authenticator: clientauth.Authenticator | None = None
        self.client_limits: clientauth.ClientLimits | None = None
        self.state = None  # state_module.MemoryState or RedisState, with the router
        self._flows: dict[str, _FlowState] = {}  # every Bedrock flow the request hook took, until it ends
        self.metrics: admin.Metrics | None = None
        self.admin: admin.AdminServer | None = None
        self._running = False
        self._body_backstop: str | None = None
        self._client_watch: asyncio.Task | None = None
        self._serving: asyncio.Task | None = None  # start-up of the relay for targets first given at run time

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
        loader.add_option(
            "bedrock_allow_unauthenticated", bool, False,
            "Accept clients from other hosts although bedrock_config configures no client authentication "
            "(clients, api_keys). Without it the proxy accepts only loopback clients and refuses to listen on "
            "other addresses: whoever reaches it spends its AWS credentials.",
        )
        loader.add_option(
            "bedrock_max_body", int, DEFAULT_MAX_BODY,
            "Largest Bedrock request body in bytes; bigger ones are answered 413 RequestEntityTooLargeException "
            "(default 25 MiB: Bedrock's largest documented request, InvokeModel, is 20 MB).",
        )
        loader.add_option(
            "bedrock_admin", str, "",
            "Admin listener HOST:PORT (e.g. 127.0.0.1:9090) serving /metrics (Prometheus) and /status (JSON). "
            "Off when empty. It has no authentication: keep it on loopback or a private interface.",
        )
        loader.add_option(
            "bedrock_stream_copy", int, DEFAULT_STREAM_COPY,
            "Keep the first N bytes of each streamed Bedrock answer on the flow, for mitmweb's event-stream view "
            "and saved flows (0: keep nothing). The client always receives every byte as it arrives.",
        )
        loader.add_option(
            "bedrock_state", str, "memory",
            "Where quota reservations, cooldowns and per-client limits live: 'memory' (this process) or "
            "redis://host:port/db, shared by several proxy instances (see the README, Scaling out). If Redis "
            "becomes unreachable the proxy carries on with local state and returns to Redis when it answers.",
        )
        loader.add_option(
            "bedrock_debug_signatures", bool, False,
            "When client authentication rejects a signature, say in the 403 which canonical request and string "
            "to sign the proxy computed (as S3 does), to debug a client's signing.",
        )

    def configure(self, updated: set[str]) -> None:
        if "bedrock_state" in updated and (problem := state_module.validate_state_url(ctx.options.bedrock_state)):
            raise exceptions.OptionsError(problem)
        targets_changed = False
        if {"bedrock_config", "bedrock_regions"} & updated:
            config = self._load_config()
            # Checked before anything changes: a refused update must leave the running proxy as it was.
            if self._running and (problem := self._exposure_problem(config) or self._change_problem(config)):
                raise exceptions.OptionsError(problem)
            # Once the relay serves, only who the clients are may change (_change_problem): the router, the state
            # (cooldowns, budgets) and the relay stay as they are.
            targets_changed = not self._serving_targets()
            self.config = config
            if targets_changed:
                self.router = Router(self.config) if self.config else None
                self.metrics = admin.Metrics(self.router) if self.router else None
            if targets_changed and self._running and self.config is not None:  # started without targets: serve these
                self._serving = asyncio.get_running_loop().create_task(self._start_serving())
                self._serving.add_done_callback(_log_failure)
        if targets_changed or "bedrock_state" in updated:
            self._configure_state()
            if self.config:
                log.info("bedrock-balancer: %s over %s", self.config.strategy, ", ".join(f"{t} -> {t.endpoint_url}" for t in self.config.targets))
        if {"bedrock_config", "bedrock_regions", "bedrock_debug_signatures", "keep_host_header"} & updated:
            self._configure_client_auth()
        if {"bedrock_max_body", "body_size_limit"} & updated:
            self._configure_body_limit()
        if self._running and {"listen_host", "mode", "bedrock_allow_unauthenticated"} & updated:
            # At start-up this is checked in ``running``, once every option has its final value.
            if problem := self._exposure_problem(self.config):
                raise exceptions.OptionsError(problem)
        if "bedrock_admin" in updated and ctx.options.bedrock_admin:
            try:
                admin.parse_listen_address(ctx.options.bedrock_admin)
            except ValueError as e:
                raise exceptions.OptionsError(f"bedrock_admin: {e}") from None
        if "bedrock_stream_copy" in updated and ctx.options.bedrock_stream_copy < 0:
            raise exceptions.OptionsError("bedrock_stream_copy: must be 0 or a positive number of bytes")
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

    def _serving_targets(self) -> bool:
        """Whether the relay serves the targets, or is being started for targets first given at run time (a
        start that failed may be retried)."""
        return self.relay is not None or (self._serving is not None and not self._serving.done())

    def _change_problem(self, config: config_module.Config | None) -> str | None:
        """Why a running proxy cannot take ``config``, or None. The relay, its connections and credentials are
        built for the targets the proxy started with; a new config may change who its clients are, nothing else."""
        if not self._serving_targets() or (config is not None and _without_clients(config) == _without_clients(self.config)):
            return None
        return (
            "bedrock-balancer: the targets, strategy, retry and timeouts are read when the proxy starts: restart it "
            "to change them (the clients, api_keys and their limits can change while it runs)"
        )

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

    def _configure_state(self) -> None:
        old = self.state
        self.state = state_module.make_state(self.router, ctx.options.bedrock_state) if self.router else None
        if self.router is not None:
            self.router.shared_state = self.state
        if self.relay is not None and self.state is not None:
            self.relay.state = self.state
        if self.client_limits is not None:
            self.client_limits.state = self.state
        if old is not None and old is not self.state:
            try:
                asyncio.get_running_loop().create_task(old.close())
            except RuntimeError:  # no loop yet: nothing was connected
                pass
        if self.state is not None and self.state.name != "memory":
            log.info("bedrock-balancer: shared state in %s", state_module.redacted_url(ctx.options.bedrock_state))

    def _configure_client_auth(self) -> None:
        config = self.config
        if config is None or not config.authenticates_clients:
            self.authenticator = self.client_limits = None
            return
        self.authenticator = clientauth.Authenticator(
            config.clients, config.api_keys, debug_signatures=ctx.options.bedrock_debug_signatures
        )
        self.client_limits = clientauth.ClientLimits(config.client_limits, config.quota_window_s)
        self.client_limits.state = self.state
        if not ctx.options.keep_host_header:
            # Reverse mode rewrites the Host header to the reverse target before any hook runs; the client
            # signed its own Host, so verification needs it kept. (The relay sets the upstream Host itself.)
            ctx.options.update(keep_host_header=True)

    def _configure_body_limit(self) -> None:
        max_body = ctx.options.bedrock_max_body
        if max_body < 1:
            raise exceptions.OptionsError("bedrock_max_body: must be a positive number of bytes")
        backstop = str(max_body + BODY_BACKSTOP_HEADROOM)
        current = ctx.options.body_size_limit
        if (not current or current == self._body_backstop) and current != backstop:
            self._body_backstop = backstop
            ctx.options.update(body_size_limit=backstop)

    def _listen_hosts(self) -> list[str]:
        """The addresses the proxy's servers listen on (``""``: every interface)."""
        hosts = []
        for spec in ctx.options.mode:
            mode = mode_specs.ProxyMode.parse(spec)
            if mode.listen_port(ctx.options.listen_port) is None:
                continue  # modes that take no network clients (local redirect)
            hosts.append(mode.listen_host(ctx.options.listen_host))
        return hosts

    def _exposure_problem(self, config: config_module.Config | None) -> str | None:
        """Why the proxy must not serve with ``config`` (unauthenticated, yet reachable from other hosts), or None."""
        if config is None or config.authenticates_clients or ctx.options.bedrock_allow_unauthenticated:
            return None
        exposed = [h for h in self._listen_hosts() if not clientauth.is_local_listen_address(h)]
        if not exposed:
            return None
        where = ", ".join(repr(h) if h else "every interface (listen_host is empty)" for h in dict.fromkeys(exposed))
        return (
            f"bedrock-balancer: refusing to listen on {where} without client authentication: anyone who can reach "
            "the proxy would spend its AWS credentials. Configure clients or api_keys in bedrock_config, listen on "
            "127.0.0.1 (--set listen_host=127.0.0.1), or set bedrock_allow_unauthenticated=true to accept "
            "unauthenticated clients from other hosts."
        )

    def _announce_client_policy(self) -> None:
        config = self.config
        if config.authenticates_clients:
            log.info(
                "bedrock-balancer: client authentication on (%d virtual keys, %d API keys): every client must "
                "authenticate; clients on other hosts may reach only Bedrock",
                len(config.clients), len(config.api_keys),
            )
        elif ctx.options.bedrock_allow_unauthenticated:
            exposed = [h or "every interface" for h in self._listen_hosts() if not clientauth.is_local_listen_address(h)]
            log.warning(
                "bedrock-balancer: no client authentication, and bedrock_allow_unauthenticated is set: %s",
                f"anyone who reaches {', '.join(exposed)} spends the proxy's AWS credentials" if exposed
                else "clients on other hosts are accepted",
            )
        else:
            log.info(
                "bedrock-balancer: no client authentication configured (clients, api_keys): accepting only "
                "clients on this machine (loopback)"
            )
        if "web_host" in ctx.options and not clientauth.is_local_listen_address(ctx.options.web_host):
            log.warning(
                "bedrock-balancer: the mitmweb UI listens on %s; it has no authentication (CVE-2025-23217), so "
                "whoever reaches it controls the proxy", repr(ctx.options.web_host) if ctx.options.web_host else "every interface",
            )

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
        self._running = True
        self._client_watch = asyncio.get_running_loop().create_task(self._watch_clients(), name="bedrock-balancer client watch")
        _spare_legacy_log_hook()
        _defer_streaming_line()
        # configure() sees only the options that were set: these two must also hold with the defaults
        # (bedrock-balancer adds this addon after mitmproxy has applied the command line).
        self._configure_body_limit()
        self._limit_interception()
        if self.config is None:
            log.warning("bedrock-balancer: no targets configured; set bedrock_config or bedrock_regions")
            return
        if problem := self._exposure_problem(self.config):
            log.error(problem)  # mitmproxy's errorcheck ends start-up on an error logged now; nothing is relayed
            return
        await self._start_serving()
        _freeze_startup_heap()

    async def _start_serving(self) -> None:
        self._announce_client_policy()
        await self._start_relay()
        await self.state.check()  # Redis: says now if it cannot be reached (the proxy then uses local state)
        await self._start_admin()

    async def _start_relay(self) -> None:
        if self.relay is not None:
            await self.relay.close()
        credentials = CredentialStore(self.config.targets)
        self.relay = Relay(self.config, self.router, credentials, self._upstream_ssl_context(), state=self.state)
        await self.relay.start()
        await credentials.warm_up()

    async def _start_admin(self) -> None:
        if self.admin is not None:
            await self.admin.close()
            self.admin = None
        if not ctx.options.bedrock_admin:
            return
        self.admin = admin.AdminServer(self.router, self.metrics)
        try:
            await self.admin.start(*admin.parse_listen_address(ctx.options.bedrock_admin))
        except OSError as e:  # in use, or not an address of this machine
            self.admin = None
            log.error("bedrock-balancer: bedrock_admin: cannot listen on %s: %s", ctx.options.bedrock_admin, e.strerror or e)
            return
        log.info("bedrock-balancer: admin listener at http://%s:%s/metrics and /status", *self.admin.address[:2])

    @command.command("bedrock.status")
    def status(self) -> str:
        """The balancer's live state: targets, cooldowns (until when, and why), quota usage."""
        if self.router is None:
            return json.dumps({"targets": [], "note": "no targets configured"})
        page = admin.status(self.router)
        if hasattr(self.router.shared_state, "shared_status"):  # as the admin listener tells a shared backend
            # A command cannot wait for Redis: say whose view this is, and where the shared one is.
            page["note"] = "cooldowns and budgets as this instance sees them; /status on the admin listener (bedrock_admin) shows the shared state"
        return json.dumps(page, indent=2)

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
        if self._client_watch is not None:
            self._client_watch.cancel()
        if self.admin is not None:
            await self.admin.close()
        if self.relay is not None:
            await self.relay.close()
        if self.state is not None:
            await self.state.close()
        if self.access_log is not None:
            self.access_log.close()

    # -- hooks ---------------------------------------------------------------------------------

    def _is_bedrock(self, flow: http.HTTPFlow) -> bool:
        if isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode):
            return True
        return classify.is_bedrock_host(flow.request.host)

    # -- who may connect, and to what ----------------------------------------------------------

    def client_connected(self, client) -> None:
        if self.config is None or self.config.authenticates_clients or ctx.options.bedrock_allow_unauthenticated:
            return
        peer = client.peername[0] if client.peername else ""
        if not clientauth.is_loopback(peer):
            client.error = "bedrock-balancer: only clients on this machine are accepted without client authentication"
            log.warning(
                "bedrock-balancer: refused a connection from %s: without client authentication only loopback clients are accepted",
                peer or "an unknown address",
            )

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if self.config is None or flow.response is not None:
            return
        try:
            refusal = self._refusal(flow, bedrock=classify.is_bedrock_host(flow.request.host))
        except Exception:
            log.exception("bedrock-balancer: internal error while checking CONNECT %s", flow.request.pretty_host)
            refusal = BedrockError("InternalServerException", "bedrock-balancer: internal error (see the proxy's log)")
        if refusal is not None:
            flow.response = _error_response(refusal)
            log.info("bedrock-balancer: refused CONNECT %s:%s from %s: %s", flow.request.host, flow.request.port, _client_address(flow), refusal.message)

    async def server_connect(self, data) -> None:
        """The last gate before mitmproxy opens a connection, whatever the request looked like: clients on
        other hosts reach only the relay, and nobody reaches the proxy's own listeners."""
        if self.config is None or data.server.error or not data.server.address:
            return
        host, port = data.server.address[:2]
        if self.relay is not None and (host, port) == tuple(self.relay.address):
            return
        peer = data.client.peername[0] if data.client.peername else ""
        if not clientauth.is_loopback(peer):
            data.server.error = "bedrock-balancer: clients on other hosts may reach only Amazon Bedrock through this proxy"
        elif port in self._own_ports() and await _resolves_to_this_machine(host, port):
            data.server.error = "bedrock-balancer: the proxy's own listeners cannot be reached through the proxy"
        if data.server.error:
            log.info("bedrock-balancer: refused to connect %s to %s:%s", peer or "a client", host, port)

    def _refusal(self, flow: http.HTTPFlow, bedrock: bool) -> BedrockError | None:
        """Why a request (or CONNECT) must not go on, whoever it is for: the proxy's own listeners are never a
        destination, and clients on other hosts may reach Bedrock only."""
        host, port = flow.request.host, flow.request.port
        if _names_this_machine(host) and port in self._own_ports():
            return BedrockError("AccessDeniedException", "bedrock-balancer: the proxy's own listeners (proxy, relay, web UI, admin) cannot be reached through the proxy")
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else ""
        if not bedrock and not clientauth.is_loopback(peer):
            return BedrockError("AccessDeniedException", "bedrock-balancer: clients on other hosts may reach only Amazon Bedrock Runtime through this proxy")
        return None

    def _own_ports(self) -> set[int]:
        """Ports of this process's listeners: the proxy's, the relay's, mitmweb's UI, the admin listener."""
        ports = set()
        if proxyserver := ctx.master.addons.get("proxyserver"):
            ports |= {address[1] for address in proxyserver.listen_addrs()}
        if "web_port" in ctx.options:
            ports.add(ctx.options.web_port)
        if self.admin is not None and self.admin.address:  # the port it got, which port 0 leaves to the system
            ports.add(self.admin.address[1])
        if self.relay is not None and self.relay.address:
            ports.add(self.relay.address[1])
        return ports

    async def request(self, flow: http.HTTPFlow) -> None:
        try:
            await self._request(flow)
        except Exception:
            # Never let a bug forward the request as it stands (to the client's original host, or to a
            # half-rewritten one): answer it here instead.
            log.exception("bedrock-balancer: internal error on %s", flow.request.pretty_url)
            state = self._flows.get(flow.id)
            if state is not None:
                _redact_client_credentials(flow.request)
                flow.response = _error_response(BedrockError("InternalServerException", "bedrock-balancer: internal error (see the proxy's log)"))
                self._finish(flow, state, error="internal error (see the proxy's log)")

    async def _request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        bedrock = self._is_bedrock(flow)
        if self.config is not None:
            try:
                refusal = self._refusal(flow, bedrock)
            except Exception:
                log.exception("bedrock-balancer: internal error while checking %s", flow.request.pretty_url)
                refusal = BedrockError("InternalServerException", "bedrock-balancer: internal error (see the proxy's log)")
            if refusal is not None:
                _redact_client_credentials(flow.request)
                flow.response = _error_response(refusal)
                log.info("bedrock-balancer: refused %s %s:%s from %s: %s", flow.request.method, flow.request.host, flow.request.port, _client_address(flow), refusal.message)
                return
        if not bedrock:
            return
        if self.relay is None:  # never forward a Bedrock request as the client signed it
            _redact_client_credentials(flow.request)
            flow.response = _error_response(NO_TARGETS)
            log.warning("bedrock-balancer: answered %s %s with a 503: %s", flow.request.method, flow.request.pretty_url, NO_TARGETS.message)
            return
        state = self._flows[flow.id] = _FlowState(time.monotonic())
        request = RequestView(flow.request)
        summary = contentview.sigv4_summary(request.header("authorization"), request.header("x-amz-date"))
        if summary is not None:  # what the client signed (no signature), for the SigV4 view
            flow.metadata[contentview.CLIENT_SIGV4_KEY] = summary
        try:
            self._check_request(flow, request)
            # Kept before the client's own limits are checked, so that a request they refuse is logged
            # with its operation, model and region.
            state.exchange = exchange = self._exchange_for(flow, request)
            state.reservation = await self._admit_client(flow, exchange)
        except BedrockError as e:
            _redact_client_credentials(flow.request)
            flow.response = _error_response(e)
            # The first line only: a signature-debugging message goes to the client, not to the logs.
            self._finish(flow, state, error=f"{e.error_type}: {e.message.partition(chr(10))[0]}")
            return
        if not exchange.request.streaming:
            await self._whole_answer(flow, state, exchange)
            return
        state.relay_token = self.relay.register(exchange)
        flow.request.scheme, flow.request.host, flow.request.port = "http", *self.relay.address
        # Only the client's forwardable headers (and Host) travel even the loopback hop: not its credentials.
        # The body is whole, and framed by its length whatever framing the client used (an HTTP/2 client may
        # send none, and the loopback is HTTP/1.1).
        keep = {n.lower() for n, _ in exchange.headers} | {"host"}
        flow.request.headers = _headers(
            [(n, v) for n, v in request.headers if n.lower() in keep]
            + [("content-length", str(len(exchange.body))), (EXCHANGE_HEADER, state.relay_token)]
        )

    async def _whole_answer(self, flow: http.HTTPFlow, state: _FlowState, exchange: Exchange) -> None:
        """mitmproxy sends a non-streamed answer whole anyway: the relay's client fetches it (with failover)
        and the flow gets it here, with no loopback hop and no upstream connection of mitmproxy's own."""
        state.waiting = task = asyncio.current_task()
        try:
            answer = await self.relay.run(exchange)
        except asyncio.CancelledError:
            if not state.client_left:
                raise  # the proxy is stopping
            task.uncancel()
            note_client_left(exchange)
            self._show_upstream_request(flow, exchange)
            flow.kill()  # nobody to answer; the error hook records it
            return
        finally:
            state.waiting = None
        flow.response = _response(answer.status, answer.headers, answer.body)
        self._show_upstream_request(flow, exchange)

    async def _watch_clients(self) -> None:
        """Stop waiting for a whole answer once its client has left: the attempt in flight is dropped, its
        upstream connection closed, rather than run to its end (or to the read timeout) for nobody.

        mitmproxy marks a client connection closed as soon as it reads its end, but the flow hears of it
        only once the request hook returns; so the hooks that wait are checked, a few times a second, and
        cancelled only where the relay says it is safe (``Exchange.cancellable``)."""
        while True:
            await asyncio.sleep(CLIENT_WATCH_INTERVAL_S)
            for state in self._flows.values():
                if state.waiting is None or state.client_left:
                    continue
                exchange = state.exchange
                if (state.waiting_for_head or exchange.cancellable) and exchange.client_gone():
                    state.client_left = True
                    state.waiting.cancel()

    def _check_request(self, flow: http.HTTPFlow, request: RequestView) -> None:
        """Hygiene, size and client authentication, on the request exactly as the client sent it."""
        clientauth.check_request(request.raw_path, request.raw_query, request.headers)
        self._check_host(flow)
        body = request.body
        if len(body) > ctx.options.bedrock_max_body:
            raise BedrockError(
                "RequestEntityTooLargeException",
                f"bedrock-balancer: the request body is {len(body)} bytes; the limit is {ctx.options.bedrock_max_body} "
                "bytes (option bedrock_max_body)",
            )
        if self.authenticator is None:
            return
        headers = request.headers
        if request.header("host") is None and flow.request.host_header:
            headers = [("host", flow.request.host_header), *headers]  # HTTP/2: the signed host is the :authority
        identity = self.authenticator.authenticate(request.method, request.raw_path, request.raw_query, headers, body)
        flow.metadata[CLIENT_NAME_KEY] = identity.name

    def _check_host(self, flow: http.HTTPFlow) -> None:
        """In regular mode the destination comes from CONNECT or the absolute URL; the Host header must agree."""
        if not isinstance(flow.client_conn.proxy_mode, (mode_specs.RegularMode, mode_specs.UpstreamMode)):
            return
        request = flow.request
        value = request.host_header
        if not value:
            return
        try:
            host, port = url.parse_authority(value, check=True)
        except ValueError:
            raise BedrockError("ValidationException", "bedrock-balancer: the Host header is not a valid host name") from None
        default_port = 443 if request.scheme == "https" else 80
        if host.lower().rstrip(".") != request.host.lower().rstrip(".") or (port or default_port) != request.port:
            raise BedrockError(
                "ValidationException",
                f"bedrock-balancer: the Host header ({value}) disagrees with the destination the client connected to "
                f"({request.host}:{request.port})",
            )

    async def _admit_client(self, flow: http.HTTPFlow, exchange: Exchange) -> tuple | None:
        """Reserve the request in its client's own budget: (reservation, tokens reserved), or None without limits."""
        name = flow.metadata.get(CLIENT_NAME_KEY)
        if self.client_limits is None or name is None:
            return None
        tokens = exchange.tokens or (quota.estimate_tokens(exchange.body) if self.client_limits.limits_tokens(name) else 0)
        reservation = await self.client_limits.admit_shared(name, tokens)
        return None if reservation is None else (reservation, tokens)

    def _exchange_for(self, flow: http.HTTPFlow, request: RequestView) -> Exchange:
        reverse = isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode)
        host = flow.request.host
        body = classify.RequestBody(request.body)  # parsed once, by whichever check needs it first
        # The operation first (without looking into the body), then whether the body is what that
        # operation needs, and only then what the body adds to the classification.
        bedrock_request = classify.classify(
            request.method, request.raw_path, "" if reverse else host, request.header("authorization"),
            request.header(classify.GUARDRAIL_HEADER), fallback_region=classify.host_region(host) if reverse else None,
            fips=classify.is_fips_host(host),
        )
        clientauth.check_body(bedrock_request.operation, request.headers, body)
        bedrock_request = classify.with_body(bedrock_request, body)
        return Exchange(
            request=bedrock_request,
            method=request.method,
            raw_path=request.raw_path,
            raw_query=request.raw_query,
            headers=forwardable_headers(request.headers),
            body=body.raw,
            tokens=quota.estimate_tokens(body) if self.config.has_budgets and bedrock_request.model_id else 0,
            affinity_key=(
                affinity.conversation_key(bedrock_request.model_id, body)
                if self.config.affinity and bedrock_request.balanceable and bedrock_request.model_id
                else None
            ),
            # mitmproxy marks the client connection as soon as it reads its end, although the flow
            # hears of it only once the request hook returns.
            client_gone=lambda: not flow.client_conn.state & ConnectionState.CAN_READ,
        )

    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = self._flows.get(flow.id)
        exchange = state.exchange if state is not None else None
        if exchange is None or not exchange.request.streaming:  # a whole answer was shown in the request hook
            return
        if PROVISIONAL_HEADER not in flow.response.headers:  # the relay refused it: its answer is final
            if flow.response.headers.get("server") == LOOPBACK_SERVER:
                del flow.response.headers["server"]
            self._show_upstream_request(flow, exchange)
            return
        try:
            await self._give_head(flow, state, exchange)
        except Exception:
            # Never let a bug send the client the provisional head.
            log.exception("bedrock-balancer: internal error on %s", flow.request.pretty_url)
            if PROVISIONAL_HEADER in flow.response.headers and flow.killable:
                _kill_without_answer(flow)

    async def _give_head(self, flow: http.HTTPFlow, state: _FlowState, exchange: Exchange) -> None:
        """A stream's head from the relay is provisional: hold it until the relay decides the real one."""
        if exchange.head is None:
            state.waiting, state.waiting_for_head = asyncio.current_task(), True
            try:
                await exchange.wait_for_head()
                # The relay has written the first frames to the loopback with its decision. Two turns of the event
                # loop (the loopback turns readable; mitmproxy's reader task takes the frames) and mitmproxy holds
                # them when this hook returns: the head and the first event then leave together, not the event a
                # turn after the head (about 0.1 ms sooner at p50, side by side; see the README's benchmarks).
                for _ in range(LOOP_TURNS_TO_READ_THE_LOOPBACK):
                    await asyncio.sleep(0)
            except asyncio.CancelledError:
                if not state.client_left:
                    raise  # the proxy is stopping
                asyncio.current_task().uncancel()
                self._client_left_before_head(flow, exchange)
                return
            finally:
                state.waiting, state.waiting_for_head = None, False
        status, headers = exchange.head
        response = flow.response
        response.status_code, response.reason, response.headers = status, status_codes.RESPONSES.get(status, ""), _headers(headers)
        if response.headers.get("content-type", "").startswith(EVENT_STREAM):  # a whole answer (an error) is sent whole
            limit = ctx.options.bedrock_stream_copy
            response.stream = contentview.bounded_copy(limit, flow) if limit > 0 else True
        self._show_upstream_request(flow, exchange)
        self._annotate(flow, exchange)

    def _client_left_before_head(self, flow: http.HTTPFlow, exchange: Exchange) -> None:
        """While the addon holds a stream's head, mitmproxy does not see its client leave; the client watch
        does. The head is never sent: the flow is killed, which hangs up the relay's loopback and so
        drops the attempt in flight."""
        exchange.stream_outcome = "client-gone"
        if exchange.attempts:
            exchange.attempts[-1].abandon()
        note_client_left(exchange)
        self._show_upstream_request(flow, exchange)
        _kill_without_answer(flow)

    def _show_upstream_request(self, flow: http.HTTPFlow, exchange: Exchange) -> None:
        """Make the flow show the request as it went upstream, so mitmweb and saved flows tell the truth."""
        target = exchange.target
        if target is None:  # nothing went upstream: the flow keeps the client's request, its credentials redacted
            _redact_client_credentials(flow.request)
            return
        request = flow.request
        # Assigned wholesale: mitmproxy's per-field setters and Headers.clear() are slow on a hot path.
        request.data.scheme, request.data.host, request.data.port = target.scheme.encode(), target.host, target.port
        request.data.path = _upstream_path_with_query(exchange).encode()
        request.headers = _headers(redacted(exchange.sent_headers))

    def response(self, flow: http.HTTPFlow) -> None:
        state = self._flows.get(flow.id)
        if state is not None:
            contentview.attach_copy(flow)
            self._finish(flow, state, error=state.exchange.error if state.exchange else None)

    def error(self, flow: http.HTTPFlow) -> None:
        state = self._flows.get(flow.id)
        if state is None:
            return
        contentview.attach_copy(flow)
        message = flow.error.msg if flow.error else "error"
        exchange = state.exchange
        if exchange is not None and exchange.request.streaming and exchange.stream_outcome is None:
            # mitmproxy gave up on the stream before the relay saw its end. If the client left, the relay's
            # attempt in flight is cancelled once mitmproxy hangs up the loopback: after this record is made.
            # (HTTP/1 says "Client disconnected"; HTTP/2 "peer closed connection", so the connection is asked too.)
            client_left = "client" in message.lower() or exchange.client_gone()
            if client_left and exchange.attempts:
                exchange.attempts[-1].abandon()
            if client_left and exchange.status in (None, 200):  # before or after the stream began
                exchange.stream_outcome = "client-gone"
            elif exchange.status == 200:
                exchange.stream_outcome = "truncated"
        self._finish(flow, state, error=(exchange.error if exchange else None) or message)

    def _annotate(self, flow: http.HTTPFlow, exchange: Exchange) -> None:
        """Comment and marker for mitmweb, from what is known so far (``_finish`` completes them)."""
        _show_in_mitmweb(flow, access_record(flow, exchange, flow.response.status_code if flow.response else None, 0.0, exchange.error))

    def _finish(self, flow: http.HTTPFlow, state: _FlowState, error: str | None) -> None:
        """The flow is done (answered, refused or failed): settle what it held, and record it."""
        self._flows.pop(flow.id, None)
        if state.relay_token is not None and self.relay is not None:
            self.relay.discard(state.relay_token)  # a stream mitmproxy never brought to the relay
        exchange = state.exchange
        self._settle_client(state)
        latency_ms = (time.monotonic() - state.started) * 1000
        status = flow.response.status_code if flow.response is not None else None
        if exchange is not None and exchange.stream_outcome == "truncated":
            error = error or "stream truncated"
        record = access_record(flow, exchange, status, latency_ms, error)
        _show_in_mitmweb(flow, record)
        _call_soon(self._record, record)  # once mitmproxy has sent the answer: not on the client's time

    def _record(self, record: dict) -> None:
        """Count the request and write its log line and access-log record."""
        if self.metrics is not None and self.admin is not None:  # nobody scrapes metrics without the admin listener
            self.metrics.observe(record)
        request_log.info(_log_line(record))
        if self.access_log is not None:
            self.access_log.write(record)

    def _settle_client(self, state: _FlowState) -> None:
        """Replace what a client's request reserved in its own budget by what it really used."""
        if state.reservation is None or self.client_limits is None:
            return
        reservation, reserved = state.reservation
        exchange = state.exchange
        # As the targets' budgets are settled: a request no region answered (every one throttled it, say) used nothing.
        answered = exchange is not None and exchange.answered
        self.client_limits.settle(reservation, exchange.usage.total(unknown=reserved) if answered else 0)


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
        "client_name": flow.metadata.get(CLIENT_NAME_KEY),
    }
    if request is not None and request.model_id != record["model"]:
        record["client_model"] = request.model_id
    if exchange is not None and exchange.stream_outcome:
        record["stream"] = exchange.stream_outcome
    if exchange is not None and exchange.first_event_ms is not None:
        record["first_event_ms"] = round(exchange.first_event_ms, 1)
    if error:
        record["error"] = _safe(error)
    return record


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("bedrock-balancer: could not start serving the new targets", exc_info=task.exception())


def _without_clients(config: config_module.Config) -> config_module.Config:
    """What of a config the relay and the router were built from: all but who the clients are."""
    return dataclasses.replace(config, clients=(), api_keys=(), client_limits=())


def _kill_without_answer(flow: http.HTTPFlow) -> None:
    """Kill a flow whose head is still the relay's provisional one: nothing reaches the client, and the flow
    (mitmweb, saved flows, the access log) keeps no answer, since there was none."""
    flow.response = None
    flow.kill()


def _freeze_startup_heap() -> None:
    """Leave what start-up built (mitmproxy, botocore's service models, the relay) out of every later garbage
    collection.

    mitmproxy makes cyclic garbage on every request (its debug-mode type checks raise and catch a TypeError
    per optional field of each request and response, and the traceback holds the frames), so the collector
    runs often, and now and then a full collection walks the whole heap. Under scripts/bench's load that
    stopped the proxy for about 50 ms every few thousand requests. With the start-up heap frozen, a full
    collection walks only what came after: about 8 ms, and the collector's share of the CPU per request
    fell from about 37 to 29 µs."""
    if gc.get_freeze_count():  # once per process: a reloaded script or another proxy started in it
        return
    gc.collect()  # what is garbage now would never be collected once frozen
    gc.freeze()


def _call_soon(callback, *args) -> None:
    """Run ``callback`` after the hook in progress, and after what mitmproxy does when the hook returns."""
    try:
        asyncio.get_running_loop().call_soon(callback, *args)
    except RuntimeError:  # no event loop (hooks called directly, in unit tests)
        callback(*args)


def _spare_legacy_log_hook() -> None:
    """Keep the line per request, and mitmproxy's own line per stream, out of its deprecated ``add_log`` hook.

    mitmproxy turns every log record into an ``add_log`` event, called on each of its ~40 addons after a
    wake-up of the event loop. For the line per request that cost about 160 µs of CPU (measured under
    scripts/bench's load with the line on and off), about as much as all the rest of the addon's work on
    the request. mitmproxy's "Streaming response from ..." line is logged just before a stream's first
    content event is read, so its ``add_log`` round delays that event (by about 0.15 ms at p50 in
    scripts/bench's phase b). Both lines still reach the terminal, mitmweb's event log and every other
    logging handler; only addons on the hook deprecated since mitmproxy 9 miss them."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, mitmproxy_log.LegacyLogEvents) and _worth_an_add_log not in handler.filters:
            handler.addFilter(_worth_an_add_log)


def _worth_an_add_log(record: logging.LogRecord) -> bool:
    if record.name == request_log.name:
        return False
    return not _is_streaming_line(record)


def _is_streaming_line(record: logging.LogRecord) -> bool:
    return record.name == MITMPROXY_SERVER_LOG and isinstance(record.msg, str) and record.msg.startswith(STREAMING_LINE)


def _defer_streaming_line() -> None:
    """Write mitmproxy's "Streaming response from ..." line a moment later, once the event loop is free.

    mitmproxy logs it between sending a stream's head to the client and forwarding the first content
    event, which the proxy has held back until it arrived (see Relay._handle): writing the line there
    (about 80 µs, most of it the terminal's) delayed that event. The record keeps its time."""
    server_log = logging.getLogger(MITMPROXY_SERVER_LOG)
    if _later_if_streaming_line not in server_log.filters:
        server_log.addFilter(_later_if_streaming_line)


def _later_if_streaming_line(record: logging.LogRecord) -> bool:
    if getattr(record, DEFERRED_ATTRIBUTE, False) or not _is_streaming_line(record):
        return True
    setattr(record, DEFERRED_ATTRIBUTE, True)
    _call_soon(logging.getLogger(record.name).handle, record)
    return False


def _client_address(flow: http.HTTPFlow) -> str | None:
    peer = flow.client_conn.peername
    return f"{peer[0]}:{peer[1]}" if peer else None


def _safe(text: str) -> str:
    """Nothing that looks like a credential or a signature, and no control character, reaches a log line."""
    text = re.sub(r"Signature=[0-9a-fA-F]+", "Signature=<redacted>", text)
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1<redacted>", text)
    return re.sub(r"[\x00-\x1f\x7f]", " ", text)[:500]


def _redact_client_credentials(request: http.Request) -> None:
    """The client's signature, session token or API key never stay in a flow that mitmweb shows or a dump saves."""
    request.headers = _headers(redacted(list(request.headers.items(multi=True))))


def _names_this_machine(host: str) -> bool:
    """Whether a destination names this machine without resolving it: loopback, unspecified, a local address."""
    host = host.strip("[]").rstrip(".").lower()
    return host == "localhost" or host.endswith(".localhost") or clientauth.is_local_address(host)


async def _resolves_to_this_machine(host: str, port: int) -> bool:
    if _names_this_machine(host):
        return True
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False  # mitmproxy's own connection attempt fails the same way
    return any(clientauth.is_local_address(str(info[4][0])) for info in infos)


def _show_in_mitmweb(flow: http.HTTPFlow, record: dict) -> None:
    """The flow's comment (where it went) and marker (failed, or failed over)."""
    flow.comment = _comment(record)
    if record.get("error") or (record["status"] or 0) >= 400:
        flow.marked = FAILURE_MARKER
    elif len(record["attempts"]) > 1:
        flow.marked = FAILOVER_MARKER


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
        f"status={'-' if record['status'] is None else record['status']} {record['latency_ms']:.0f}ms{tokens}{extra}{error}"
    )


def _upstream_path_with_query(exchange: Exchange) -> str:
    path = upstream_path(exchange, exchange.choice)
    return f"{path}?{exchange.raw_query}" if exchange.raw_query else path


def _headers(pairs: list[tuple[str, str]]) -> http.Headers:
    return http.Headers([(name.encode(), value.encode("utf-8", "surrogateescape")) for name, value in pairs])


def _response(status: int, headers: list[tuple[str, str]], body: bytes) -> http.Response:
    """A whole answer for mitmproxy to send, its body as it came (``Response.make`` would content-encode it again)."""
    headers = [*headers, ("content-length", str(len(body)))]
    now = time.time()
    # Built with empty trailers, then set to None: mitmproxy's debug-mode type check of ``trailers=None``
    # raises and catches a TypeError, whose traceback keeps this request's whole call stack (the exchange,
    # the answer) alive until the garbage collector runs; that cost more than building the response.
    response = http.Response(b"HTTP/1.1", status, status_codes.RESPONSES.get(status, "").encode(), _headers(headers), body, http.Headers(), now, now)
    response.trailers = None
    return response


class RequestView:
    """The parts of a client's request the checks, the classification and the signing read, decoded once:
    mitmproxy's header lookups decode and scan every field each time."""

    __slots__ = ("method", "raw_path", "raw_query", "headers", "body", "_folded")

    def __init__(self, request: http.Request):
        self.method = request.method
        self.raw_path, _, self.raw_query = request.path.partition("?")
        self.headers = list(request.headers.items(multi=True))
        self.body = request.raw_content or b""
        self._folded: dict[str, str] = {}
        for name, value in self.headers:
            name = name.lower()
            self._folded[name] = f"{self._folded[name]}, {value}" if name in self._folded else value

    def header(self, name: str) -> str | None:
        """A header's value (``name`` in lower case), repeated ones folded, as mitmproxy's ``headers.get`` gives it."""
        return self._folded.get(name)


def _error_response(error: BedrockError) -> http.Response:
    status, headers, body = error.wire()
    return _response(status, list(headers.items()), body)
