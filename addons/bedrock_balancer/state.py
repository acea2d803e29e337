"""Where the balancing state lives: in this process (``memory``, the default) or in Redis, shared by
several proxy instances (option ``bedrock_state``: ``memory`` or ``redis://host:port/db``).

The relay awaits a backend for everything that must be shared between instances:

* :meth:`acquire` chooses a target and, atomically with the choice, reserves the request in the
  target's budgets (:mod:`.quota`) and begins the half-open probe if the circuit (:mod:`.health`)
  allows one;
* :meth:`succeeded` / :meth:`failed` / :meth:`release_probe` tell the circuits what happened;
* :meth:`settle` replaces the reserved tokens by the real usage.

The routing decision itself stays in :class:`~.routing.Router` (plain code). The Redis backend hands
the router a *view* of the shared state (what each candidate's circuits and budgets say now), the router
chooses, and one Lua script checks the choice against the shared state and reserves it in the same step.
The view a script returns is kept for the next request with the same candidates, so a request normally
costs one round trip to choose and reserve; a stale view costs a second (the script refuses a choice
that no longer fits and returns a fresh view).

Round trips per request (Redis): 1 to choose and reserve, 1 to settle, +1 when the circuit had failures
(closing it), +1 per failed attempt (the cooldown and the release of its reservation, in one script).

Redis trouble never fails a request: a connection error or a timeout switches the backend to the local
in-memory state (logged once, shown in ``/status``), and it tries Redis again every
``RECHECK_S`` seconds, returning to the shared state as soon as Redis answers.

Every Redis key expires: budget windows after two windows without use, circuits after their cooldown
plus ten times the maximum cooldown, probes after ``PROBE_TTL_S``.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

from .config import redacted_url
from .health import PROBE_RECHECK_S
from .quota import Reservation, budgets_for, target_budgets
from .routing import Choice, NotYet, Rotation, Router

log = logging.getLogger(__name__)

RECHECK_S = 1.0  # while Redis is unreachable, try it again this often
PROBE_TTL_S = 30.0  # a probe whose instance died stops blocking the target after this long
REDIS_TIMEOUT_S = 1.0  # per command: a Redis that does not answer in time counts as unreachable
WAKE_JITTER = 0.1  # requests waiting for room wake up spread over this share of their wait (at most 250 ms)
KEY_PREFIX = "bb:"
MAX_VIEWS = 1024


def validate_state_url(value: str) -> str | None:
    """The problem with a ``bedrock_state`` value, or None."""
    if value in ("", "memory"):
        return None
    shown = redacted_url(value)  # the URL may carry the Redis password: never echo it
    parsed = urlparse(value)
    if parsed.scheme not in ("redis", "rediss"):
        return f"bedrock_state: {shown!r} is neither 'memory' nor a redis://host:port/db URL"
    if not parsed.hostname:
        return f"bedrock_state: {shown!r} names no Redis host (redis://host:port/db)"
    try:
        parsed.port
    except ValueError:
        return f"bedrock_state: {shown!r} has an invalid port"
    db = parsed.path.strip("/")
    if db and not db.isdigit():
        return f"bedrock_state: {shown!r}: the database must be a number (redis://host:port/0)"
    return None


@dataclass
class Lease:
    """What one attempt holds: its target, its reservation, whether it is the probe."""

    choice: Choice | None  # None for a client's own budget
    reservation: Reservation | None = None  # memory
    entry_id: str | None = None  # redis
    budget_keys: list[str] = field(default_factory=list)
    probe: bool = False
    had_circuit: bool = True  # redis: whether the target had failures when acquired (success must close it)
    local: bool = True
    settled: bool = False


class MemoryState:
    """Today's behaviour: the router's own Cooldowns and QuotaLedger."""

    name = "memory"

    def __init__(self, router: Router):
        self.router = router

    def status(self) -> str:
        return "memory"

    async def acquire(self, request, tokens: int, affinity_key: str | None, excluded: frozenset[str] | set[str] = frozenset()) -> tuple[Choice, Lease]:
        router = self.router
        choice = router.choose(request, tokens, affinity_key, excluded=excluded)
        probe = router.cooldowns.begin(choice.target.name, choice.model_id)
        reservation = router.ledger.reserve(budgets_for(choice.target, choice.model_id), tokens)
        return choice, Lease(choice, reservation, probe=probe)

    async def succeeded(self, lease: Lease) -> None:
        self.router.cooldowns.succeeded(lease.choice.target.name, lease.choice.model_id)

    async def failed(self, lease: Lease, reason: str, whole_target: bool = False, retry_after_s: float | None = None) -> float:
        return self.router.cooldowns.failed(lease.choice.target.name, lease.choice.model_id, reason, whole_target=whole_target, retry_after_s=retry_after_s)

    async def release_probe(self, lease: Lease) -> None:
        self.router.cooldowns.release_probe(lease.choice.target.name, lease.choice.model_id)

    async def settle(self, lease: Lease, tokens: int) -> None:
        if not lease.settled:
            lease.settled = True
            self.router.ledger.settle(lease.reservation, tokens)

    async def check(self) -> bool:
        return True

    async def close(self) -> None:
        pass


# -- Redis -----------------------------------------------------------------------------------------

_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function trim(z, h, horizon)
  local gone = redis.call('ZRANGEBYSCORE', z, '-inf', horizon)
  for _, id in ipairs(gone) do
    local t = tonumber(redis.call('HGET', h, id) or '0')
    redis.call('HINCRBY', h, '_sum', 0 - t)  -- not -t: Lua sends -0 as "-0", which HINCRBY refuses
    redis.call('HDEL', h, id)
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', z, '-inf', horizon) end
end
local function settle(prefix, id, tokens, keys)
  for _, k in ipairs(keys) do
    local h = prefix .. 'qt:' .. k
    local old = redis.call('HGET', h, id)
    if old then
      redis.call('HSET', h, id, tokens)
      redis.call('HINCRBY', h, '_sum', tokens - tonumber(old))
    end
  end
end
"""

