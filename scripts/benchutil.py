"""Shared helpers for the benchmark scripts (``scripts/bench_quota``, later ``scripts/bench``).

Nothing here talks to anything but loopback. Pieces:

* :class:`ManagedProcess` -- a subprocess in its own process group with its output in a log file,
  started until a line matches a pattern and always stopped (SIGTERM, then SIGKILL) by
  :meth:`ManagedProcess.stop`; :class:`ProcessGroup` stops a set of them in ``finally``.
* :class:`EmulatorProcess` -- ``bedrock-emulator`` run with the current interpreter, its region
  ports, and its ``/_emulator/`` control API (mode, quota, reset, requests).
* :func:`start_proxy` -- ``bedrock-balancer`` in reverse mode on a free port; the port is read from
  mitmproxy's ``listening at HOST:PORT`` line.
* :class:`BedrockLoad` -- one deterministic request mix (Converse / ConverseStream, prompt sizes,
  maxTokens) and how to send request *i* with a boto3 client, with the emulator's own token
  estimate of what each request reserves against a tokens-per-minute quota.
* :func:`open_loop` -- a fixed-arrival-rate (open-loop) load generator over a thread pool; latency
  is measured from each request's *scheduled* start, so a slow system cannot hide queueing
  (no coordinated omission).
* :func:`summarize` / :func:`markdown_table` -- success ratio, throttles, other errors, goodput and
  latency percentiles as a Markdown table.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

MODEL_ID = "us.anthropic.claude-3-5-haiku-20241022-v1:0"


def use_project_venv() -> None:
    """Re-run the calling script with the project's ``.venv`` (which ``scripts/test`` and ``scripts/proxy``
    set up) when it was started with another Python, so that ``./scripts/bench`` works as written."""
    venv_python = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.prefix).resolve() != venv_python.parent.parent.resolve():
        os.execv(str(venv_python), [str(venv_python), *sys.argv])
THROTTLE_CODES = frozenset({"throttlingexception", "toomanyrequestsexception", "servicequotaexceededexception"})


# --------------------------------------------------------------------------------------------------
# Processes


class ProcessFailed(RuntimeError):
    """A process exited (or never printed its ready line); ``output`` holds its log."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


class ManagedProcess:
    """A subprocess whose stdout+stderr go to ``log_path``; start() waits for a ready line."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    def start(self, ready: str, timeout: float = 30.0) -> re.Match:
        """Start and wait until a line matches the regex ``ready``; return that match."""
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # our own process group: stop() reaches any child it forks
        )
        pattern = re.compile(ready, re.M)
        deadline = time.monotonic() + timeout
        while True:
            text = self.output()
            match = pattern.search(text)
            if match:
                return match
            if self.proc.poll() is not None:
                raise ProcessFailed(f"{self.name} exited with status {self.proc.returncode}", self.output())
            if time.monotonic() > deadline:
                self.stop()
                raise ProcessFailed(f"{self.name} printed no line matching {ready!r} in {timeout:.0f} s", self.output())
            time.sleep(0.05)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 5.0) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=grace_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class ProcessGroup:
    """Stops every process added to it, newest first, however the block is left."""

    def __init__(self) -> None:
        self._processes: list[ManagedProcess] = []

    def add(self, process: ManagedProcess) -> ManagedProcess:
        self._processes.append(process)
        return process

    def stop_all(self) -> None:
        while self._processes:
            process = self._processes.pop()
            with contextlib.suppress(Exception):
                process.stop()

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()


def isolated_aws_env(access_key_id: str | None = None, secret: str | None = None) -> dict[str, str]:
    """This environment without any AWS setting of the user's, optionally with one key pair."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BOTO_"))}
    env.update(
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONUNBUFFERED="1",
        NO_PROXY="*",
    )
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"):
        env.pop(name, None)
    if access_key_id and secret:
        env.update(AWS_ACCESS_KEY_ID=access_key_id, AWS_SECRET_ACCESS_KEY=secret)
    return env


# --------------------------------------------------------------------------------------------------
# The emulator


