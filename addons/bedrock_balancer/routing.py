"""Choose a target for a classified request.

First the targets that *may* serve it (eligibility: region-bound requests stay in the client's region;
a target's ``models`` allow-list; inference-profile geographies). Then those that *can* now (not
cooling down, see :mod:`.health`; room left in their budgets, see :mod:`.quota`). Then the strategy:

* ``quota`` (default): the target with the most headroom left in its rpm/tpm budgets after this
  request; ties (for instance targets without budgets) go by weighted round-robin.
* ``round-robin``: smooth weighted round-robin (nginx's algorithm): each target gets its weight's share,
  interleaved rather than in bursts.
* ``least-outstanding``: the fewest requests in flight relative to weight; ties in rotation.
* ``priority``: the lowest ``priority`` value that has an available target, weighted round-robin inside
  that tier; the next tier only takes traffic when the whole tier is cooling down or out of budget
  (prompt caches stay warm in the preferred region).
* ``latency``: the lowest moving average (EWMA) of recent latencies; targets not measured (for a minute)
  first, in turn.

With ``affinity`` on, a request whose conversation prefix was served recently goes back to the same
target while that target is available, for prompt-cache hits.

When targets are eligible but none is available now, :class:`NotYet` says when one will be.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass

from .classify import BedrockRequest
from .config import Config, Target, partition_of
from .errors import BedrockError
from .geography import rewrite_for_region
from .health import Cooldowns
from .quota import QuotaLedger, budgets_for

LATENCY_EWMA_ALPHA = 0.3
# A target not measured for this long is tried again, as if never measured: one slow spell must not keep
# it out of the ``latency`` strategy for good.
LATENCY_STALE_S = 60.0


@dataclass(frozen=True, slots=True)
class Choice:
    target: Target
    model_id: str | None  # the model id as it will be sent to the target (rewritten if needed)
    raw_model_id: str | None


@dataclass(slots=True)
class Rotation:
    """Smooth weighted round-robin's running weights (target name -> current weight).

    ``last_step`` holds the targets the latest round-robin step went over (None when the latest choice
    was not made by rotation): a shared state backend decides on a copy of the shared weights, then
    applies the same step to them only if its reservation is made (see :mod:`.state`)."""

    weights: dict[str, int]
    last_step: list[Target] | None = None


class NotYet(Exception):
    """Targets may serve the request, but none can right now; try again at ``retry_at`` (monotonic)."""

    def __init__(self, retry_at: float, reason: str):
        super().__init__(reason)
        self.retry_at = retry_at
        self.reason = reason


class Router:
    def __init__(self, config: Config, cooldowns: Cooldowns | None = None, ledger: QuotaLedger | None = None, clock=time.monotonic):
        self.config = config
        self.clock = clock
        self.cooldowns = cooldowns or Cooldowns(config.retry.cooldown_base_s, config.retry.cooldown_max_s, clock=clock)
        self.ledger = ledger or QuotaLedger(config.quota_window_s, clock=clock)
        self.outstanding = {t.name: 0 for t in config.targets}
        self.latency_ms: dict[str, float] = {}
        self._latency_at: dict[str, float] = {}  # when each target's latency was last measured
        self.rotation = Rotation({t.name: 0 for t in config.targets})
        self._tie_breaker = itertools.count()
        self._affinity: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.shared_state = None  # the state backend (see .state), for status pages; None: this router's own

    # -- eligibility ---------------------------------------------------------------------------

    def eligible(self, request: BedrockRequest) -> list[Choice]:
        choices = []
        for target in self.config.targets:
            if not request.balanceable and target.region != request.client_region:
                continue
            if request.client_region and partition_of(target.region) != partition_of(request.client_region):
                continue  # another partition: other accounts, and data that must stay where it is
            if request.fips and not target.fips:
                continue
            choice = self._fit(target, request)
            if choice is not None:
                choices.append(choice)
        return choices

    def _fit(self, target: Target, request: BedrockRequest) -> Choice | None:
        if request.model_id is None:
            return Choice(target, None, None)
        if not request.balanceable:  # stays in its own region: nothing to rewrite
            rewritten = (request.model_id, request.raw_model_id)
        else:
            rewritten = rewrite_for_region(request.model_id, request.raw_model_id, target.region, self.config.cross_geography)
        if rewritten is None or not target.allows_model(rewritten[0]):
            return None
        return Choice(target, *rewritten)

    # -- choosing ------------------------------------------------------------------------------

    def choose(
        self, request: BedrockRequest, tokens: int = 0, affinity_key: str | None = None, *, cooldowns=None, ledger=None, rotation=None,
        excluded: frozenset[str] | set[str] = frozenset(),
    ) -> Choice:
        """The target for this request now; raises :class:`NotYet` or a :class:`BedrockError`.

        ``excluded`` names targets this request must not go to again (they answered that the proxy's
        account there has no access to it). ``cooldowns``, ``ledger`` and ``rotation`` replace the router's
        own for this decision: a shared state backend passes its view of the shared state (see :mod:`.state`)."""
        rotation = rotation or self.rotation
        rotation.last_step = None
        cooldowns = cooldowns or self.cooldowns
        ledger = ledger or self.ledger
        choices = self.eligible(request)
        if not choices:
            raise BedrockError("ValidationException", self._why_none(request))
        if tokens and all(_tpm_exceeded(c, tokens) for c in choices):
            largest = max(_tpm_exceeded(c, tokens) for c in choices)
            raise BedrockError(
                "ValidationException",
                f"bedrock-balancer: the request reserves about {tokens} tokens (its text and its max tokens, as Bedrock "
                f"counts them), more than the tpm budget of any target that may serve it (the largest: {largest}); "
                "lower its max tokens, or raise the targets' tpm",
            )
        if excluded:
            choices = [c for c in choices if c.target.name not in excluded]
            if not choices:
                raise NotYet(float("inf"), "every target that may serve it has answered that the proxy has no access to it there")
        available = [c for c in choices if cooldowns.available(c.target.name, c.model_id)]
        headroom = {c.target.name: ledger.headroom(budgets_for(c.target, c.model_id), tokens) for c in available}
        available = [c for c in available if headroom[c.target.name] is None or headroom[c.target.name] >= 0]
        if not available:
            raise self._not_yet(choices, tokens, cooldowns, ledger)
        if affinity_key is not None and (sticky := self._sticky(affinity_key, available)) is not None:
            return sticky
        return self._by_strategy(available, headroom, rotation)

    def _by_strategy(self, available: list[Choice], headroom: dict[str, float | None], rotation: Rotation) -> Choice:
        if len(available) == 1:
            return available[0]
        strategy = self.config.strategy
        if strategy == "least-outstanding":
            return self._least_outstanding(available)
        if strategy == "latency":
            return self._fastest(available)
        if strategy == "priority":
            best = min(c.target.priority for c in available)
            return _round_robin([c for c in available if c.target.priority == best], rotation)
        if strategy == "quota":
            room = {name: 1.0 if h is None else h for name, h in headroom.items()}
            most = max(room[c.target.name] for c in available)
            # Within a hair of the best counts as a tie, so equal targets share by weight.
            return _round_robin([c for c in available if room[c.target.name] >= most - 1e-9], rotation)
        return _round_robin(available, rotation)

    def _fastest(self, choices: list[Choice]) -> Choice:
        """The lowest recent latency; targets not measured (lately) first, in turn among themselves."""
        now = self.clock()

        def recent(choice: Choice) -> float:
            name = choice.target.name
            fresh = now - self._latency_at.get(name, now - LATENCY_STALE_S) < LATENCY_STALE_S
            return self.latency_ms[name] if fresh and name in self.latency_ms else -1.0

        lowest = min(recent(c) for c in choices)
        tied = [c for c in choices if recent(c) == lowest]
        chosen = tied[next(self._tie_breaker) % len(tied)]
        if chosen.target.name in self.latency_ms and lowest < 0:
            # A stale target is measured again by this one request: until it answers, its last figure counts.
            self._latency_at[chosen.target.name] = now
        return chosen

    def _least_outstanding(self, choices: list[Choice]) -> Choice:
        def load(choice: Choice) -> float:
            return self.outstanding[choice.target.name] / choice.target.weight

        lowest = min(load(c) for c in choices)
        tied = [c for c in choices if load(c) == lowest]
        return tied[next(self._tie_breaker) % len(tied)]

    def _not_yet(self, choices: list[Choice], tokens: int, cooldowns=None, ledger=None) -> NotYet:
        cooldowns = cooldowns or self.cooldowns
        ledger = ledger or self.ledger
        retry_at = min(
            max(
                cooldowns.next_available_at(c.target.name, c.model_id),
                ledger.next_fit_at(budgets_for(c.target, c.model_id), tokens),
            )
            for c in choices
        )
        names = ", ".join(str(c.target) for c in choices)
        return NotYet(retry_at, f"every eligible target ({names}) is cooling down or out of its rpm/tpm budget")

    # -- affinity ------------------------------------------------------------------------------

    def _sticky(self, key: str, available: list[Choice]) -> Choice | None:
        entry = self._affinity.get(key)
        if entry is None:
            return None
        name, expires = entry
        if expires < self.clock():
            del self._affinity[key]
            return None
        return next((c for c in available if c.target.name == name), None)

    def remember(self, key: str | None, target: Target) -> None:
        """After a success: the conversation with this prefix stays with ``target`` for a while."""
        if key is None or self.config.affinity is None:
            return
        self._affinity[key] = (target.name, self.clock() + self.config.affinity.ttl_s)
        self._affinity.move_to_end(key)
        while len(self._affinity) > self.config.affinity.max_keys:
            self._affinity.popitem(last=False)

    # -- bookkeeping ---------------------------------------------------------------------------

    def started(self, target: Target) -> None:
        self.outstanding[target.name] += 1

    def finished(self, target: Target) -> None:
        self.outstanding[target.name] -= 1

    def observe_latency(self, target: Target, ms: float) -> None:
        previous = self.latency_ms.get(target.name)
        self.latency_ms[target.name] = ms if previous is None else previous + LATENCY_EWMA_ALPHA * (ms - previous)
        self._latency_at[target.name] = self.clock()

    def _why_none(self, request: BedrockRequest) -> str:
        what = f"model {request.model_id!r}" if request.model_id else request.operation
        if not request.balanceable:
            if request.client_region is None:
                return (
                    f"bedrock-balancer: {request.operation} must stay in the client's region ({request.region_bound_reason}), "
                    "but the request names no region (neither in its host nor in its credential scope)"
                )
            return (
                f"bedrock-balancer: {what} must stay in region {request.client_region} ({request.region_bound_reason}), "
                f"and no configured target is in {request.client_region} (or allows that model)"
            )
        listed = ", ".join(str(t) for t in self.config.targets)
        if request.fips and not any(t.fips for t in self.config.targets):
            return (
                f"bedrock-balancer: the request was sent to a FIPS endpoint, and no configured target is one "
                f"(targets: {listed}; give a target endpoint_url: https://bedrock-runtime-fips.<region>.amazonaws.com)"
            )
        return (
            f"bedrock-balancer: no configured target can serve {what} from {request.client_region or 'an unknown region'} "
            f"(targets: {listed}; check their models lists, geographies and partitions)"
        )


def _tpm_exceeded(choice: Choice, tokens: int) -> int | None:
    """The smallest of the choice's tpm budgets that a request of ``tokens`` exceeds even with its window
    empty; None if it fits them all."""
    return min((b.tpm for _, b in budgets_for(choice.target, choice.model_id) if b.tpm and tokens > b.tpm), default=None)


def _round_robin(choices: list[Choice], rotation: Rotation) -> Choice:
    """Smooth weighted round-robin: every target gains its weight, the highest is chosen and pays the total."""
    if len(choices) == 1:
        return choices[0]
    total = 0
    best = None
    current = rotation.weights
    for choice in choices:
        name = choice.target.name
        current[name] = current.get(name, 0) + choice.target.weight
        total += choice.target.weight
        if best is None or current[name] > current[best.target.name]:
            best = choice
    current[best.target.name] -= total
    rotation.last_step = [c.target for c in choices]
    return best