# ARGV: prefix, window_ms, tokens, chosen (1-based, 0: only look), entry id, probe_ttl_ms,
#       ncandidates, then per candidate: target, model ('' for none), nbudgets, then per budget: key, rpm, tpm,
#       then the round-robin step (n, n x (target, weight)): the step picks among these with the shared weights
# Returns: ok, probe, had_circuit, chosen (1-based), then per candidate: available, next_available_ms (delay), headroom ('' none),
#       fit_ms (delay), round-robin current weight
_ACQUIRE = _COMMON + """
local prefix, window, tokens = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local chosen, id, probe_ttl = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local now = now_ms()
local horizon = now - window
local n = tonumber(ARGV[7])
local i = 8
local out = {0, 0, 0, chosen}
local cands = {}
for c = 1, n do
  local target, model, nb = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  local ckeys = {prefix .. 'c:' .. target .. '\\0*'}
  if model ~= '' then table.insert(ckeys, prefix .. 'c:' .. target .. '\\0' .. model) end
  local available, next_at, had = 1, now, 0
  for _, ck in ipairs(ckeys) do
    local f = tonumber(redis.call('HGET', ck, 'f') or '0')
    if f > 0 then
      had = 1
      local u = tonumber(redis.call('HGET', ck, 'u') or '0')
      local p = tonumber(redis.call('HGET', ck, 'p') or '0')
      if now < u then available = 0; next_at = math.max(next_at, u)
      elseif p > now then available = 0; next_at = math.max(next_at, now + %d) end
    end
  end
  local worst = nil
  local fit = now
  local bkeys = {}
  for b = 1, nb do
    local key, rpm, tpm = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
    i = i + 3
    table.insert(bkeys, key)
    local z, h = prefix .. 'q:' .. key, prefix .. 'qt:' .. key
    trim(z, h, horizon)
    local count = redis.call('ZCARD', z)
    local used = tonumber(redis.call('HGET', h, '_sum') or '0')
    if rpm > 0 then
      local r = (rpm - count - 1) / rpm
      if worst == nil or r < worst then worst = r end
      if count + 1 > rpm then
        local e = redis.call('ZRANGE', z, count - rpm, count - rpm, 'WITHSCORES')
        fit = math.max(fit, tonumber(e[2]) + window)
      end
    end
    if tpm > 0 then
      local r = (tpm - used - tokens) / tpm
      if worst == nil or r < worst then worst = r end
      if used + tokens > tpm and count > 0 then
        local excess, freed = used + math.min(tokens, tpm) - tpm, 0
        local entries = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES')
        local at = nil
        for e = 1, #entries, 2 do
          freed = freed + tonumber(redis.call('HGET', h, entries[e]) or '0')
          if freed >= excess then at = tonumber(entries[e + 1]) + window; break end
        end
        if at == nil then at = tonumber(entries[#entries]) + window end
        fit = math.max(fit, at)
      end
    end
  end
  cands[c] = {target = target, ckeys = ckeys, bkeys = bkeys, available = available, worst = worst, had = had}
  table.insert(out, available)
  table.insert(out, next_at - now)
  table.insert(out, worst == nil and '' or tostring(worst))
  table.insert(out, fit - now)
  table.insert(out, tonumber(redis.call('HGET', prefix .. 'rr', target) or '0'))
end
local rr_n = tonumber(ARGV[i] or '0')
if chosen > 0 and rr_n > 0 then
  -- The round-robin step on the shared weights (nginx's smooth weighted round-robin): the router chose
  -- with the weights it last saw; the step over the same targets with the current weights decides.
  local rr, best, best_w = prefix .. 'rr', nil, nil
  for r = 1, rr_n do
    local w = tonumber(redis.call('HGET', rr, ARGV[i + 2 * r - 1]) or '0') + tonumber(ARGV[i + 2 * r])
    if best == nil or w > best_w then best, best_w = ARGV[i + 2 * r - 1], w end
  end
  for c = 1, n do
    if cands[c].target == best then chosen = c end
  end
  out[4] = chosen
end
if chosen > 0 then
  local c = cands[chosen]
  if c.available == 1 and (c.worst == nil or c.worst >= 0) then
    out[1] = 1
    out[3] = c.had
    for _, key in ipairs(c.bkeys) do
      local z, h = prefix .. 'q:' .. key, prefix .. 'qt:' .. key
      redis.call('ZADD', z, now, id)
      redis.call('HSET', h, id, tokens)
      redis.call('HINCRBY', h, '_sum', tokens)
      redis.call('PEXPIRE', z, 2 * window + 1000)
      redis.call('PEXPIRE', h, 2 * window + 1000)
    end
    for _, ck in ipairs(c.ckeys) do
      local f = tonumber(redis.call('HGET', ck, 'f') or '0')
      if f > 0 and now >= tonumber(redis.call('HGET', ck, 'u') or '0') then
        redis.call('HSET', ck, 'p', now + probe_ttl)
        out[2] = 1
      end
    end
    if rr_n > 0 then
      local rr, total = prefix .. 'rr', 0
      for r = 1, rr_n do
        local w = tonumber(ARGV[i + 2 * r])
        redis.call('HINCRBY', rr, ARGV[i + 2 * r - 1], w)
        total = total + w
      end
      redis.call('HINCRBY', rr, cands[chosen].target, -total)
      redis.call('PEXPIRE', rr, 86400000)
    end
    for k = 1, n do  -- the view returned shows the weights after this step
      out[4 + 5 * k] = tonumber(redis.call('HGET', prefix .. 'rr', cands[k].target) or '0')
    end
  end
end
return out
""" % int(PROBE_RECHECK_S * 1000)