class EmulatorProcess(ManagedProcess):
    """``bedrock-emulator`` (this interpreter's copy) on free loopback ports, plain HTTP."""

    def __init__(
        self,
        workdir: Path,
        regions: list[str],
        credentials: tuple[str, str],
        fast: bool = True,
        record_limit: int = 500,
    ) -> None:
        argv = [
            sys.executable, "-m", "bedrock_balancer.emulator.cli",
            "--regions", ",".join(regions),
            "--host", "127.0.0.1",
            "--credentials", f"{credentials[0]}:{credentials[1]}",
            "--record-limit", str(record_limit),
        ]
        if fast:
            argv.append("--fast")
        super().__init__("bedrock-emulator", argv, workdir / "emulator.log", isolated_aws_env())
        self.regions = list(regions)
        self.ports: dict[str, int] = {}

    def start(self, ready: str = r"^accepted access keys:", timeout: float = 30.0) -> re.Match:
        match = super().start(ready, timeout)
        for region in self.regions:
            found = re.search(rf"^{re.escape(region)} https?://[^:\s]+:(\d+)\s*$", self.output(), re.M)
            if not found:
                raise ProcessFailed(f"bedrock-emulator printed no port for {region}", self.output())
            self.ports[region] = int(found.group(1))
        return match

    def url(self, region: str) -> str:
        # 127.0.0.1 rather than the "localhost" the emulator prints: no resolver, no ::1 detour.
        return f"http://127.0.0.1:{self.ports[region]}"

    def control(self, action: str, body: dict[str, Any] | None = None, region: str | None = None) -> Any:
        """POST (or GET for health/requests) ``/_emulator/<action>`` on ``region``'s port."""
        region = region or self.regions[0]
        method = "GET" if action.split("?")[0] in ("health", "requests") else "POST"
        data = None if method == "GET" else json.dumps(body or {}).encode()
        request = urllib.request.Request(
            f"{self.url(region)}/_emulator/{action}", data=data, method=method,
            headers={"Content-Type": "application/json"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def reset(self) -> None:
        """No faults, quotas, records or holds in any region."""
        self.control("reset")

    def set_quota(self, region: str, rpm: int | None, tpm: int | None, window_s: float) -> None:
        self.control("quota", {"rpm": rpm, "tpm": tpm, "window_s": window_s}, region=region)

    def set_mode(self, region: str, mode: str) -> None:
        self.control("mode", {"mode": mode}, region=region)


# --------------------------------------------------------------------------------------------------
# The proxy


LISTENING = r"listening at (?:\[?[0-9a-fA-F:.]+\]?|[\w.-]+):(\d+)"


@dataclass
class ProxyHandle:
    process: ManagedProcess
    port: int
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def admin_page(self, path: str) -> bytes:
        """A page of the instance's admin listener (started with ``--set bedrock_admin=127.0.0.1:0``)."""
        port = re.search(r"admin listener at http://[^:]+:(\d+)", self.process.output()).group(1)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.read()

    def admin_status(self) -> dict:
        """The instance's ``/status``."""
        return json.loads(self.admin_page("/status"))

    def strategy_line(self) -> str | None:
        """The balancer's own ``bedrock-balancer: <strategy> over ...`` start-up line."""
        found = re.search(r"bedrock-balancer: (\S+ over .*)$", self.process.output(), re.M)
        return found.group(1) if found else None


def start_proxy(
    workdir: Path,
    config_text: str,
    reverse_to: str,
    credentials: tuple[str, str],
    name: str = "proxy",
    extra_args: Iterable[str] = (),
    timeout: float = 30.0,
    group: ProcessGroup | None = None,
) -> ProxyHandle:
    """``bedrock-balancer -p 0 --mode reverse:<reverse_to>`` with ``config_text`` as its YAML.

    The proxy gets ``credentials`` as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and nothing else from
    the user's AWS setup. Raises :class:`ProcessFailed` (with the output) if it does not come up.
    With ``group``, the process joins it before it starts, so the group's teardown covers it.
    """
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(config_text)
    confdir = workdir / f"{name}-confdir"
    confdir.mkdir(exist_ok=True)
    argv = [
        sys.executable, "-m", "bedrock_balancer.cli",
        "-p", "0",
        "--mode", f"reverse:{reverse_to}",
        "--set", f"bedrock_config={config_path}",
        "--set", f"confdir={confdir}",
        "--set", "flow_detail=0",  # mitmdump's own per-flow lines; the balancer still logs one per request
        *extra_args,
    ]
    process = ManagedProcess(name, argv, workdir / f"{name}.log", isolated_aws_env(*credentials))
    if group is not None:
        group.add(process)
    match = process.start(LISTENING, timeout)
    return ProxyHandle(process, int(match.group(1)), config_path)


# --------------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class RequestSpec:
    streaming: bool
    prompt: str
    max_tokens: int

    def body(self) -> dict[str, Any]:
        """The Converse body as botocore sends it (what the emulator's token estimate reads)."""
        return {
            "messages": [{"role": "user", "content": [{"text": self.prompt}]}],
            "inferenceConfig": {"maxTokens": self.max_tokens},
        }


class BedrockLoad:
    """A deterministic request mix: request *i* is the same in every scenario of a run.

    ``stream_share`` of the requests use ConverseStream (consumed to the end; a stream that ends
    without ``messageStop`` and ``metadata`` or with an exception event is a failure).
    """

    def __init__(
        self,
        model_id: str = MODEL_ID,
        stream_share: float = 0.3,
        prompt_chars: tuple[int, int] = (200, 1200),
        max_tokens: int = 512,
        seed: int = 7,
        size: int = 4096,
    ) -> None:
        rng = random.Random(seed)
        self.stream_share = stream_share
        self.max_tokens = max_tokens
        words = "the quick brown fox jumps over a lazy dog while bedrock balances regions".split()
        self.model_id = model_id
        self.specs: list[RequestSpec] = []
        for _ in range(size):
            target = rng.randint(*prompt_chars)
            text = []
            while sum(len(w) + 1 for w in text) < target:
                text.append(rng.choice(words))
            self.specs.append(RequestSpec(rng.random() < stream_share, " ".join(text)[:target], max_tokens))

    def spec(self, index: int) -> RequestSpec:
        return self.specs[index % len(self.specs)]

    def mean_reserved_tokens(self) -> float:
        """What the emulator charges a token quota when a request starts: input estimate + maxTokens."""
        from bedrock_balancer.emulator.models import reserved_tokens

        return sum(reserved_tokens(s.body()) for s in self.specs) / len(self.specs)

    def max_reserved_tokens(self) -> int:
        from bedrock_balancer.emulator.models import reserved_tokens

        return max(reserved_tokens(s.body()) for s in self.specs)

    def mean_used_tokens(self) -> float:
        """What the emulator settles a finished request at: input estimate + its reply's tokens."""
        from bedrock_balancer.emulator.models import estimate_input_tokens
        from bedrock_balancer.emulator.responses import reply_pieces

        output_tokens = len(reply_pieces("us-east-1"))  # the emulator's reply: one token per piece
        return sum(estimate_input_tokens(s.body()) + output_tokens for s in self.specs) / len(self.specs)

    def send(self, client: Any, index: int) -> dict[str, str]:
        """Send request ``index``; return its response headers. Raises on any failure."""
        spec = self.spec(index)
        kwargs = dict(modelId=self.model_id, **spec.body())
        if not spec.streaming:
            response = client.converse(**kwargs)
            if not response.get("output", {}).get("message"):
                raise IncompleteResponse("converse answered without a message")
            return response["ResponseMetadata"]["HTTPHeaders"]
        response = client.converse_stream(**kwargs)
        seen = set()
        for event in response["stream"]:
            seen.update(event)
        missing = {"messageStart", "messageStop", "metadata"} - seen
        if missing:
            raise IncompleteResponse(f"stream ended without {', '.join(sorted(missing))}")
        return response["ResponseMetadata"]["HTTPHeaders"]


class IncompleteResponse(Exception):
    """A 200 answer that is not a whole reply (a truncated stream)."""


def boto_client(endpoint_url: str, region: str, credentials: tuple[str, str], retries: dict, pool: int) -> Any:
    """A bedrock-runtime client for ``endpoint_url`` that shares ``pool`` connections across threads."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=credentials[0], aws_secret_access_key=credentials[1], region_name=region
    )
    config = Config(
        retries=retries,
        max_pool_connections=pool,
        connect_timeout=5,
        read_timeout=30,
        tcp_keepalive=True,
        proxies={},
    )
    return session.client("bedrock-runtime", endpoint_url=endpoint_url, config=config)


# --------------------------------------------------------------------------------------------------
# Load generation


@dataclass
class Outcome:
    index: int
    kind: str  # "ok", "throttle" or "error"
    latency_s: float  # from the scheduled start to the end (the whole stream for streams)
    error: str | None = None
    region: str | None = None  # the region that served a success, when known


def classify_exception(exc: BaseException) -> tuple[str, str]:
    """(``"throttle"`` or ``"error"``, a short label such as ``ServiceUnavailableException``)."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code") or type(exc).__name__)
        return ("throttle" if code.lower() in THROTTLE_CODES else "error"), code
    return "error", type(exc).__name__


