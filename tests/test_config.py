"""Configuration: what is accepted, and errors that name the offending field."""

from __future__ import annotations

import pytest

from bedrock_balancer import config


def test_full_example_parses():
    parsed = config.parse(
        {
            "strategy": "least-outstanding",
            "cross_geography": True,
            "timeouts": {"connect_s": 2, "read_s": 30.5},
            "targets": [
                {
                    "region": "us-east-1", "endpoint_url": "https://bedrock-runtime.us-east-1.amazonaws.com", "name": "use1",
                    "weight": 2, "profile": "prod", "role_arn": "arn:aws:iam::123456789012:role/bedrock",
                    "models": ["anthropic.*", "us.anthropic.*"],
                },
                {"region": "cn-north-1"},
            ],
        }
    )
    use1, china = parsed.targets
    assert (use1.name, use1.weight, use1.profile, use1.models) == ("use1", 2, "prod", ("anthropic.*", "us.anthropic.*"))
    assert china.endpoint_url == "https://bedrock-runtime.cn-north-1.amazonaws.com.cn"
    assert parsed.timeouts.read_s == 30.5 and parsed.strategy == "least-outstanding"


def test_regions_shortcut():
    parsed = config.from_regions(" us-east-1, us-west-2 ,")
    assert [t.name for t in parsed.targets] == ["us-east-1", "us-west-2"]
    assert parsed.targets[1].host_header == "bedrock-runtime.us-west-2.amazonaws.com"


@pytest.mark.parametrize(
    "data, field",
    [
        ({"targets": [{"region": "us-east-1"}], "stratgy": "x"}, "stratgy: unknown key"),
        ({"targets": [{"region": "us-east-1", "wieght": 2}]}, "targets[0].wieght: unknown key"),
        ({"targets": [{"region": "us-east-1"}, {"region": "mars-1"}]}, "targets[1].region"),
        ({"targets": [{"region": "us-east-1", "weight": 0}]}, "targets[0].weight"),
        ({"targets": [{"region": "us-east-1", "weight": "2"}]}, "targets[0].weight"),
        ({"targets": [{"region": "us-east-1", "endpoint_url": "bedrock.example.com"}]}, "targets[0].endpoint_url"),
        ({"targets": [{"region": "us-east-1", "endpoint_url": "https://h/path"}]}, "targets[0].endpoint_url"),
        ({"targets": [{"region": "us-east-1", "models": "anthropic.*"}]}, "targets[0].models"),
        ({"targets": [{"region": "us-east-1", "role_arn": "bedrock"}]}, "targets[0].role_arn"),
        ({"targets": [{"region": "us-east-1", "name": "a"}, {"region": "us-west-2", "name": "a"}]}, "targets[1].name"),
        ({"targets": [{"region": "us-east-1"}], "strategy": "random"}, "strategy:"),
        ({"targets": [{"region": "us-east-1"}], "cross_geography": "yes"}, "cross_geography:"),
        ({"targets": [{"region": "us-east-1"}], "timeouts": {"read_s": -1}}, "timeouts.read_s"),
        ({"targets": []}, "targets:"),
        ([], "bedrock_config:"),
    ],
)
def test_bad_config_names_the_field(data, field):
    with pytest.raises(config.ConfigError) as caught:
        config.parse(data)
    assert str(caught.value).startswith(field)


