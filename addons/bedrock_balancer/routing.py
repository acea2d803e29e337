"""Choose a target for a classified request.

Eligibility first (region-bound requests stay in the client's region; a target's ``models`` allow-list;
inference-profile geographies), then the strategy picks among the eligible targets:

* ``round-robin``: smooth weighted round-robin (nginx's algorithm): over any run of requests each
  target gets its weight's share, interleaved rather than in bursts.
* ``least-outstanding``: the target with the fewest requests in flight relative to its weight; ties
  broken in rotation so that an idle pool is not always drained from the first target.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .classify import BedrockRequest
from .config import Config, Target
from .errors import BedrockError
from .geography import rewrite_for_region


@dataclass(frozen=True, slots=True)
class Choice:
    target: Target
    model_id: str | None  # the model id as it will be sent to the target (rewritten if needed)
    raw_model_id: str | None


class Router:
    def __init__(self, config: Config):
        self.config = config
        self.outstanding = {t.name: 0 for t in config.targets}
        self._current_weight = {t.name: 0 for t in config.targets}
        self._tie_breaker = itertools.count()

    def eligible(self, request: BedrockRequest, exclude: frozenset[str] = frozenset()) -> list[Choice]:
        choices = []
        for target in self.config.targets:
            if target.name in exclude:
                continue
            if not request.balanceable and target.region != request.client_region:
                continue
            choice = self._fit(target, request)
            if choice is not None:
                choices.append(choice)
        return choices

    def choose(self, request: BedrockRequest, exclude: frozenset[str] = frozenset()) -> Choice:
        choices = self.eligible(request, exclude)
        if not choices:
            raise BedrockError("ValidationException", self._why_none(request))
        if len(choices) == 1:
            return choices[0]
        if self.config.strategy == "least-outstanding":
            return self._least_outstanding(choices)
        return self._round_robin(choices)

    def started(self, target: Target) -> None:
        self.outstanding[target.name] += 1

    def finished(self, target: Target) -> None:
        self.outstanding[target.name] -= 1

    def _fit(self, target: Target, request: BedrockRequest) -> Choice | None:
        if request.model_id is None:
            return Choice(target, None, None)
        if not request.balanceable:  # stays in its own region: nothing to rewrite
            rewritten = (request.model_id, request.raw_model_id)
        else:
            rewritten = rewrite_for_region(
                request.model_id, request.raw_model_id, target.region, self.config.cross_geography
            )
        if rewritten is None or not target.allows_model(rewritten[0]):
            return None
        return Choice(target, *rewritten)

    def _round_robin(self, choices: list[Choice]) -> Choice:
        total = 0
        best = None
        for choice in choices:
            name = choice.target.name
            self._current_weight[name] += choice.target.weight
            total += choice.target.weight
            if best is None or self._current_weight[name] > self._current_weight[best.target.name]:
                best = choice
        self._current_weight[best.target.name] -= total
        return best

    def _least_outstanding(self, choices: list[Choice]) -> Choice:
        def load(choice: Choice) -> float:
            return self.outstanding[choice.target.name] / choice.target.weight

        lowest = min(load(c) for c in choices)
        tied = [c for c in choices if load(c) == lowest]
        return tied[next(self._tie_breaker) % len(tied)]

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
        return f"bedrock-balancer: no configured target can serve {what} (targets: {listed}; check their models lists and geographies)"
