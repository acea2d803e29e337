"""Run the real proxy (mitmproxy's DumpMaster with the balancer addon) for end-to-end tests.

The proxy runs on its own asyncio loop in a thread, as mitmdump would run it; tests talk to it with
real clients (boto3, the AWS CLI, curl) over loopback. Start-up is synchronised on mitmproxy's own
``running`` hook, not on sleeps.
"""

from __future__ import annotations

import asyncio
import json
import threading
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
        self.balancer.access_log.flush()
        return [json.loads(line) for line in self.access_log.read_text().splitlines()]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.master.shutdown)
        self.thread.join(timeout=10)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def start_proxy(tmp_path: Path, config: dict, emulator, mode: str = "regular", extra_options: dict | None = None) -> RunningProxy:
    from mitmproxy.options import Options
    from mitmproxy.tools.dump import DumpMaster

    from bedrock_balancer.addon import BedrockBalancer

    confdir = tmp_path / "proxy-confdir"
    confdir.mkdir(parents=True, exist_ok=True)
    config_path = write_config(tmp_path / "balancer.yaml", config)
    access_log = tmp_path / "access.jsonl"
    ready = _Ready()
    holder: dict = {}

    async def main() -> None:
        master = DumpMaster(Options(), with_termlog=False, with_dumper=False)
        master.addons.add(BedrockBalancer(), ready)
        master.options.update(
            listen_host="127.0.0.1", listen_port=0, mode=[mode], confdir=str(confdir),
            connection_strategy="lazy", ssl_verify_upstream_trusted_ca=emulator.ca_path,
            bedrock_config=str(config_path), bedrock_access_log=str(access_log), **(extra_options or {}),
        )
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
