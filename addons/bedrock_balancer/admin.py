"""Metrics and live status: Prometheus ``/metrics`` and JSON ``/status`` on the admin listener.

Counters and histograms are fed one access record per finished request (:meth:`Metrics.observe`);
the per-target state (cooling down or not, quota headroom, requests in flight, latency average) is read
from the router when scraped, so it is always current. With shared state (Redis), cooldowns and quota
usage are read from there, so every instance shows the same; requests in flight and latency are each
instance's own. Each proxy has its own registry.

The admin listener (option ``bedrock_admin``, e.g. ``127.0.0.1:9090``) is off by default. It has no
authentication: bind it to loopback or a private interface.
"""

from __future__ import annotations

import json
import time

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .quota import target_budgets
from .routing import Router

# An access record's "stream" when the client got a stream that ended in a throttling event (every region throttled it).
THROTTLED_STREAM = "exception:throttlingException"

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
MAX_MODEL_LABELS = 100  # model ids come from clients: bound the label set


class Metrics:
    def __init__(self, router: Router):
        self.router = router
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "bedrock_balancer_requests", "Requests answered, by the target that served them (or '-')",
            ["target", "region", "model", "operation", "status"], registry=r,
        )
        self.attempts = Counter("bedrock_balancer_attempts", "Upstream attempts", ["target", "region", "status"], registry=r)
        self.failovers = Counter("bedrock_balancer_failovers", "Requests that needed more than one attempt", ["operation"], registry=r)
        self.client_throttles = Counter(
            "bedrock_balancer_client_throttles",
            "Requests whose client got a throttle: a 429, or a stream that ended in a throttlingException event", ["operation"], registry=r
        )
        self.truncated_streams = Counter(
            "bedrock_balancer_truncated_streams", "Streams that broke after content reached the client", ["target"], registry=r
        )
        self.upstream_latency = Histogram(
            "bedrock_balancer_upstream_latency_seconds", "Time from sending an attempt to its response headers",
            ["target"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.first_event = Histogram(
            "bedrock_balancer_time_to_first_event_seconds", "Streams: time from the request to the first content event",
            ["target"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter("bedrock_balancer_tokens", "Tokens used, from the answers", ["target", "direction"], registry=r)
        self._models: set[str] = set()
        self._target_state = _TargetState(router)
        r.register(self._target_state)

    def observe(self, record: dict) -> None:
        operation = record.get("operation") or "-"
        target = record.get("target") or "-"
        status = str(record.get("status") or 0)
        self.requests.labels(target, record.get("region") or "-", self._model_label(record.get("model")), operation, status).inc()
        for attempt in record.get("attempts", []):
            self.attempts.labels(attempt["target"], attempt["region"], str(attempt["status"] or 0)).inc()
            self.upstream_latency.labels(attempt["target"]).observe(attempt["ms"] / 1000)
        if len(record.get("attempts", [])) > 1:
            self.failovers.labels(operation).inc()
        if record.get("status") == 429 or record.get("stream") == THROTTLED_STREAM:
            self.client_throttles.labels(operation).inc()
        if record.get("stream") == "truncated":
            self.truncated_streams.labels(target).inc()
        if record.get("first_event_ms") is not None:
            self.first_event.labels(target).observe(record["first_event_ms"] / 1000)
        for direction in ("input", "output"):
            if record.get(f"{direction}_tokens"):
                self.tokens.labels(target, direction).inc(record[f"{direction}_tokens"])

    def _model_label(self, model: str | None) -> str:
        if not model:
            return "-"
        if model in self._models or len(self._models) < MAX_MODEL_LABELS:
            self._models.add(model)
            return model
        return "other"

    def exposition(self, shared: dict | None = None) -> bytes:
        """The scrape; ``shared``: the shared state's view (as for :func:`status`), for the per-target gauges."""
        self._target_state.shared = shared
        try:
            return generate_latest(self.registry)
        finally:
            self._target_state.shared = None


class _TargetState:
    """Gauges read from the router at scrape time."""

    def __init__(self, router: Router):
        self.router = router
        self.shared: dict | None = None  # set for the duration of a scrape

    def describe(self):
        return []

    def collect(self):
        cooling = GaugeMetricFamily(
            "bedrock_balancer_target_cooling_down", "1 while the target (for a model, or '*' for all) is cooling down",
            labels=["target", "model"],
        )
        headroom = GaugeMetricFamily(
            "bedrock_balancer_quota_headroom_ratio", "Fraction of a budget left in the current window",
            labels=["target", "budget", "kind"],
        )
        outstanding = GaugeMetricFamily("bedrock_balancer_outstanding_requests", "Requests in flight", labels=["target"])
        shared = self.shared
        for entry in shared["cooldowns"] if shared is not None else self.router.cooldowns.snapshot():
            cooling.add_metric([entry["target"], entry["model"] or "*"], 1.0 if entry["state"] != "closed" and entry["seconds_left"] > 0 else 0.0)
        for target in self.router.config.targets:
            outstanding.add_metric([target.name], self.router.outstanding.get(target.name, 0))
            for budget in _budget_usage(self.router, target, shared["usage"] if shared is not None else None):
                for kind in ("rpm", "tpm"):
                    if budget[kind]:
                        used = budget["requests"] if kind == "rpm" else budget["tokens"]
                        headroom.add_metric([target.name, budget["budget"], kind], 1 - used / budget[kind])
        yield from (cooling, headroom, outstanding)


def _budget_usage(router: Router, target, shared_usage: dict | None = None) -> list[dict]:
    usage = []
    for key, budget in target_budgets(target):
        requests, tokens = shared_usage.get(key, (0, 0)) if shared_usage is not None else router.ledger.usage(key)
        usage.append({"budget": key[1], "rpm": budget.rpm, "tpm": budget.tpm, "requests": requests, "tokens": tokens})
    return usage


def status(router: Router, metrics: Metrics | None = None, shared: dict | None = None) -> dict:
    """The live state, for ``/status`` and the ``bedrock.status`` command. ``shared``: the shared state's
    budgets and circuits (:meth:`.state.RedisState.shared_status`), shown instead of this process's own."""
    now_wall = time.time()
    cooldowns = shared["cooldowns"] if shared is not None else router.cooldowns.snapshot()
    for entry in cooldowns:
        entry["until"] = round(now_wall + entry["seconds_left"], 3)
    targets = []
    for target in router.config.targets:
        cooling = [c for c in cooldowns if c["target"] == target.name and c["seconds_left"] > 0]
        targets.append(
            {
                "name": target.name,
                "region": target.region,
                "endpoint_url": target.endpoint_url,
                "weight": target.weight,
                "priority": target.priority,
                "outstanding": router.outstanding.get(target.name, 0),
                "latency_ewma_ms": round(router.latency_ms[target.name], 1) if target.name in router.latency_ms else None,
                "cooling_down": bool(cooling),
                "budgets": _budget_usage(router, target, shared["usage"] if shared is not None else None),
            }
        )
    return {
        "strategy": router.config.strategy,
        "quota_window_s": router.config.quota_window_s,
        "targets": targets,
        "cooldowns": cooldowns,
        "state": router.shared_state.status() if router.shared_state is not None else "memory",
    }


class AdminServer:
    def __init__(self, router: Router, metrics: Metrics):
        self.router = router
        self.metrics = metrics
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        self.address = site._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(await self._shared()), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(status(self.router, self.metrics, await self._shared()), indent=2), content_type="application/json")

    async def _shared(self) -> dict | None:
        """The shared state's budgets and circuits; None without shared state, or while Redis is unreachable."""
        backend = self.router.shared_state
        return await backend.shared_status() if hasattr(backend, "shared_status") else None


def parse_listen_address(value: str) -> tuple[str, int]:
    """``127.0.0.1:9090``, ``[::1]:9090`` or ``9090`` (loopback)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host, int(port)
