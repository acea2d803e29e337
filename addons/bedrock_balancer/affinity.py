"""Sticky routing keys: requests that continue the same conversation share a key.

Bedrock's prompt caching is per region: a conversation whose prefix is cached in us-east-1 is cheaper
and faster there. The key is a hash of what a conversation starts with and keeps as it grows: the
model, the system prompt and the first message (Converse and Anthropic messages), or the start of a
plain prompt. Later turns append messages, so they map to the same key.
"""

from __future__ import annotations

import hashlib
import json
from .classify import RequestBody

PROMPT_PREFIX_CHARS = 2000


def conversation_key(model_id: str | None, body: bytes | RequestBody) -> str | None:
    parsed = RequestBody.of(body).json
    if not isinstance(parsed, dict):
        return None
    messages = parsed.get("messages")
    prefix = {
        "model": model_id,
        "system": parsed.get("system"),
        "first": messages[0] if isinstance(messages, list) and messages else None,
        "prompt": _prompt_start(parsed),
    }
    if prefix["system"] is None and prefix["first"] is None and prefix["prompt"] is None:
        return None
    canonical = json.dumps(prefix, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _prompt_start(parsed: dict) -> str | None:
    for key in ("prompt", "inputText"):
        if isinstance(parsed.get(key), str):
            return parsed[key][:PROMPT_PREFIX_CHARS]
    return None
