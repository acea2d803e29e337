"""Sliding-window request and token quotas, the way Bedrock throttles on-demand traffic.

A request is admitted when, over the last ``window_s`` seconds, fewer than ``rpm`` requests were
admitted and the tokens charged plus this request's reservation stay within ``tpm``. The
reservation (estimated input tokens plus the requested maximum output) is charged when the request
starts and replaced by the real usage when it completes, so a request that asked for many output
tokens but used few frees its share once done. Throttled requests are not charged.

Not thread-safe on its own: the emulator calls it from its event loop thread only, and replaces the
whole object (under its lock) when a test sets a new quota.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class Charge:
    """One admitted request's place in the window; ``tokens`` changes when it is settled."""

    admitted_at: float
    tokens: int
    expired: bool = False


class SlidingWindowQuota:
    def __init__(self, rpm: int | None, tpm: int | None, window_s: float = 60.0) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.rpm = rpm
        self.tpm = tpm
        self.window_s = window_s
        self._charges: deque[Charge] = deque()
        self._tokens_in_window = 0

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._charges and self._charges[0].admitted_at <= horizon:
            charge = self._charges.popleft()
            charge.expired = True
            self._tokens_in_window -= charge.tokens

    def admit(self, now: float, reserved_tokens: int) -> Charge | str:
        """A :class:`Charge` when admitted, else ``"requests"`` or ``"tokens"`` (which limit hit)."""
        self._expire(now)
        if self.rpm is not None and len(self._charges) >= self.rpm:
            return "requests"
        if self.tpm is not None and self._tokens_in_window + reserved_tokens > self.tpm:
            return "tokens"
        charge = Charge(now, reserved_tokens)
        self._charges.append(charge)
        self._tokens_in_window += reserved_tokens
        return charge

    def settle(self, charge: Charge, used_tokens: int) -> None:
        """Replace a reservation by the tokens actually used (if it is still in the window)."""
        if not charge.expired:
            self._tokens_in_window += used_tokens - charge.tokens
        charge.tokens = used_tokens

    @property
    def requests_in_window(self) -> int:
        return len(self._charges)

    @property
    def tokens_in_window(self) -> int:
        return self._tokens_in_window
