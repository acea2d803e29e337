"""Choosing targets: strategies, eligibility, geographies, model-id rewriting."""

from __future__ import annotations

from collections import Counter

import pytest

from bedrock_balancer import config, geography
from bedrock_balancer.classify import classify
from bedrock_balancer.errors import BedrockError
from bedrock_balancer.routing import NotYet, Router

HOST = "bedrock-runtime.us-east-1.amazonaws.com"


def router(targets, **top) -> Router:
    return Router(config.parse({"targets": targets, **top}))


def converse(model="anthropic.claude-v2%3A1", host=HOST):
    return classify("POST", f"/model/{model}/converse", host, None, None)


def test_smooth_weighted_round_robin_interleaves():
    r = router([{"region": "us-east-1", "weight": 2}, {"region": "us-west-2"}])
    picks = [r.choose(converse()).target.region for _ in range(6)]
    assert picks == ["us-east-1", "us-west-2", "us-east-1"] * 2


def test_a_target_excluded_for_a_request_is_not_chosen_again_for_it():
    r = router([{"region": "us-east-1", "priority": 0}, {"region": "us-west-2", "priority": 1}], strategy="priority")
    assert r.choose(converse()).target.region == "us-east-1"
    assert r.choose(converse(), excluded={"us-east-1"}).target.region == "us-west-2"
    with pytest.raises(NotYet) as nothing_left:
        r.choose(converse(), excluded={"us-east-1", "us-west-2"})
    assert nothing_left.value.retry_at == float("inf") and "no access" in nothing_left.value.reason


def test_least_outstanding_prefers_fewest_in_flight_per_weight():
    r = router([{"region": "us-east-1"}, {"region": "us-west-2", "weight": 2}], strategy="least-outstanding")
    east, west = r.config.targets
    r.started(west)
    assert r.choose(converse()).target is east
    r.started(east)
    r.started(east)
    assert r.choose(converse()).target is west  # 2/1 in flight vs 1/2
    r.finished(east)
    r.finished(east)
    picks = Counter(r.choose(converse()).target.name for _ in range(4))
    assert picks == {"us-east-1": 4}


def test_least_outstanding_rotates_among_ties():
    r = router([{"region": "us-east-1"}, {"region": "us-west-2"}], strategy="least-outstanding")
    assert {r.choose(converse()).target.region for _ in range(2)} == {"us-east-1", "us-west-2"}


def test_region_bound_requests_only_go_to_the_clients_region():
    r = router([{"region": "us-east-1"}, {"region": "us-west-2"}, {"region": "us-west-2", "name": "second-account"}])
    request = classify("POST", "/guardrail/g/version/1/apply", "bedrock-runtime.us-west-2.amazonaws.com", None, None)
    assert {r.choose(request).target.name for _ in range(4)} == {"us-west-2", "second-account"}


def test_region_bound_without_a_target_in_that_region_is_explained():
    r = router([{"region": "us-east-1"}])
    request = classify("POST", "/guardrail/g/version/1/apply", "bedrock-runtime.eu-west-1.amazonaws.com", None, None)
    with pytest.raises(BedrockError, match="must stay in region eu-west-1"):
        r.choose(request)


def test_requests_stay_in_their_partition():
    r = router([{"region": "us-east-1"}, {"region": "cn-north-1"}, {"region": "cn-northwest-1"}, {"region": "us-gov-west-1"}])
    china = converse("amazon.nova-lite-v1%3A0", host="bedrock-runtime.cn-north-1.amazonaws.com.cn")
    assert {r.choose(china).target.region for _ in range(4)} == {"cn-north-1", "cn-northwest-1"}
    assert {r.choose(converse("amazon.nova-lite-v1%3A0")).target.region for _ in range(4)} == {"us-east-1"}
    with pytest.raises(BedrockError, match="from eu-isoe-west-1 .* partitions"):
        r.choose(converse("amazon.nova-lite-v1%3A0", host="bedrock-runtime.eu-isoe-west-1.amazonaws.com"))


