"""Inference-profile geographies, and moving a model id from one region to another.

A cross-region inference profile id is ``<geo>.<model id>`` (``us.anthropic...``); Bedrock accepts it
only in a region of that geography. Foundation-model and system inference-profile ARNs name a region
that must be rewritten when the request moves. The table is AWS's published rough mapping; the real
set depends on the model, which is why a target's ``models`` allow-list exists.
"""

from __future__ import annotations

import re

GEOGRAPHIES = ("us-gov", "us", "ca", "eu", "apac", "jp", "au", "global")

_JAPAN = {"ap-northeast-1", "ap-northeast-3"}
_AUSTRALIA = {"ap-southeast-2", "ap-southeast-4"}


def region_geographies(region: str) -> tuple[str, ...]:
    """The profile geographies whose ids a region accepts, the region's own (narrowest) first."""
    if region.startswith("us-gov-"):
        return ("us-gov",)
    if region.startswith("cn-") or region.startswith("us-iso"):
        return ()
    if region.startswith("us-"):
        return ("us", "global")
    if region.startswith("ca-"):
        return ("ca", "us", "global") if region == "ca-central-1" else ("ca", "global")
    if region.startswith("eu-"):
        return ("eu", "global")
    if region in _JAPAN:
        return ("apac", "jp", "global")
    if region in _AUSTRALIA:
        return ("apac", "au", "global")
    if region.startswith("ap-") or region == "me-central-1":
        return ("apac", "global")
    return ("global",)


def profile_geography(model_id: str) -> str | None:
    """``us`` for ``us.anthropic.claude...``; None for an id that is not a cross-region profile."""
    head, dot, _ = model_id.partition(".")
    return head if dot and head in GEOGRAPHIES else None


_ARN_PREFIX = re.compile(r"^(?P<head>arn(?::|%3A)aws[a-z-]*(?::|%3A)bedrock(?::|%3A))(?P<region>[a-z0-9-]+)(?P<sep>:|%3A)", re.I)
_PROFILE_IN_ARN = re.compile(r"(?P<head>inference-profile(?:/|%2F))(?P<geo>[a-z-]+)\.", re.I)


def rewrite_for_region(model_id: str, raw_model_id: str, region: str, cross_geography: bool) -> tuple[str, str] | None:
    """The (decoded, raw) model id to send to ``region``, or None if it cannot be served there.

    The raw form keeps the client's own percent-encoding; only the region or geography text changes.
    """
    geo = _geography_of(model_id)
    new_geo = None
    if geo is not None and geo not in region_geographies(region):
        if not cross_geography or not region_geographies(region):
            return None
        new_geo = region_geographies(region)[0]
    if model_id.startswith("arn:"):
        return _rewrite_arn(model_id, region, new_geo), _rewrite_arn(raw_model_id, region, new_geo)
    if new_geo is None:
        return model_id, raw_model_id
    return new_geo + model_id[len(geo):], new_geo + raw_model_id[len(geo):]


def _geography_of(model_id: str) -> str | None:
    if model_id.startswith("arn:"):
        match = _PROFILE_IN_ARN.search(model_id)
        return profile_geography(model_id[match.start("geo"):]) if match else None
    return profile_geography(model_id)


def _rewrite_arn(text: str, region: str, new_geo: str | None) -> str:
    text = _ARN_PREFIX.sub(lambda m: m.group("head") + region + m.group("sep"), text, count=1)
    if new_geo is not None:
        text = _PROFILE_IN_ARN.sub(lambda m: m.group("head") + new_geo + ".", text, count=1)
    return text