def open_loop(
    rate: float,
    duration_s: float,
    send: Callable[[int], str | None],
    workers: int = 128,
    drain_timeout_s: float = 60.0,
) -> tuple[list[Outcome], float]:
    """Call ``send(i)`` at a fixed rate (request *i* at ``i / rate`` s) for ``duration_s``.

    ``send`` returns the region that served the request (or None) and raises on failure. Arrivals
    do not wait for answers (open loop); if every worker is busy a request waits in the pool's
    queue and that wait counts in its latency. Returns the outcomes and the elapsed time from the
    first arrival to the last completion. Requests still unfinished ``drain_timeout_s`` after the
    last arrival count as errors (``unfinished``).
    """
    count = max(1, int(round(rate * duration_s)))
    outcomes: list[Outcome | None] = [None] * count
    lock = threading.Lock()
    last_done = [0.0]

    def run(index: int, scheduled: float) -> None:
        region = error = None
        try:
            region = send(index)
            kind = "ok"
        except Exception as exc:  # every failure is a client-visible outcome to count
            kind, error = classify_exception(exc)
        done = time.perf_counter()
        outcomes[index] = Outcome(index, kind, done - scheduled, error, region)
        with lock:
            last_done[0] = max(last_done[0], done)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="load")
    futures = []
    start = time.perf_counter() + 0.05
    try:
        for index in range(count):
            scheduled = start + index / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(run, index, scheduled))
        concurrent.futures.wait(futures, timeout=drain_timeout_s)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    end = last_done[0] or time.perf_counter()
    result = []
    for index, outcome in enumerate(outcomes):
        if outcome is None:
            outcome = Outcome(index, "error", time.perf_counter() - (start + index / rate), "unfinished")
        result.append(outcome)
    return result, max(end - start, duration_s)