# ARGV: prefix, entry id, tokens, nkeys, keys..., close ('1': success closes the circuits, 'r': release the probe, ''), target, model
_SETTLE = _COMMON + """
local prefix, id, tokens, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local keys = {}
for k = 1, n do keys[k] = ARGV[4 + k] end
if id ~= '' then settle(prefix, id, tokens, keys) end
local action, target, model = ARGV[5 + n], ARGV[6 + n], ARGV[7 + n]
if action ~= '' then
  local ckeys = {prefix .. 'c:' .. target .. '\\0*'}
  if model ~= '' then table.insert(ckeys, prefix .. 'c:' .. target .. '\\0' .. model) end
  for _, ck in ipairs(ckeys) do
    if action == '1' then redis.call('DEL', ck)
    elseif redis.call('EXISTS', ck) == 1 then redis.call('HSET', ck, 'p', 0) end
  end
end
return 1
"""

# ARGV: prefix, circuit key suffix, reason, base_ms, max_ms, rand, retry_after_ms (-1: none), entry id, nkeys, keys...,
# the other circuit the attempt passed through (key suffix, or ''), and what its verdict does to it ('close' or 'end-probe')
_FAILED = _COMMON + """
local prefix, ck = ARGV[1], ARGV[1] .. 'c:' .. ARGV[2]
local base, maxms, rand, ra = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local f = redis.call('HINCRBY', ck, 'f', 1)
local cooldown
if ra >= 0 then cooldown = math.min(ra, maxms * 10)
else cooldown = math.min(base * 2 ^ (f - 1), maxms) * (0.5 + rand / 2) end
cooldown = math.floor(cooldown)
local now = now_ms()
redis.call('HSET', ck, 'u', now + cooldown, 'p', 0, 'r', ARGV[3])
redis.call('PEXPIRE', ck, cooldown + maxms * 10)
redis.call('SADD', prefix .. 'circuits', ARGV[2])  -- for status pages
redis.call('PEXPIRE', prefix .. 'circuits', math.max(redis.call('PTTL', prefix .. 'circuits'), cooldown + maxms * 10))
local n = tonumber(ARGV[9])
local keys = {}
for k = 1, n do keys[k] = ARGV[9 + k] end
if ARGV[8] ~= '' then settle(prefix, ARGV[8], 0, keys) end
local other, verdict = ARGV[10 + n], ARGV[11 + n]
if other ~= '' then
  local ok = prefix .. 'c:' .. other
  if verdict == 'close' then  -- only a half-open one (as Cooldowns.failed)
    if tonumber(redis.call('HGET', ok, 'u') or '0') <= now then redis.call('DEL', ok) end
  elseif redis.call('EXISTS', ok) == 1 then redis.call('HSET', ok, 'p', 0) end
end
return cooldown
"""


