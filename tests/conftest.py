"""Shared fixtures: the Bedrock emulator (TLS, three regions) and the real proxy in front of it."""

from __future__ import annotations

import os

import boto3
import pytest
from botocore.config import Config as BotoConfig

from bedrock_balancer.emulator import Emulator

from proxyharness import CLIENT_KEY, CLIENT_SECRET, PROXY_KEY, PROXY_SECRET, start_proxy

REGIONS = ["us-east-1", "us-west-2", "eu-west-1"]


@pytest.fixture(scope="session", autouse=True)
def aws_environment(tmp_path_factory):
    """The proxy's credentials live in profile 'proxy'; clients use their own keys. No instance metadata."""
    home = tmp_path_factory.mktemp("aws")
    (home / "credentials").write_text(
        f"[proxy]\naws_access_key_id = {PROXY_KEY}\naws_secret_access_key = {PROXY_SECRET}\n"
        # The right key with a wrong secret: the emulator refuses its signatures, as AWS would.
        f"[wrong-secret]\naws_access_key_id = {PROXY_KEY}\naws_secret_access_key = not-{PROXY_SECRET}\n"
    )
    (home / "config").write_text("")
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("AWS_") or name.lower() in ("https_proxy", "http_proxy", "no_proxy", "all_proxy"):
            del os.environ[name]
    os.environ.update(
        AWS_SHARED_CREDENTIALS_FILE=str(home / "credentials"),
        AWS_CONFIG_FILE=str(home / "config"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    yield home
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def emulator(tmp_path_factory, aws_environment):
    emu = Emulator(
        regions=REGIONS, tls=True, credentials={PROXY_KEY: PROXY_SECRET},
        cert_dir=str(tmp_path_factory.mktemp("emulator-certs")),
    )
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture
def emu(emulator):
    """The session's emulator, reset to healthy and empty for each test."""
    emulator.release_all()
    for region in REGIONS:
        emulator.set_mode(region, "ok")
        emulator.set_quota(region, rpm=None, tpm=None)
    emulator.clear()
    yield emulator
    emulator.release_all()


@pytest.fixture
def proxy_factory(tmp_path, emu):
    started = []

    def factory(config: dict, mode: str = "regular", **options):
        # mitmproxy keeps its context (options, certificate store) in module globals: one live proxy per process.
        assert not started, "start one proxy per test"
        proxy = start_proxy(tmp_path / f"p{len(started)}", config, emu, mode=mode, extra_options=options)
        started.append(proxy)
        return proxy

    (tmp_path).mkdir(exist_ok=True)
    yield factory
    for proxy in started:
        proxy.stop()


NO_RETRIES = BotoConfig(retries={"total_max_attempts": 1}, read_timeout=30, connect_timeout=10)


@pytest.fixture
def client_via_proxy(monkeypatch):
    """An unmodified boto3 bedrock-runtime client that reaches Bedrock through HTTPS_PROXY."""

    def make(proxy, region: str = "us-east-1", **kwargs):
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("AWS_CA_BUNDLE", proxy.ca_cert)
        return boto3.client(
            "bedrock-runtime", region_name=region, aws_access_key_id=CLIENT_KEY,
            aws_secret_access_key=CLIENT_SECRET, config=kwargs.pop("config", NO_RETRIES), **kwargs,
        )

    return make


@pytest.fixture
def client_via_endpoint():
    """A boto3 client pointed at the proxy's reverse-mode listener with endpoint_url (no CA needed)."""

    def make(proxy, region: str = "us-east-1", **kwargs):
        return boto3.client(
            "bedrock-runtime", region_name=region, endpoint_url=proxy.url, aws_access_key_id=CLIENT_KEY,
            aws_secret_access_key=CLIENT_SECRET, config=kwargs.pop("config", NO_RETRIES), **kwargs,
        )

    return make


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory):
    """A real redis-server on a free loopback port (fails, never skips, when redis-server is missing)."""
    from redisserver import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(redis_session):
    """The session's Redis, running and empty for each test."""
    if redis_session.process is None or redis_session.process.poll() is not None:
        redis_session.start()
    redis_session.flush()
    yield redis_session
    if redis_session.process is None or redis_session.process.poll() is not None:
        redis_session.start()
