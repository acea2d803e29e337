"""Which model identifiers a Bedrock region accepts, and how many tokens a request uses.

Model identifiers (the path's ``{modelId}``, percent-decoded):

* a foundation model id ``<provider>.<model>``, e.g. ``anthropic.claude-3-5-sonnet-20240620-v1:0``,
  with a provider Bedrock hosts;
* a system cross-region inference profile ``<geo>.<provider>.<model>``; the region serving it must
  belong to the geography (a ``us.`` profile sent to ``eu-west-1`` is refused);
* an ARN ``arn:<partition>:bedrock:<region>:<account>:<resource type>/<id>`` whose region must be
  the serving region. Foundation-model ARNs have an empty account; inference-profile ARNs also
  obey the geography rule.

Anything else is refused with AWS's ``ValidationException: The provided model identifier is
invalid.``. Bedrock does not publish the geography of every region per model; the mapping below is
the documented rough one, which is what the proxy needs to be tested against.

Token counts are estimates (about four characters a token) over the text a request carries;
reservations for quotas add the requested maximum output, as Bedrock does.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any, Iterator

INVALID_MODEL_MESSAGE = "The provided model identifier is invalid."

# Model providers on Bedrock; a made-up provider is refused like an unknown model.
KNOWN_PROVIDERS = frozenset(
    {
        "ai21",
        "amazon",
        "anthropic",
        "cohere",
        "deepseek",
        "google",
        "luma",
        "meta",
        "minimax",
        "mistral",
        "moonshot",
        "moonshotai",
        "nvidia",
        "openai",
        "qwen",
        "stability",
        "twelvelabs",
        "writer",
    }
)

GEOGRAPHIES = ("us", "us-gov", "eu", "apac", "jp", "au", "ca", "global")

ARN_RESOURCE_TYPES = frozenset(
    {
        "foundation-model",
        "inference-profile",
        "application-inference-profile",
        "provisioned-model",
        "custom-model",
        "custom-model-deployment",
        "imported-model",
        "prompt",
        "prompt-router",
        "default-prompt-router",
    }
)

_FOUNDATION_MODEL = re.compile(r"^([a-z0-9-]+)\.[A-Za-z0-9][A-Za-z0-9._:-]*$")
_ARN = re.compile(r"^arn:(aws|aws-us-gov|aws-cn):bedrock:([a-z0-9-]*):([0-9]*):([a-z-]+)/(.+)$")

# Keys whose string values are prompt text in the request shapes Bedrock takes.
_TEXT_KEYS = frozenset({"text", "prompt", "inputText", "content", "system", "texts"})
# Keys holding the maximum number of output tokens, by model family.
_MAX_TOKEN_KEYS = ("max_tokens", "maxTokens", "maxTokenCount", "max_gen_len", "max_new_tokens")
# Reserved output when a request states no maximum (a guess: Bedrock reserves the model's limit).
DEFAULT_RESERVED_OUTPUT_TOKENS = 1000


def region_in_geography(region: str, geography: str) -> bool:
    if geography == "global":
        return not region.startswith(("us-gov-", "cn-", "us-iso"))
    if geography == "us":
        return region.startswith("us-") and not region.startswith(("us-gov-", "us-iso"))
    if geography == "us-gov":
        return region.startswith("us-gov-")
    if geography == "eu":
        return region.startswith("eu-")
    if geography == "apac":
        return region.startswith("ap-") or region == "me-central-1"
    if geography == "jp":
        return region in ("ap-northeast-1", "ap-northeast-3")
    if geography == "au":
        return region in ("ap-southeast-2", "ap-southeast-4")
    if geography == "ca":
        return region.startswith("ca-")
    return False


def _split_geography(model_id: str) -> tuple[str | None, str]:
    # Longest first, so "us-gov." is not read as "us" followed by "-gov.".
    for geography in sorted(GEOGRAPHIES, key=len, reverse=True):
        if model_id.startswith(geography + "."):
            return geography, model_id[len(geography) + 1 :]
    return None, model_id


def is_foundation_model_id(model_id: str) -> bool:
    match = _FOUNDATION_MODEL.match(model_id)
    return bool(match) and match.group(1) in KNOWN_PROVIDERS


def model_id_error(model_id: str, region: str) -> str | None:
    """None when ``region`` would accept ``model_id``, else the ValidationException message."""
    if model_id.startswith("arn:"):
        return _arn_error(model_id, region)
    geography, foundation_id = _split_geography(model_id)
    if not is_foundation_model_id(foundation_id):
        return INVALID_MODEL_MESSAGE
    if geography is not None and not region_in_geography(region, geography):
        return INVALID_MODEL_MESSAGE
    return None


def _arn_error(arn: str, region: str) -> str | None:
    match = _ARN.match(arn)
    if not match:
        return INVALID_MODEL_MESSAGE
    _, arn_region, account, resource_type, resource_id = match.groups()
    if resource_type not in ARN_RESOURCE_TYPES or arn_region != region:
        return INVALID_MODEL_MESSAGE
    if resource_type == "foundation-model":
        return None if is_foundation_model_id(resource_id) else INVALID_MODEL_MESSAGE
    if not re.fullmatch(r"[0-9]{12}", account):
        return INVALID_MODEL_MESSAGE
    if resource_type == "inference-profile":
        return model_id_error(resource_id, region)
    return None


def display_model_name(model_id: str) -> str:
    """``us.anthropic.claude-3-5-sonnet-20240620-v1:0`` -> ``claude-3-5-sonnet-20240620``."""
    name = model_id.rsplit("/", 1)[-1]
    _, name = _split_geography(name)
    name = name.split(".", 1)[-1]
    return re.sub(r"-v\d+(:\d+)?$", "", name)


# --------------------------------------------------------------------------------------------------
# Token estimates


def _prompt_strings(value: Any) -> Iterator[str]:
    """Strings (or lists of strings) held directly by a text key, anywhere in the request."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in _TEXT_KEYS and isinstance(item, str):
                yield item
            elif key in _TEXT_KEYS and isinstance(item, list) and all(isinstance(i, str) for i in item):
                yield from item
            else:
                yield from _prompt_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _prompt_strings(item)


def estimate_input_tokens(request: Any) -> int:
    """About one token per four characters of prompt text; at least one."""
    characters = sum(len(text) for text in _prompt_strings(_expand_count_tokens(request)))
    return max(1, (characters + 3) // 4)


def _expand_count_tokens(request: Any) -> Any:
    """CountTokens wraps an InvokeModel body as a base64 blob: decode it so its text counts."""
    wrapper = request.get("input") if isinstance(request, dict) else None
    invoke = wrapper.get("invokeModel") if isinstance(wrapper, dict) else None
    if not isinstance(invoke, dict) or not isinstance(invoke.get("body"), str):
        return request
    try:
        return json.loads(base64.b64decode(invoke["body"], validate=True))
    except (ValueError, TypeError):
        return request


def requested_max_tokens(request: Any) -> int | None:
    """The request's maximum output tokens, whatever the model family calls it."""
    if isinstance(request, dict):
        for key in _MAX_TOKEN_KEYS:
            value = request.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        for item in request.values():
            found = requested_max_tokens(item)
            if found is not None:
                return found
    elif isinstance(request, list):
        for item in request:
            found = requested_max_tokens(item)
            if found is not None:
                return found
    return None


def reserved_tokens(request: Any) -> int:
    """What a token-per-minute quota charges when the request starts."""
    max_tokens = requested_max_tokens(request)
    if max_tokens is None:
        max_tokens = DEFAULT_RESERVED_OUTPUT_TOKENS
    return estimate_input_tokens(request) + max_tokens
