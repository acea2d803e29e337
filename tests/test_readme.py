"""The README's examples are real: its config blocks parse, its options exist."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from bedrock_balancer import config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", README, re.S)


def test_the_full_config_example_parses():
    full = next(block for block in yaml_blocks() if "targets:" in block)
    parsed = config.parse(yaml.safe_load(full))
    assert [t.name for t in parsed.targets] == ["use1", "us-west-2"]
    assert parsed.strategy == "quota" and parsed.retry.max_attempts == 4


def test_the_client_authentication_example_parses(monkeypatch, tmp_path):
    block = next(block for block in yaml_blocks() if "clients:" in block and "api_keys:" in block)
    data = yaml.safe_load(block)
    monkeypatch.setenv("TEAM_A_SECRET", "team-a-secret-0123456789")
    for entry in data.get("api_keys", []):
        if "key_file" in entry:
            secret = tmp_path / entry["key_file"]
            secret.parent.mkdir(parents=True, exist_ok=True)
            secret.write_text("team-c-api-key-0123456789\n")
    config_file = tmp_path / "balancer.yaml"
    config_file.write_text(yaml.safe_dump({**data, "targets": [{"region": "us-east-1"}]}))
    parsed = config.load_file(str(config_file))
    assert parsed.authenticates_clients


def test_every_bedrock_option_in_the_readme_exists():
    from mitmproxy.test import taddons

    from bedrock_balancer.addon import BedrockBalancer

    documented = set(re.findall(r"^\| `(bedrock_\w+)` \|", README, re.M))
    with taddons.context(BedrockBalancer()) as tctx:
        existing = {name for name in tctx.options.keys() if name.startswith("bedrock_")}
    assert documented == existing