# ARGV: prefix, window_ms, nkeys, budget keys...  Read-only. Returns per budget: requests, tokens; then
# per known circuit: key suffix, failures, ms left, probing, reason.
_SNAPSHOT = _COMMON + """
local prefix, window, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local out = {}
for b = 1, n do
  local z, h = prefix .. 'q:' .. ARGV[3 + b], prefix .. 'qt:' .. ARGV[3 + b]
  local ids = redis.call('ZRANGEBYSCORE', z, '(' .. (now - window), '+inf')
  local sum = 0
  for _, id in ipairs(ids) do sum = sum + tonumber(redis.call('HGET', h, id) or '0') end
  table.insert(out, #ids)
  table.insert(out, sum)
end
for _, suffix in ipairs(redis.call('SMEMBERS', prefix .. 'circuits')) do
  local ck = prefix .. 'c:' .. suffix
  local f = tonumber(redis.call('HGET', ck, 'f') or '0')
  if f > 0 then
    local u = tonumber(redis.call('HGET', ck, 'u') or '0')
    local p = tonumber(redis.call('HGET', ck, 'p') or '0')
    table.insert(out, suffix)
    table.insert(out, f)
    table.insert(out, math.max(0, u - now))
    table.insert(out, p > now and 1 or 0)
    table.insert(out, redis.call('HGET', ck, 'r') or '')
  end
end
return out
"""