def test_bad_files(tmp_path):
    with pytest.raises(config.ConfigError, match="bedrock_config: cannot read"):
        config.load_file(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets: [")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load_file(str(bad))
    with pytest.raises(config.ConfigError, match="bedrock_regions: 'us-eest-1'"):
        config.from_regions("us-east-1,us-eest-1")


@pytest.mark.parametrize("typo, suggestion", [
    ("us-esat-1", "(did you mean us-east-1?)"),  # letters swapped: one typo
    ("us-eest-1", "(did you mean us-east-1 or us-west-1?)"),  # one letter off from either
    ("eu-wset-1", "(did you mean eu-west-1?)"),
    ("us-wst-2", "(did you mean us-west-2?)"),
])
def test_an_unknown_region_suggests_the_closest_known_ones(typo, suggestion):
    with pytest.raises(config.ConfigError) as caught:
        config.from_regions(typo)
    assert suggestion in str(caught.value)


def test_a_region_far_from_every_known_one_gets_no_suggestion():
    with pytest.raises(config.ConfigError) as caught:
        config.from_regions("xx-nowhere-9")
    assert "did you mean" not in str(caught.value)


@pytest.mark.parametrize("name", ["line\nbreak", "tab\there", "two words", "a;region=x", "a,b", "a=b", "zürich", "bell\x07", ""])
def test_a_target_name_that_cannot_travel_in_a_response_header_stops_start_up(name):
    # The name is copied into the x-bedrock-balancer-target / -attempts response headers
    # ("target=NAME;region=...;status=..., target=..."): a newline breaks the response, ';' ',' '=' make it ambiguous.
    with pytest.raises(config.ConfigError) as caught:
        config.parse({"targets": [{"region": "us-east-1"}, {"region": "us-west-2", "name": name}]})
    message = str(caught.value)
    assert message.startswith("targets[1].name:")
    assert "printable ASCII" in message and "';'" in message


def test_header_safe_target_names_and_region_derived_defaults_are_accepted():
    parsed = config.parse({"targets": [
        {"region": "us-east-1"}, {"region": "us-east-1"}, {"region": "eu-west-1", "name": "eu_primary.v2:blue/1"},
    ]})
    assert [t.name for t in parsed.targets] == ["us-east-1", "us-east-1-2", "eu_primary.v2:blue/1"]


ENDPOINT_PASSWORD = "EndpointPw123"


@pytest.mark.parametrize("endpoint_url", [
    f"https://user:{ENDPOINT_PASSWORD}@bedrock-runtime.us-east-1.amazonaws.com",  # user info
    f"https://user:{ENDPOINT_PASSWORD}@bedrock-runtime.us-east-1.amazonaws.com/path",
    f"https://user:{ENDPOINT_PASSWORD}@bedrock-runtime.us-east-1.amazonaws.com:99999",  # bad port
    f"ftp://user:{ENDPOINT_PASSWORD}@bedrock-runtime.us-east-1.amazonaws.com",  # bad scheme
    f"https://user:{ENDPOINT_PASSWORD}@",  # no host
    f"user:{ENDPOINT_PASSWORD}@bedrock-runtime.us-east-1.amazonaws.com",  # no scheme at all
])
def test_an_endpoint_url_error_never_shows_its_password(endpoint_url):
    with pytest.raises(config.ConfigError) as caught:
        config.parse({"targets": [{"region": "us-east-1", "endpoint_url": endpoint_url}]})
    message = str(caught.value)
    assert message.startswith("targets[0].endpoint_url:")
    assert ENDPOINT_PASSWORD not in message
    assert "***" in message


def test_user_info_in_an_endpoint_url_is_refused_with_its_own_reason():
    with pytest.raises(config.ConfigError) as caught:
        config.parse({"targets": [{"region": "us-east-1", "endpoint_url": f"https://user:{ENDPOINT_PASSWORD}@h.example"}]})
    assert str(caught.value) == (
        "targets[0].endpoint_url: 'https://user:***@h.example' must not carry user info (user:password@): "
        "requests to Bedrock are signed with SigV4"
    )


def test_a_yaml_syntax_error_names_the_place_but_not_the_secret_on_that_line(tmp_path):
    secret = "@Xk2pq9Lr7TzV1wQ0eN5"
    path = tmp_path / "k5.yaml"
    path.write_text(
        "targets: [{region: us-east-1}]\nclients:\n  - name: a\n    access_key_id: AKIAX1234\n"
        f"    secret_access_key: {secret}\n"
    )
    with pytest.raises(config.ConfigError) as caught:
        config.load_file(str(path))
    message = str(caught.value)
    assert message.startswith(f"bedrock_config: {path} is not valid YAML")
    assert "line 5, column 24" in message and "cannot start any token" in message
    assert "Xk2pq9" not in message and "secret_access_key" not in message


@pytest.mark.parametrize("url, shown", [
    ("redis://admin:pw@h:6379/0", "redis://admin:***@h:6379/0"),
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://admin:p/w@h:6379/0", "redis://admin:***@h:6379/0"),  # an unescaped '/' must not end the masking early
    ("admin:pw@h:6379", "admin:***@h:6379"),  # no scheme
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("memory", "memory"),
])
def test_redacted_url_masks_only_the_password(url, shown):
    assert config.redacted_url(url) == shown
