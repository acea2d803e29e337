"""Request and token budgets per target (and per model), the way Bedrock counts them.

Bedrock throttles mainly on tokens per minute: when a request starts it reserves the input tokens plus
the request's ``max_tokens``; when it completes the reservation is settled to the real usage. The
ledger does the same with a sliding window per budget:

* :meth:`QuotaLedger.reserve` when a request is sent (1 request, estimated input + max tokens);
* :meth:`QuotaLedger.settle` when it completes (real input + output tokens; 0 if it never ran);
* :meth:`QuotaLedger.headroom` tells how much of each budget would be left after this request, as a
  fraction (negative: it would exceed the budget), which the ``quota`` strategy maximises;
* :meth:`QuotaLedger.next_fit_at` tells when the window will have made room for it.

Plain code with an injectable clock.
"""

from __future__ import annotations

import fnmatch
import time
from collections import deque
from dataclasses import dataclass, field
from .classify import RequestBody

DEFAULT_MAX_TOKENS = 1000  # reserved when a request names no maximum (the emulator does the same)
CHARS_PER_TOKEN = 4
_TEXT_KEYS = {"text", "prompt", "inputText", "content", "system"}
_SKIPPED_KEYS = {"bytes", "source", "image", "document", "video", "data"}


@dataclass(frozen=True)
class Budget:
    """A limit over the quota window; ``None`` means unlimited."""

    rpm: int | None = None
    tpm: int | None = None


@dataclass(eq=False)
class _Entry:
    at: float
    tokens: int
    expired: bool = False


@dataclass
class _Window:
    entries: deque = field(default_factory=deque)
    tokens: int = 0


@dataclass
class Reservation:
    entries: list[tuple[tuple[str, str], _Entry]]
    tokens: int


class QuotaLedger:
    def __init__(self, window_s: float = 60.0, clock=time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}

    def _window(self, key: tuple[str, str]) -> _Window:
        window = self._windows.setdefault(key, _Window())
        horizon = self.clock() - self.window_s
        while window.entries and window.entries[0].at <= horizon:
            entry = window.entries.popleft()
            entry.expired = True
            window.tokens -= entry.tokens
        return window

    def usage(self, key: tuple[str, str]) -> tuple[int, int]:
        """(requests, tokens) in the current window."""
        window = self._window(key)
        return len(window.entries), window.tokens

    def headroom(self, budgets: list[tuple[tuple[str, str], Budget]], tokens: int) -> float | None:
        """The smallest fraction of any budget left after this request; None when nothing is limited."""
        worst = None
        for key, budget in budgets:
            requests, used = self.usage(key)
            if budget.rpm:
                worst = _min(worst, (budget.rpm - requests - 1) / budget.rpm)
            if budget.tpm:
                worst = _min(worst, (budget.tpm - used - tokens) / budget.tpm)
        return worst

    def next_fit_at(self, budgets: list[tuple[tuple[str, str], Budget]], tokens: int) -> float:
        """When this request would fit every budget, as the window slides (now if it fits)."""
        now = self.clock()
        at = now
        for key, budget in budgets:
            window = self._window(key)
            entries = window.entries
            if budget.rpm and len(entries) + 1 > budget.rpm:
                at = max(at, entries[len(entries) - budget.rpm].at + self.window_s)
            if budget.tpm and window.tokens + tokens > budget.tpm and entries:
                excess, freed = window.tokens + min(tokens, budget.tpm) - budget.tpm, 0
                for entry in entries:
                    freed += entry.tokens
                    if freed >= excess:
                        at = max(at, entry.at + self.window_s)
                        break
                else:
                    at = max(at, entries[-1].at + self.window_s)
        return at

    def reserve(self, budgets: list[tuple[tuple[str, str], Budget]], tokens: int) -> Reservation:
        now = self.clock()
        reservation = Reservation([], tokens)
        for key, _ in budgets:
            entry = _Entry(now, tokens)
            window = self._window(key)
            window.entries.append(entry)
            window.tokens += tokens
            reservation.entries.append((key, entry))
        return reservation

    def settle(self, reservation: Reservation, tokens: int) -> None:
        """Replace the reserved tokens by what the request really used."""
        for key, entry in reservation.entries:
            if not entry.expired:  # still counted in its window
                self._windows[key].tokens += tokens - entry.tokens
            entry.tokens = tokens
        reservation.tokens = tokens


def target_budgets(target) -> list[tuple[tuple[str, str], Budget]]:
    """Every budget ``target`` has, whatever the model: its own, then one per ``model_quotas`` pattern."""
    budgets = [((target.name, "*"), Budget(target.rpm, target.tpm))] if (target.rpm or target.tpm) else []
    return budgets + [((target.name, pattern), budget) for pattern, budget in target.model_quotas]


def budgets_for(target, model_id: str | None) -> list[tuple[tuple[str, str], Budget]]:
    """The budgets a request to ``target`` for ``model_id`` counts against: the target's, and the
    first of its ``model_quotas`` whose pattern matches the model."""
    budgets = []
    if target.rpm or target.tpm:
        budgets.append(((target.name, "*"), Budget(target.rpm, target.tpm)))
    if model_id:
        resource = model_id.rpartition("/")[2]
        for pattern, budget in target.model_quotas:
            if fnmatch.fnmatchcase(model_id, pattern) or fnmatch.fnmatchcase(resource, pattern):
                budgets.append(((target.name, pattern), budget))
                break
    return budgets


def estimate_tokens(body: bytes | RequestBody) -> int:
    """What Bedrock reserves for a request: estimated input tokens plus its maximum output tokens."""
    body = RequestBody.of(body)
    parsed = body.json
    if parsed is None:  # empty, or not JSON
        return len(body.raw) // CHARS_PER_TOKEN + DEFAULT_MAX_TOKENS
    if not isinstance(parsed, dict):
        return DEFAULT_MAX_TOKENS
    try:
        return _text_length(parsed) // CHARS_PER_TOKEN + max_tokens_of(parsed)
    except RecursionError:  # absurdly nested
        return len(body.raw) // CHARS_PER_TOKEN + DEFAULT_MAX_TOKENS


def max_tokens_of(body: dict) -> int:
    candidates = (
        body.get("max_tokens"),  # Anthropic, Mistral, Cohere (invoke)
        (body.get("inferenceConfig") or {}).get("maxTokens") if isinstance(body.get("inferenceConfig"), dict) else None,  # Converse
        (body.get("inferenceConfig") or {}).get("max_new_tokens") if isinstance(body.get("inferenceConfig"), dict) else None,  # Nova
        body.get("max_gen_len"),  # Llama
        (body.get("textGenerationConfig") or {}).get("maxTokenCount") if isinstance(body.get("textGenerationConfig"), dict) else None,  # Titan
    )
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return DEFAULT_MAX_TOKENS


def _text_length(value, key: str | None = None) -> int:
    if isinstance(value, str):
        return len(value) if key in _TEXT_KEYS else 0
    if isinstance(value, dict):
        return sum(_text_length(v, k) for k, v in value.items() if k not in _SKIPPED_KEYS)
    if isinstance(value, list):
        return sum(_text_length(v, key) for v in value)
    return 0


def _min(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)