def test_requests_to_a_fips_endpoint_go_only_to_fips_targets():
    fips_host = "bedrock-runtime-fips.us-east-1.amazonaws.com"
    r = router([{"region": "us-east-1"}, {"region": "us-west-2", "endpoint_url": "https://bedrock-runtime-fips.us-west-2.amazonaws.com"}])
    assert {r.choose(converse(host=fips_host)).target.region for _ in range(4)} == {"us-west-2"}
    assert {r.choose(converse()).target.region for _ in range(4)} == {"us-east-1", "us-west-2"}  # FIPS serves anyone
    plain = router([{"region": "us-east-1"}])
    with pytest.raises(BedrockError, match="sent to a FIPS endpoint, and no configured target is one"):
        plain.choose(converse(host=fips_host))
    privatelink = router([{"region": "us-east-1", "endpoint_url": "https://vpce-0a1b2c3d-e4f5.bedrock-runtime-fips.us-east-1.vpce.amazonaws.com"}])
    assert privatelink.choose(converse(host=fips_host)).target.fips  # a FIPS PrivateLink endpoint is one too


def test_profiles_need_a_matching_geography_unless_crossing_is_allowed():
    targets = [{"region": "eu-west-1"}, {"region": "ap-northeast-1"}]
    with pytest.raises(BedrockError, match="no configured target"):
        router(targets).choose(converse("us.anthropic.claude-v2%3A1"))
    crossing = router(targets, cross_geography=True)
    chosen = [crossing.choose(converse("us.anthropic.claude-v2%3A1")) for _ in range(2)]
    assert {(c.target.region, c.model_id, c.raw_model_id) for c in chosen} == {
        ("eu-west-1", "eu.anthropic.claude-v2:1", "eu.anthropic.claude-v2%3A1"),
        ("ap-northeast-1", "apac.anthropic.claude-v2:1", "apac.anthropic.claude-v2%3A1"),
    }


def test_global_profiles_go_anywhere_commercial():
    r = router([{"region": "eu-west-1"}, {"region": "us-east-1"}])
    assert {r.choose(converse("global.anthropic.claude-v2%3A1")).target.region for _ in range(2)} == {"eu-west-1", "us-east-1"}


def test_models_allow_list_uses_globs_on_the_id_sent():
    r = router([{"region": "us-east-1", "models": ["us.anthropic.*"]}, {"region": "eu-west-1", "models": ["amazon.*"]}])
    assert r.choose(converse("us.anthropic.claude-v2%3A1")).target.region == "us-east-1"
    with pytest.raises(BedrockError):
        r.choose(converse("anthropic.claude-v2%3A1"))


@pytest.mark.parametrize(
    "model_id, raw, region, expected",
    [
        ("anthropic.claude-v2:1", "anthropic.claude-v2%3A1", "eu-west-1", ("anthropic.claude-v2:1", "anthropic.claude-v2%3A1")),
        ("us.anthropic.claude-v2:1", "us.anthropic.claude-v2%3A1", "us-west-2", ("us.anthropic.claude-v2:1", "us.anthropic.claude-v2%3A1")),
        (
            "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-v2:1",
            "arn%3Aaws%3Abedrock%3Aus-east-1%3A%3Afoundation-model%2Fanthropic.claude-v2%3A1",
            "us-west-2",
            (
                "arn:aws:bedrock:us-west-2::foundation-model/anthropic.claude-v2:1",
                "arn%3Aaws%3Abedrock%3Aus-west-2%3A%3Afoundation-model%2Fanthropic.claude-v2%3A1",
            ),
        ),
        (
            "arn:aws:bedrock:us-east-1:123:inference-profile/us.anthropic.claude-v2:1",
            "arn:aws:bedrock:us-east-1:123:inference-profile/us.anthropic.claude-v2:1",  # curl-style, ':' not encoded
            "us-west-2",
            (
                "arn:aws:bedrock:us-west-2:123:inference-profile/us.anthropic.claude-v2:1",
                "arn:aws:bedrock:us-west-2:123:inference-profile/us.anthropic.claude-v2:1",
            ),
        ),
        ("arn:aws:bedrock:us-east-1:123:inference-profile/us.anthropic.claude-v2:1", "x", "eu-west-1", None),
        ("eu.amazon.nova-lite-v1:0", "eu.amazon.nova-lite-v1%3A0", "us-east-1", None),
    ],
)
def test_rewrite_for_region(model_id, raw, region, expected):
    assert geography.rewrite_for_region(model_id, raw, region, cross_geography=False) == expected


def test_geographies_of_regions():
    assert geography.region_geographies("ap-northeast-1") == ("apac", "jp", "global")
    assert geography.region_geographies("us-gov-west-1") == ("us-gov",)
    assert geography.profile_geography("us-gov.anthropic.x") == "us-gov"
    assert geography.profile_geography("amazon.nova-lite-v1:0") is None
