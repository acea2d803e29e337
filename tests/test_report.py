"""scripts/report on an access log written by a real proxy run with throttles and failovers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from proxyharness import targets_for

REPORT = Path(__file__).resolve().parents[1] / "scripts" / "report"
CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"
MESSAGES = [{"role": "user", "content": [{"text": "Which region are you in?"}]}]
RETRY = {"max_attempts": 2, "deadline_s": 1, "cooldown_base_s": 0.05, "cooldown_max_s": 0.1}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPORT), *args], capture_output=True, text=True, timeout=120)


def nearest_rank(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(p / 100 * len(ordered)) - 1]


@pytest.fixture
def throttled_run(emu, proxy_factory, client_via_proxy):
    """Healthy traffic, a region that throttles (absorbed by failover), then both (seen by the client)."""
    proxy = proxy_factory({"strategy": "round-robin", "retry": RETRY, "targets": targets_for(emu, ["us-east-1", "us-west-2"])})
    client = client_via_proxy(proxy)
    client_throttles = 0
    for _ in range(4):
        client.converse(modelId=CLAUDE, messages=MESSAGES)
    emu.set_mode("us-east-1", "throttle")
    for _ in range(4):
        client.converse(modelId=CLAUDE, messages=MESSAGES)
    emu.set_mode("us-west-2", "throttle")
    for _ in range(2):
        with pytest.raises(ClientError) as caught:
            client.converse(modelId=CLAUDE, messages=MESSAGES)
        assert caught.value.response["Error"]["Code"] == "ThrottlingException"
        client_throttles += 1
    emu.set_mode("us-east-1", "ok")
    emu.set_mode("us-west-2", "ok")
    stream = client.converse_stream(modelId=CLAUDE, messages=MESSAGES)
    list(stream["stream"])
    records = proxy.access_records()
    return proxy.access_log, records, list(emu.requests), client_throttles


def test_report_table_and_chart_from_a_real_access_log(throttled_run, tmp_path):
    log, records, upstream, client_throttles = throttled_run
    assert len(records) == 11
    png = tmp_path / "chart.png"

    result = run_report(str(log), "--json", "--png", str(png))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {row["region"]: row for row in report["rows"]}
    assert report["records"] == 11 and report["skipped_lines"] == 0

    # Attempts and 429s per region are what the emulated regions really received and answered.
    sent = Counter(r.region for r in upstream)
    throttled = Counter(r.region for r in upstream if r.status == 429)
    assert throttled["us-east-1"] >= 2 and throttled["us-west-2"] >= 1
    for region in ("us-east-1", "us-west-2"):
        assert rows[region]["attempts"] == sent[region]
    assert rows["all"]["attempts"] == len(upstream)
    # Client-visible throttles are those boto3 raised; the others were absorbed by failover.
    assert rows["all"]["429 client"] == client_throttles == 2
    client_429_attempts = sum(1 for r in records if r["status"] == 429 for a in r["attempts"] if a["status"] == 429)
    assert rows["all"]["429 absorbed"] == sum(throttled.values()) - client_429_attempts
    assert rows["us-east-1"]["429 absorbed"] >= 1 and rows["us-west-2"]["429 absorbed"] == 0
    assert rows["all"]["requests"] == 11 and rows["all"]["errors"] == 2
    # Per region: requests served, latency and tokens, recomputed from the records.
    for region in {r["region"] or "-" for r in records}:
        served = [r for r in records if (r["region"] or "-") == region]
        row = rows[region]
        assert row["requests"] == len(served)
        assert row["tokens in"] == sum(r["input_tokens"] or 0 for r in served)
        assert row["tokens out"] == sum(r["output_tokens"] or 0 for r in served)
        assert row["p50 ms"] == round(nearest_rank([r["latency_ms"] for r in served], 50), 1)
        assert row["p95 ms"] == round(nearest_rank([r["latency_ms"] for r in served], 95), 1)
    assert rows["us-west-2"]["requests"] >= 4  # the failed-over ones
    assert rows["all"]["tokens out"] == 9 * 3  # 9 answered requests, 3 output tokens each (the emulator's reply)

    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    import matplotlib.image

    height, width = matplotlib.image.imread(str(png)).shape[:2]
    assert (width, height) == (1200, 700)

    # The text table carries the same numbers.
    text = run_report(str(log), "--no-png")
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"{log}: 11 requests, ")
    header = lines[1].split()
    assert header[:4] == ["region", "requests", "errors", "429"]
    all_row = next(line for line in lines if line.startswith("all "))
    assert all_row.split()[1:6] == [str(rows["all"][c]) for c in ("requests", "errors", "429 client", "attempts", "429 absorbed")]


def test_a_stream_every_region_throttled_counts_as_a_throttle_the_client_saw(tmp_path):
    # Its head was a 200, but the client got the last region's throttlingException event: a throttle the client
    # saw, and none of its 429 attempts was absorbed by failover.
    log = tmp_path / "access.jsonl"
    throttled = [{"target": t, "region": t, "status": 429, "ms": 3, "error": "stream throttlingException"} for t in ("us-east-1", "us-west-2")]
    log.write_text(json.dumps({"ts": 1700000000.0, "region": "us-west-2", "status": 200, "latency_ms": 9.0, "attempts": throttled,
                               "stream": "exception:throttlingException", "error": "gave up after 2 attempts"}) + "\n")

    rows = {r["region"]: r for r in json.loads(run_report(str(log), "--json", "--no-png").stdout)["rows"]}

    assert (rows["all"]["429 client"], rows["all"]["429 absorbed"], rows["all"]["errors"]) == (1, 0, 1)


def test_report_defaults_and_bad_input(tmp_path):
    log = tmp_path / "access.jsonl"
    log.write_text(
        json.dumps({"ts": 1700000000.0, "region": "us-east-1", "status": 200, "latency_ms": 12.0,
                    "attempts": [{"target": "a", "region": "us-east-1", "status": 200, "ms": 10}], "input_tokens": 5, "output_tokens": 2}) + "\n"
        + "not json\n"
        + json.dumps({"ts": 1700000030.0, "region": None, "status": 429, "latency_ms": 1000.0, "attempts": [], "error": "all cooling down"}) + "\n"
    )
    result = run_report(str(log))
    assert result.returncode == 0, result.stderr
    assert "(1 unreadable lines skipped)" in result.stdout
    assert (tmp_path / "access.png").read_bytes().startswith(PNG_MAGIC)  # default: next to the log
    rows = {r["region"]: r for r in json.loads(run_report(str(log), "--json", "--no-png").stdout)["rows"]}
    assert rows["-"]["429 client"] == 1 and rows["-"]["errors"] == 1 and rows["us-east-1"]["errors"] == 0
    assert run_report(str(tmp_path / "missing.jsonl")).returncode == 2
    assert run_report(str(log), "--bin", "0").returncode == 2
