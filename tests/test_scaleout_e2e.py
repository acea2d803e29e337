"""Several proxy instances (separate ``bedrock-balancer`` processes: mitmproxy keeps globals) sharing
state in a real redis-server, in front of one emulator process with quotas per region."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from botocore.exceptions import ClientError

import benchutil as bu
from proxyharness import wait_for

PROXY_CREDENTIALS = ("AKIDPROXYSCALE", "proxy-scale-secret")
CLIENT_CREDENTIALS = ("AKIDCLIENTSCALE", "client-secret-never-forwarded")
REGIONS = ["us-east-1", "us-west-2"]
MODEL = "amazon.nova-lite-v1:0"
WINDOW_S = 2.0  # the proxies' (compressed) quota window
EMULATOR_WINDOW_S = 1.8  # the emulator's: a little shorter, the margin for the network between them
RPM = 4  # requests per window per region


@pytest.fixture(scope="module")
def emulator_process(tmp_path_factory):
    emulator = bu.EmulatorProcess(tmp_path_factory.mktemp("emulator"), REGIONS, PROXY_CREDENTIALS)
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture
def upstream(emulator_process):
    emulator_process.reset()
    yield emulator_process
    emulator_process.reset()


@pytest.fixture
def instances(tmp_path, upstream):
    group = bu.ProcessGroup()

    def start(count: int, state: str, targets: dict[str, dict], **top) -> list[bu.ProxyHandle]:
        config = {"strategy": "quota", "quota_window_s": WINDOW_S, **top,
                  "targets": [{"region": r, "endpoint_url": upstream.url(r), **targets.get(r, {})} for r in REGIONS]}
        return [
            bu.start_proxy(tmp_path, yaml.safe_dump(config), upstream.url(REGIONS[0]), PROXY_CREDENTIALS, f"proxy{i}",
                           extra_args=["--set", f"bedrock_state={state}", "--set", "bedrock_admin=127.0.0.1:0"], group=group)
            for i in range(count)
        ]

    yield start
    group.stop_all()


def client(proxy: bu.ProxyHandle):
    return bu.boto_client(proxy.url, "us-east-1", CLIENT_CREDENTIALS, {"total_max_attempts": 1}, 16)


def converse(c) -> str:
    response = c.converse(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}], inferenceConfig={"maxTokens": 20})
    return response["ResponseMetadata"]["HTTPHeaders"]["x-bedrock-balancer-region"]


def records(emulator) -> list[dict]:
    return emulator.control("requests")["requests"]


def most_in_any_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max((sum(1 for t in times[i:] if t < start + window) for i, start in enumerate(times)), default=0)


def gauge(proxy: bu.ProxyHandle, name: str, **labels: str) -> float:
    """One sample of a gauge on the proxy's /metrics (0 when the series is absent)."""
    wanted = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"  # as prometheus_client orders them
    for line in proxy.admin_page("/metrics").decode().splitlines():
        if line.startswith(name + wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_three_instances_never_exceed_a_region_quota(upstream, instances, redis_server):
    for region in REGIONS:
        upstream.set_quota(region, RPM, None, EMULATOR_WINDOW_S)
    proxies = instances(3, redis_server.url, {r: {"rpm": RPM} for r in REGIONS}, retry={"deadline_s": 20})
    clients = [client(p) for p in proxies]

    with ThreadPoolExecutor(24) as pool:  # 3 windows' worth of the aggregate quota, all at once
        served = list(pool.map(lambda i: converse(clients[i % 3]), range(24)))

    assert sorted(set(served)) == REGIONS
    seen = records(upstream)
    assert len(seen) == 24 and all(r["status"] == 200 for r in seen), [r["status"] for r in seen]
    for region in REGIONS:
        times = [r["ts"] for r in seen if r["region"] == region]
        assert most_in_any_window(times, EMULATOR_WINDOW_S) <= RPM
    assert all(p.admin_status()["state"]["mode"] == "shared" for p in proxies)


def test_without_shared_state_instances_overrun_the_quota(upstream, instances):
    """The control: the same load with per-instance memory state sends N times the quota."""
    for region in REGIONS:
        upstream.set_quota(region, RPM, None, EMULATOR_WINDOW_S)
    proxies = instances(3, "memory", {r: {"rpm": RPM} for r in REGIONS}, retry={"deadline_s": 20, "max_attempts": 1})
    clients = [client(p) for p in proxies]

    def attempt(i: int) -> None:
        try:
            converse(clients[i % 3])
        except Exception:
            pass

    with ThreadPoolExecutor(24) as pool:
        list(pool.map(attempt, range(24)))
    assert any(r["status"] == 429 for r in records(upstream))
    assert proxies[0].admin_status()["state"] == "memory"


def test_a_cooldown_learnt_by_one_instance_is_honoured_by_the_others(upstream, instances, redis_server):
    upstream.set_mode("us-east-1", "throttle")
    proxies = instances(3, redis_server.url, {}, retry={"cooldown_base_s": 60, "cooldown_max_s": 60})

    assert converse(client(proxies[0])) == "us-west-2"  # us-east-1 answered 429, then failover
    assert [r["region"] for r in records(upstream)] == ["us-east-1", "us-west-2"]
    for proxy in proxies[1:]:
        c = client(proxy)
        assert [converse(c) for _ in range(3)] == ["us-west-2"] * 3

    assert [r["region"] for r in records(upstream)].count("us-east-1") == 1
    page = proxies[2].admin_status()  # an instance that never saw the 429 shows the shared cooldown
    assert page["state"]["mode"] == "shared"
    assert [t["cooling_down"] for t in page["targets"]] == [True, False]
    assert [c["reason"] for c in page["cooldowns"]] == ["429 ThrottlingException"]
    # ... and so does what Prometheus scrapes from it
    cooling = [gauge(proxies[2], "bedrock_balancer_target_cooling_down", target=t, model=MODEL) for t in REGIONS]
    assert cooling == [1.0, 0.0]


def test_a_clients_limit_holds_across_instances(upstream, instances, redis_server):
    team_key = ("AKIATEAMASCALE", "team-a-secret-for-the-test")
    team = {"name": "team-a", "access_key_id": team_key[0], "secret_access_key": team_key[1], "rpm": 3}
    # A long window, so that a slow machine cannot let the window roll over mid-test.
    proxies = instances(2, redis_server.url, {r: {"rpm": 1000} for r in REGIONS}, clients=[team], quota_window_s=60)
    first, second = (bu.boto_client(p.url, "us-east-1", team_key, {"total_max_attempts": 1}, 4) for p in proxies)

    converse(first), converse(second), converse(first)  # 3 of the team's 3, spread over both instances
    with pytest.raises(ClientError) as refused:
        converse(second)

    assert refused.value.response["Error"]["Code"] == "ThrottlingException"
    assert "team-a" in refused.value.response["Error"]["Message"]
    assert len(records(upstream)) == 3  # the refused request never went upstream


def test_redis_stopped_and_restarted_mid_run(upstream, instances, redis_server):
    proxies = instances(2, redis_server.url, {r: {"rpm": 1000} for r in REGIONS})
    clients = [client(p) for p in proxies]
    errors: list[BaseException] = []
    served = [0]
    stop = threading.Event()

    def load(c) -> None:
        while not stop.is_set():
            try:
                converse(c)
                served[0] += 1
            except BaseException as e:  # noqa: BLE001 - every client-visible failure counts
                errors.append(e)

    threads = [threading.Thread(target=load, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: served[0] >= 10, 20, "traffic through shared state")
        redis_server.stop()
        wait_for(lambda: all(p.admin_status()["state"]["mode"] == "local-fallback" for p in proxies), 20, "local fallback")
        during = served[0]
        wait_for(lambda: served[0] >= during + 10, 20, "traffic while Redis is down")
        redis_server.start()
        wait_for(lambda: all(p.admin_status()["state"]["mode"] == "shared" for p in proxies), 20, "return to shared state")
        after = served[0]
        wait_for(lambda: served[0] >= after + 10, 20, "traffic after Redis is back")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == []
    for proxy in proxies:
        output = proxy.process.output()
        assert output.count("unreachable") == 1 and "answers again" in output


NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")  # Debian's: a module of its own


def l4_balancer_command(balancer: str, tmp_path: Path, front: int, ports: list[int]) -> tuple[list[str], dict[str, str]]:
    """The README's command for examples/<balancer config>, with the test's ports."""
    import shutil

    binary = shutil.which(balancer) or shutil.which(balancer, path="/usr/sbin")
    assert binary, f"{balancer} is not installed: apt-get install {balancer} (scripts/test installs it when run as root)"
    example = Path(__file__).resolve().parent.parent / "examples"
    if balancer == "haproxy":
        env = {"FRONT_PORT": str(front), "PATH": "/usr/bin:/bin"} | {f"PROXY{i}_PORT": str(port) for i, port in enumerate(ports)}
        return [binary, "-db", "-f", str(example / "haproxy.cfg")], env
    config = (example / "nginx.conf").read_text().replace("127.0.0.1:8080;", f"127.0.0.1:{front};")
    for default_port, port in zip((8081, 8082, 8083), ports):
        config = config.replace(f"127.0.0.1:{default_port} ", f"127.0.0.1:{port} ")
    (tmp_path / "nginx.conf").write_text(config)
    command = [binary, "-p", str(tmp_path), "-c", "nginx.conf"]
    if NGINX_STREAM_MODULE.exists():
        command += ["-g", f"load_module {NGINX_STREAM_MODULE};"]
    return command, {"PATH": "/usr/bin:/bin"}


@pytest.mark.parametrize("balancer", ["haproxy", "nginx"])
def test_instances_behind_an_l4_balancer_share_the_load(upstream, instances, redis_server, tmp_path, balancer):
    """examples/haproxy.cfg and examples/nginx.conf, run as the README shows, in front of two instances."""
    import socket
    import subprocess

    proxies = instances(2, redis_server.url, {r: {"rpm": 1000} for r in REGIONS})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        front = s.getsockname()[1]
    # The examples name three instances; the third port repeats the second's.
    command, env = l4_balancer_command(balancer, tmp_path, front, [proxies[0].port, proxies[1].port, proxies[1].port])
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def listening() -> bool:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                socket.create_connection(("127.0.0.1", front), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_for(listening, 10, balancer)
        front_door = bu.ProxyHandle(proxies[0].process, front, proxies[0].config_path)

        def one(_: int) -> str:
            return converse(client(front_door))  # a new client, a new connection: the balancer spreads them

        with ThreadPoolExecutor(8) as pool:
            served = list(pool.map(one, range(16)))
    finally:
        process.terminate()
        process.wait(10)
    assert len(served) == 16 and set(served) == set(REGIONS)
    per_instance = [p.process.output().count("bedrock Converse") for p in proxies]
    assert sum(per_instance) == 16 and all(n > 0 for n in per_instance), per_instance
