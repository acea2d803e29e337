"""Cooldowns: a circuit breaker per (target, model), with exponential backoff, jitter and a half-open probe.

* A throttle (429) or a failure (5xx) from a target cools that target down *for that model*; a
  connection failure or a timeout cools the whole target (every model), since nothing there answers.
* The cooldown grows exponentially with consecutive failures (``base_s * 2**(n-1)``, at most ``max_s``)
  with jitter, so several proxies or requests do not return all at the same instant. A ``Retry-After``
  the upstream gives wins over the computed backoff.
* When the cooldown ends the circuit is half-open: one request (the probe) may go; the others treat
  the target as still cooling until the probe succeeds (closed again) or fails (a longer cooldown).

Plain code: the clock is a parameter, so tests drive it without sleeping.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

ANY_MODEL = "*"
PROBE_RECHECK_S = 0.25


@dataclass
class Circuit:
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False
    reason: str = ""

    def state(self, now: float) -> str:
        if self.failures == 0:
            return "closed"
        return "open" if now < self.open_until else "half-open"


class Cooldowns:
    def __init__(self, base_s: float = 1.0, max_s: float = 60.0, rng: random.Random | None = None, clock=time.monotonic):
        self.base_s = base_s
        self.max_s = max_s
        self.clock = clock
        self._rng = rng or random.Random()
        self._circuits: dict[tuple[str, str], Circuit] = {}

    def _keys(self, target: str, model: str | None) -> list[tuple[str, str]]:
        keys = [(target, ANY_MODEL)]
        if model:
            keys.append((target, model))
        return keys

    def available(self, target: str, model: str | None) -> bool:
        """May a request go to ``target`` for ``model`` now? (A half-open circuit admits one probe.)"""
        now = self.clock()
        return self._available_at(now, target, model) <= now

    def next_available_at(self, target: str, model: str | None) -> float:
        """When ``target`` may next be tried for ``model`` (now if it is available)."""
        return self._available_at(self.clock(), target, model)

    def _available_at(self, now: float, target: str, model: str | None) -> float:
        at = now
        for key in self._keys(target, model):
            circuit = self._circuits.get(key)
            if circuit is None or circuit.failures == 0:
                continue
            if now < circuit.open_until:
                at = max(at, circuit.open_until)
            elif circuit.probing:  # a probe is in flight: look again shortly, by when it has usually answered
                at = max(at, now + PROBE_RECHECK_S)
        return at

    def begin(self, target: str, model: str | None) -> bool:
        """Note that a request is going to ``target``; True if it is the half-open probe."""
        now = self.clock()
        probe = False
        for key in self._keys(target, model):
            circuit = self._circuits.get(key)
            if circuit is not None and circuit.failures and now >= circuit.open_until:
                circuit.probing = probe = True
        return probe

    def succeeded(self, target: str, model: str | None) -> None:
        for key in self._keys(target, model):
            self._circuits.pop(key, None)

    def failed(self, target: str, model: str | None, reason: str, whole_target: bool = False, retry_after_s: float | None = None) -> float:
        """Cool ``target`` down after a failure; returns the cooldown in seconds.

        The attempt was the verdict on every circuit it passed through. A failure of the whole target also
        ends a probe on the model's circuit (which may probe again once the target is back). A failure for
        the model, on a target-wide probe, means the target answered: whatever had cooled it is over. (A
        target-wide cooldown still running is left alone: a stream begun before it may break off meanwhile.)"""
        whole = whole_target or not model
        key = (target, ANY_MODEL) if whole else (target, model)
        other = self._circuits.get((target, model) if whole else (target, ANY_MODEL)) if model else None
        if other is not None and whole:
            other.probing = False
        elif other is not None and self.clock() >= other.open_until:
            del self._circuits[(target, ANY_MODEL)]
        circuit = self._circuits.setdefault(key, Circuit())
        circuit.failures += 1
        circuit.probing = False
        circuit.reason = reason
        if retry_after_s is not None and retry_after_s >= 0:
            cooldown = min(retry_after_s, self.max_s * 10)
        else:
            backoff = min(self.base_s * 2 ** (circuit.failures - 1), self.max_s)
            cooldown = backoff * (0.5 + self._rng.random() / 2)  # "equal jitter": between half and all of it
        circuit.open_until = self.clock() + cooldown
        return cooldown

    def release_probe(self, target: str, model: str | None) -> None:
        """A probe that ended without a verdict (e.g. the client went away) lets the next request probe."""
        for key in self._keys(target, model):
            circuit = self._circuits.get(key)
            if circuit is not None:
                circuit.probing = False

    def snapshot(self) -> list[dict]:
        """Live state for status pages: every circuit that is not closed."""
        now = self.clock()
        return [
            {
                "target": target,
                "model": None if model == ANY_MODEL else model,
                "state": circuit.state(now),
                "failures": circuit.failures,
                "seconds_left": round(max(0.0, circuit.open_until - now), 3),
                "reason": circuit.reason,
            }
            for (target, model), circuit in self._circuits.items()
            if circuit.failures
        ]


def parse_retry_after(headers_get) -> float | None:
    """Seconds to wait, from ``x-amz-retry-after`` (milliseconds, as the AWS SDKs' retry code reads it) or
    ``Retry-After`` (seconds or an HTTP date). Bedrock has not been seen sending either; a gateway in
    front of it, or the emulator, may."""
    value = headers_get("x-amz-retry-after")
    if value:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers_get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            from email.utils import parsedate_to_datetime

            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                return None
    return None