class _View:
    """The shared state of a request's candidates as one script saw it, in the shape the router reads
    (the Cooldowns and QuotaLedger methods it calls), on this process's monotonic clock."""

    def __init__(self, reply: list, candidates: list[Choice], local_now: float):
        self.available_at: dict[str, tuple[bool, float]] = {}
        self.fit: dict[str, tuple[float | None, float]] = {}
        self.weights: dict[str, int] = {}
        for index, choice in enumerate(candidates):
            available, next_ms, headroom, fit_ms, weight = reply[4 + 5 * index: 9 + 5 * index]
            self.weights[choice.target.name] = int(weight)
            headroom = _str(headroom)
            self.available_at[choice.target.name] = (int(available) == 1, local_now + int(next_ms) / 1000)
            self.fit[choice.target.name] = (float(headroom) if headroom else None, local_now + int(fit_ms) / 1000)

    def available(self, target: str, model) -> bool:
        return self.available_at[target][0]

    def next_available_at(self, target: str, model) -> float:
        return self.available_at[target][1]

    def headroom(self, budgets, tokens) -> float | None:
        return self.fit[budgets[0][0][0]][0] if budgets else None

    def next_fit_at(self, budgets, tokens) -> float:
        return self.fit[budgets[0][0][0]][1] if budgets else time.monotonic()


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisState:
    """Shared state in Redis, falling back to :class:`MemoryState` while Redis is unreachable."""

    name = "redis"

    def __init__(self, router: Router, url: str, *, prefix: str = KEY_PREFIX, rng: random.Random | None = None, recheck_s: float = RECHECK_S):
        import redis.asyncio as aioredis  # only when configured

        self.router = router
        self.url = url
        self.prefix = prefix
        self.recheck_s = recheck_s
        self.local = MemoryState(router)
        self._rng = rng or random.Random()
        self._redis = aioredis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S, retry_on_timeout=False)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._settle = self._redis.register_script(_SETTLE)
        self._failed = self._redis.register_script(_FAILED)
        self._snapshot = self._redis.register_script(_SNAPSHOT)
        self._views: dict[tuple, _View] = {}
        self.degraded_since: float | None = None
        self._next_check = 0.0
        self.round_trips = 0  # every script call that reached Redis (for measurements)
        self.fallbacks = 0  # operations served locally because Redis was unreachable
        self.redis_seconds = 0.0  # time spent waiting for Redis (all calls)
        self.acquires = 0  # attempts that acquired a target through Redis

    def status(self) -> dict:
        return {
            "backend": "redis",
            "shared": self.degraded_since is None,
            "mode": "shared" if self.degraded_since is None else "local-fallback",
            "round_trips": self.round_trips,
            "fallbacks": self.fallbacks,
            # What Redis costs each attempt: round trips and milliseconds spent waiting for it.
            "round_trips_per_attempt": round(self.round_trips / self.acquires, 2) if self.acquires else None,
            "redis_ms_per_attempt": round(self.redis_seconds * 1000 / self.acquires, 3) if self.acquires else None,
        }

    async def check(self) -> bool:
        """One round trip at start-up, so that an unreachable Redis is reported then, not at the first request."""
        return await self._call(self._snapshot, [self.prefix, 0, 0]) is not None

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except Exception:  # pragma: no cover - closing a broken connection
            pass

    # -- availability --------------------------------------------------------------------------

    def _usable(self) -> bool:
        return self.degraded_since is None or time.monotonic() >= self._next_check

    async def _call(self, script, args: list):
        """Run a script; None (and local fallback from now on) when Redis is unreachable."""
        import redis.exceptions

        if not self._usable():
            self.fallbacks += 1
            return None
        started = time.perf_counter()
        try:
            reply = await script(args=args)
            self.redis_seconds += time.perf_counter() - started
        except (redis.exceptions.RedisError, OSError) as e:  # any Redis trouble: never fail the request
            if self.degraded_since is None:
                self.degraded_since = time.monotonic()
                # A script's own error is a bug of ours, not the network's: say which.
                trouble = "refused a state script" if isinstance(e, redis.exceptions.ResponseError) else "unreachable"
                log.warning("bedrock-balancer: Redis state at %s %s (%s); using local state until it answers again", redacted_url(self.url), trouble, e)
            self._next_check = time.monotonic() + self.recheck_s
            self.fallbacks += 1
            return None
        self.round_trips += 1
        if self.degraded_since is not None:
            log.warning("bedrock-balancer: Redis state at %s answers again after %.1f s; back to shared state", redacted_url(self.url), time.monotonic() - self.degraded_since)
            self.degraded_since = None
            self._views.clear()
        return reply

    # -- the backend interface -----------------------------------------------------------------

    async def acquire(self, request, tokens: int, affinity_key: str | None, excluded: frozenset[str] | set[str] = frozenset()) -> tuple[Choice, Lease]:
        router = self.router
        candidates = router.eligible(request)
        if not candidates or not self._usable():
            return await self._local_acquire(request, tokens, affinity_key, excluded)
        cache_key = tuple((c.target.name, c.model_id) for c in candidates)
        args = self._candidate_args(candidates)
        view = self._views.get(cache_key)
        fresh = False
        for _ in range(4):
            if view is None:
                reply = await self._call(self._acquire, [self.prefix, int(router.config.quota_window_s * 1000), tokens, 0, "", 0] + args)
                if reply is None:
                    return await self._local_acquire(request, tokens, affinity_key, excluded)
                view, fresh = _View(reply, candidates, time.monotonic()), True
                self._remember(cache_key, view)
            try:
                rotation = Rotation(dict(view.weights))
                choice = router.choose(request, tokens, affinity_key, cooldowns=view, ledger=view, rotation=rotation, excluded=excluded)
            except NotYet as not_yet:
                if fresh:
                    self._views.pop(cache_key, None)  # look again next time
                    # Every instance's waiters would wake at the same instant and race for the same room.
                    wait = max(0.0, not_yet.retry_at - time.monotonic())
                    not_yet.retry_at += min(0.25, wait * WAKE_JITTER) * self._rng.random()
                    raise
                view = None
                continue
            index = next(i for i, c in enumerate(candidates) if c.target.name == choice.target.name)
            entry_id = secrets.token_hex(8)
            round_args = [0]
            if rotation.last_step:  # the shared round-robin step, applied only if the reservation is made
                round_args = [len(rotation.last_step)]
                for target in rotation.last_step:
                    round_args += [target.name, target.weight]
            reply = await self._call(
                self._acquire,
                [self.prefix, int(router.config.quota_window_s * 1000), tokens, index + 1, entry_id, int(PROBE_TTL_S * 1000)] + args + round_args,
            )
            if reply is None:
                return await self._local_acquire(request, tokens, affinity_key, excluded)
            view, fresh = _View(reply, candidates, time.monotonic()), True
            self._remember(cache_key, view)
            if int(reply[0]) == 1:
                self.acquires += 1
                choice = candidates[int(reply[3]) - 1]  # the shared round-robin step may have chosen another of the tied
                keys = [_budget_key(key) for key, _ in budgets_for(choice.target, choice.model_id)]
                return choice, Lease(choice, entry_id=entry_id, budget_keys=keys, probe=int(reply[1]) == 1, had_circuit=int(reply[2]) == 1, local=False)
        raise NotYet(time.monotonic() + PROBE_RECHECK_S, "the shared state kept changing")

    def _remember(self, key: tuple, view: _View) -> None:
        if key not in self._views and len(self._views) >= MAX_VIEWS:
            self._views.clear()  # bounded: one view per set of candidates (targets x models) in use
        self._views[key] = view

    async def _local_acquire(self, request, tokens, affinity_key, excluded):
        return await self.local.acquire(request, tokens, affinity_key, excluded)

    async def succeeded(self, lease: Lease) -> None:
        if lease.local:
            return await self.local.succeeded(lease)
        if not lease.had_circuit:
            return  # nothing to close: saves a round trip on the common path
        target, model = lease.choice.target.name, lease.choice.model_id or ""
        if await self._call(self._settle, [self.prefix, "", 0, 0, "1", target, model]) is None:
            await self.local.succeeded(lease)

    async def failed(self, lease: Lease, reason: str, whole_target: bool = False, retry_after_s: float | None = None) -> float:
        if lease.local:
            return await self.local.failed(lease, reason, whole_target, retry_after_s)
        retry = self.router.config.retry
        target, model = lease.choice.target.name, lease.choice.model_id
        whole = whole_target or not model
        # As Cooldowns.failed: the attempt's verdict on the other circuit it passed through.
        other = ("", "") if not model else (f"{target}\0{model}", "end-probe") if whole else (f"{target}\0*", "close")
        settle_id = "" if lease.settled else lease.entry_id
        args = [
            self.prefix, f"{target}\0{'*' if whole else model}", reason, int(retry.cooldown_base_s * 1000), int(retry.cooldown_max_s * 1000),
            repr(self._rng.random()), -1 if retry_after_s is None or retry_after_s < 0 else int(retry_after_s * 1000),
            settle_id, len(lease.budget_keys), *lease.budget_keys, *other,
        ]
        reply = await self._call(self._failed, args)
        if reply is None:
            return await self.local.failed(lease, reason, whole_target, retry_after_s)
        lease.settled = True  # the failure released the reservation (the request still counts)
        return int(reply) / 1000

    async def release_probe(self, lease: Lease) -> None:
        if lease.local:
            return await self.local.release_probe(lease)
        if lease.probe:
            target, model = lease.choice.target.name, lease.choice.model_id or ""
            await self._call(self._settle, [self.prefix, "", 0, 0, "r", target, model])

    async def settle(self, lease: Lease, tokens: int) -> None:
        if lease.local:
            return await self.local.settle(lease, tokens)
        if lease.settled or not lease.budget_keys:
            lease.settled = True
            return
        lease.settled = True
        await self._call(self._settle, [self.prefix, lease.entry_id, tokens, len(lease.budget_keys), *lease.budget_keys, "", "", ""])

    async def shared_status(self) -> dict | None:
        """The shared budgets and circuits, for ``/status``: {"usage": {(target, budget): (requests, tokens)},
        "cooldowns": [...]}; None when Redis is unreachable (status pages then show the local view)."""
        keys = [key for target in self.router.config.targets for key, _ in target_budgets(target)]
        reply = await self._call(self._snapshot, [self.prefix, int(self.router.config.quota_window_s * 1000), len(keys), *map(_budget_key, keys)])
        if reply is None:
            return None
        usage = {key: (int(reply[2 * i]), int(reply[2 * i + 1])) for i, key in enumerate(keys)}
        cooldowns = []
        rest = reply[2 * len(keys):]
        for i in range(0, len(rest), 5):
            target, _, model = _str(rest[i]).partition("\0")
            failures, left_ms, probing, reason = int(rest[i + 1]), int(rest[i + 2]), int(rest[i + 3]), _str(rest[i + 4])
            cooldowns.append({
                "target": target, "model": None if model == "*" else model,
                "state": "open" if left_ms > 0 else "half-open", "failures": failures,
                "seconds_left": round(left_ms / 1000, 3), "reason": reason, "probing": bool(probing),
            })
        return {"usage": usage, "cooldowns": cooldowns}

    async def client_admit(self, name: str, rpm: int | None, tpm: int | None, tokens: int) -> tuple[bool, Lease | None, float] | None:
        """Reserve one request and ``tokens`` in a client's shared budget, atomically: (admitted, lease,
        seconds until it would fit). None when Redis is unreachable (the caller uses its local ledger)."""
        key = _budget_key((f"client:{name}", "*"))
        entry_id = secrets.token_hex(8)
        args = [self.prefix, int(self.router.config.quota_window_s * 1000), tokens, 1, entry_id, 0,
                1, f"client:{name}", "", 1, key, rpm or 0, tpm or 0]
        reply = await self._call(self._acquire, args)
        if reply is None:
            return None
        fit_s = int(reply[7]) / 1000
        if int(reply[0]) != 1:
            return False, None, fit_s
        return True, Lease(None, entry_id=entry_id, budget_keys=[key], local=False), fit_s

    # -- helpers -------------------------------------------------------------------------------

    def _candidate_args(self, candidates: list[Choice]) -> list:
        args: list = [len(candidates)]
        for choice in candidates:
            budgets = budgets_for(choice.target, choice.model_id)
            args += [choice.target.name, choice.model_id or "", len(budgets)]
            for key, budget in budgets:
                args += [_budget_key(key), budget.rpm or 0, budget.tpm or 0]
        return args


def _budget_key(key: tuple[str, str]) -> str:
    return f"{key[0]}\0{key[1]}"


def make_state(router: Router, url: str):
    if url in ("", "memory"):
        return MemoryState(router)
    return RedisState(router, url)