# --------------------------------------------------------------------------------------------------
# Reporting


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending list; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Row:
    scenario: str
    requests: int
    successes: int
    throttles: int
    errors: int
    goodput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    error_kinds: collections.Counter = field(default_factory=collections.Counter)
    served_by: collections.Counter = field(default_factory=collections.Counter)

    @property
    def success_pct(self) -> float:
        return 100.0 * self.successes / self.requests if self.requests else math.nan


def summarize(scenario: str, outcomes: list[Outcome], elapsed_s: float) -> Row:
    """Latency percentiles are over successful requests (what a caller waits for an answer)."""
    ok = sorted(o.latency_s * 1000 for o in outcomes if o.kind == "ok")
    return Row(
        scenario=scenario,
        requests=len(outcomes),
        successes=len(ok),
        throttles=sum(o.kind == "throttle" for o in outcomes),
        errors=sum(o.kind == "error" for o in outcomes),
        goodput=len(ok) / elapsed_s if elapsed_s > 0 else math.nan,
        p50_ms=percentile(ok, 50),
        p95_ms=percentile(ok, 95),
        p99_ms=percentile(ok, 99),
        error_kinds=collections.Counter(o.error for o in outcomes if o.kind != "ok"),
        served_by=collections.Counter(o.region or "?" for o in outcomes if o.kind == "ok"),
    )


def _ms(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.0f}"


def markdown_table(rows: list[Row]) -> str:
    header = (
        "| scenario | requests | success % | client-visible throttles | other errors "
        "| goodput (successful req/s) | p50 ms | p95 ms | p99 ms |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.requests} | {r.success_pct:.1f} | {r.throttles} | {r.errors} "
            f"| {r.goodput:.1f} | {_ms(r.p50_ms)} | {_ms(r.p95_ms)} | {_ms(r.p99_ms)} |"
        )
    return "\n".join(lines)


def counter_text(counter: collections.Counter, limit: int = 4) -> str:
    if not counter:
        return "none"
    return ", ".join(f"{name} {n}" for name, n in counter.most_common(limit))


def make_workdir(prefix: str = "bedrock-bench-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_argv(binary: str, port: int, workdir: Path) -> list[str]:
    """A throwaway redis-server on loopback: no persistence (the tests and benchmarks start it clean)."""
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)]
