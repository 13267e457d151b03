"""The Redis quota store: one state for every host, each decision one Lua script on the server.

Reservations are made by the server atomically (a script reads the allowance, the units held
and our unconfirmed changes, decides with the rule of ``_decide.decide`` and holds the units),
never by check-then-set from Python. Leases and freshness use the server's clock (``TIME``),
so hosts with skewed clocks agree. Every call is bounded by ``timeout`` (tens of milliseconds
by default); a slow or unreachable server raises ``QuotaStoreError`` and the guard's
``on_unavailable`` policy decides.

Keys, per customer and feature (``{...}`` is a cluster hash tag, so one script's keys share a
slot): ``commet:quota:{c\\x1ff}:a`` the allowance (hash), ``:h`` held units (hash id ->
"count expires_ms"), ``:p`` unconfirmed changes (hash key -> "delta expires_ms"), ``:r`` the
read claim; ``commet:idem:RECORD`` an idempotency record.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

from commet_middleware._results import QuotaAllowance

from ._decide import Number, with_balance
from ._reservations import Reservation
from ._store import (
    MISS,
    IdempotencyState,
    QuotaStoreError,
    ReserveMode,
    StoreOutcome,
    describe_store_url,
)

__all__ = ["RedisQuotaStore"]

# Keys expire this long after their last write: an idle customer's state does not stay forever.
_KEY_TTL_MS = 7 * 24 * 3600 * 1000

# Shared by the scripts: the time now (ms), and the live sum of a "value expires" hash, with
# entries expired longer than a grace swept (expired holds stay committable for a while).
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function live_sum(key, grace)
  local total, n = 0, 0
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    local v, e = string.match(all[i + 1], '^(%S+) (%S+)$')
    e = tonumber(e)
    if e > now then
      total = total + tonumber(v)
      n = n + 1
    elseif e < now - grace then
      redis.call('HDEL', key, all[i])
    end
  end
  return total, n
end
local function num(x)
  if x == math.floor(x) and math.abs(x) < 1e15 then return string.format('%d', x) end
  return string.format('%.17g', x)
end
"""

# KEYS: a h p. ARGV: mode count hard_limit ttl_ms id lease_ms key_ttl_ms.
_RESERVE = (
    _PRELUDE
    + """
local mode, count = ARGV[1], tonumber(ARGV[2])
local held = live_sum(KEYS[2], 600000)
local pending = live_sum(KEYS[3], 0)
local function hold()
  redis.call('HSET', KEYS[2], ARGV[5], ARGV[2] .. ' ' .. (now + tonumber(ARGV[6])))
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  held = held + count
end
if mode == 'blind' then
  hold()
  return {'allowed', num(held)}
end
local a = redis.call('HMGET', KEYS[1], 'cur', 'inc', 'unl', 'ovr', 'at', 'bill', 'asof')
if not a[2] then return {'miss'} end
if mode == 'fresh' and now - tonumber(a[5]) >= tonumber(ARGV[4]) then return {'miss'} end
local cur = math.max(tonumber(a[1]) + pending, 0)
local inc = tonumber(a[2])
local unl = a[3] == '1'
local enforced = (not unl) and (ARGV[3] == '1' or a[4] ~= '1')
local left = ''
local allowed = not enforced
if not unl then
  left = math.max(inc - cur, 0)
  if enforced then allowed = held + count <= left end
  left = num(left)
end
if allowed then hold() end
return {allowed and 'allowed' or 'refused', num(held), num(cur), a[2], a[3], a[4],
        left, enforced and '1' or '0', a[6] or '0', a[7] or ''}
"""
)

# KEYS: a p. ARGV: cur inc bill unl ovr asof key_ttl_ms. Also ends the read claim (KEYS[3]).
_SAVE = (
    _PRELUDE
    + """
local _, unconfirmed = live_sum(KEYS[2], 0)
local known = redis.call('HEXISTS', KEYS[1], 'inc') == 1
if unconfirmed == 0 or not known then redis.call('HSET', KEYS[1], 'cur', ARGV[1]) end
redis.call('HSET', KEYS[1], 'inc', ARGV[2], 'bill', ARGV[3], 'unl', ARGV[4], 'ovr', ARGV[5],
           'asof', ARGV[6], 'at', now)
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('DEL', KEYS[3])
return 1
"""
)

# KEYS: h p a. ARGV: id change_key pending_ttl_ms delta key_ttl_ms (id '' for a removal).
_COMMIT = (
    _PRELUDE
    + """
local delta = ARGV[4]
if ARGV[1] ~= '' then
  local v = redis.call('HGET', KEYS[1], ARGV[1])
  if not v then return 0 end
  redis.call('HDEL', KEYS[1], ARGV[1])
  delta = string.match(v, '^(%S+) ')
end
redis.call('HSET', KEYS[2], ARGV[2], delta .. ' ' .. (now + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[2], ARGV[5])
local _, n = live_sum(KEYS[2], 0)
if n > 1 then redis.call('HSET', KEYS[3], 'ovl', '1') end
return 1
"""
)

# KEYS: a p. ARGV: change_key new_balance ('' when unknown).
_CONFIRM = (
    _PRELUDE
    + """
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
local delta = tonumber(string.match(v, '^(%S+) '))
local _, left = live_sum(KEYS[2], 0)
if redis.call('HEXISTS', KEYS[1], 'inc') == 0 then return 0 end
local exact = left == 0 and redis.call('HGET', KEYS[1], 'ovl') ~= '1' and ARGV[2] ~= ''
if exact then
  redis.call('HSET', KEYS[1], 'cur', ARGV[2])
else
  local cur = math.max(tonumber(redis.call('HGET', KEYS[1], 'cur')) + delta, 0)
  redis.call('HSET', KEYS[1], 'cur', num(cur))
end
if left == 0 then redis.call('HDEL', KEYS[1], 'ovl') end
if exact then return 1 end
return 0
"""
)

# KEYS: a r. ARGV: lease_ms ttl_ms. The read claim, refused while the allowance is fresh.
_CLAIM = (
    _PRELUDE
    + """
local at = redis.call('HGET', KEYS[1], 'at')
if at and now - tonumber(at) < tonumber(ARGV[2]) then return 0 end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return 1 end
return 0
"""
)

# KEYS: h. Returns the units held (leases not expired).
_HELD = (
    _PRELUDE
    + """
local held = live_sum(KEYS[1], 600000)
return num(held)
"""
)

# KEYS: a p. Returns the allowance fields and the unconfirmed sum.
_LAST_KNOWN = (
    _PRELUDE
    + """
local a = redis.call('HMGET', KEYS[1], 'cur', 'inc', 'unl', 'ovr', 'bill', 'asof', 'at')
if not a[2] then return {} end
local pending = live_sum(KEYS[2], 0)
return {num(math.max(tonumber(a[1]) + pending, 0)), a[2], a[3], a[4], a[5] or '0', a[6] or '',
        tostring(now - tonumber(a[7]))}
"""
)

# KEYS: record. ARGV: fingerprint lease_ms.
_BEGIN_IDEMPOTENT = """
local v = redis.call('HMGET', KEYS[1], 'fp', 'st', 'resp')
if not v[1] then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'st', 'running')
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'new'}
end
if v[1] ~= ARGV[1] then return {'reused'} end
if v[2] == 'running' then return {'running'} end
if v[3] then return {'done', v[3]} end
return {'done'}
"""

# KEYS: record. ARGV: fingerprint.
_ABANDON_IDEMPOTENT = """
local v = redis.call('HMGET', KEYS[1], 'fp', 'st')
if v[1] == ARGV[1] and v[2] == 'running' then redis.call('DEL', KEYS[1]) end
return 1
"""


def _number(text: str | bytes) -> Number:
    value = text.decode() if isinstance(text, bytes) else text
    try:
        return int(value)
    except ValueError:
        return float(value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisQuotaStore:
    """A :class:`QuotaStore` on a Redis server (``redis://`` or ``rediss://`` URL)."""

    shared = True

    def __init__(self, url: str, *, timeout: float = 0.05) -> None:
        try:
            import redis
        except ImportError as exc:
            raise RuntimeError(
                "the Redis quota store needs redis-py: pip install 'commet-middleware[redis]'"
            ) from exc
        self.url = describe_store_url(url)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        # One try per call, bounded: a store that does not answer within the timeout is an
        # outage for this request, and the next request tries again.
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
            retry=None,
            health_check_interval=0,
        )
        self._scripts = {
            name: self._client.register_script(source)
            for name, source in (
                ("reserve", _RESERVE),
                ("save", _SAVE),
                ("claim", _CLAIM),
                ("commit", _COMMIT),
                ("confirm", _CONFIRM),
                ("held", _HELD),
                ("last_known", _LAST_KNOWN),
                ("begin_idempotent", _BEGIN_IDEMPOTENT),
                ("abandon_idempotent", _ABANDON_IDEMPOTENT),
            )
        }

    def __repr__(self) -> str:
        return f"<RedisQuotaStore {self.url}>"

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            raise QuotaStoreError(f"the Redis quota store {self.url} ({what}): {exc}") from exc

    def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return self._call(script, self._scripts[script], keys=keys, args=args)

    @staticmethod
    def _keys(customer_id: str, feature: str) -> tuple[str, str, str, str]:
        base = "commet:quota:{" + customer_id + "\x1f" + feature + "}"
        return base + ":a", base + ":h", base + ":p", base + ":r"

    def reserve(
        self,
        customer_id: str,
        feature: str,
        count: int,
        *,
        mode: ReserveMode,
        hard_limit: bool,
        ttl: float,
        lease: float,
    ) -> StoreOutcome:
        """Decide and hold on the server, in one script."""
        a, h, p, _ = self._keys(customer_id, feature)
        reservation = Reservation(customer_id, feature, count)
        answer = self._run(
            "reserve",
            [a, h, p],
            [
                mode,
                count,
                "1" if hard_limit else "0",
                int(ttl * 1000),
                reservation.id,
                max(int(lease * 1000), 1),
                _KEY_TTL_MS,
            ],
        )
        kind = _text(answer[0])
        if kind == "miss":
            return MISS
        held = int(_number(answer[1]))
        if mode == "blind":
            return StoreOutcome("allowed", None, None, held, False, reservation)
        current = _number(answer[2])
        unlimited = _text(answer[4]) == "1"
        allowance = with_balance(
            QuotaAllowance(
                feature,
                current,
                _number(answer[3]),
                None,
                _number(answer[8]),
                unlimited,
                _text(answer[5]) == "1",
                _text(answer[9]) or None,
            ),
            current,
        )
        left = None if not _text(answer[6]) else _number(answer[6])
        enforced = _text(answer[7]) == "1"
        if kind == "allowed":
            return StoreOutcome("allowed", allowance, left, held, enforced, reservation)
        refused: Literal["refused"] = "refused"
        return StoreOutcome(refused, allowance, left, held, enforced)

    def claim_read(self, customer_id: str, feature: str, lease: float, ttl: float) -> bool:
        """Take the read claim unless another process holds one, or a fresh allowance is in."""
        a, _, _, r = self._keys(customer_id, feature)
        answer = self._run("claim", [a, r], [max(int(lease * 1000), 1), int(ttl * 1000)])
        return bool(answer)

    def end_read(self, customer_id: str, feature: str) -> None:
        """Give the read claim back."""
        self._call("end_read", self._client.delete, self._keys(customer_id, feature)[3])

    def reading(self, customer_id: str, feature: str) -> bool:
        """Return True while a read claim is held."""
        return bool(self._call("reading", self._client.exists, self._keys(customer_id, feature)[3]))

    def fresh(self, customer_id: str, feature: str, ttl: float) -> bool:
        """Return True when the stored allowance is younger than ``ttl``."""
        a, _, p, _ = self._keys(customer_id, feature)
        answer = self._run("last_known", [a, p], [])
        return bool(answer) and int(_number(answer[6])) < ttl * 1000

    def save_allowance(self, customer_id: str, feature: str, allowance: QuotaAllowance) -> None:
        """Store Commet's answer and end the read claim."""
        a, _, p, r = self._keys(customer_id, feature)
        self._run(
            "save",
            [a, p, r],
            [
                repr(allowance.current),
                repr(allowance.included),
                repr(allowance.billed_quantity),
                "1" if allowance.unlimited else "0",
                "1" if allowance.overage_enabled else "0",
                allowance.as_of or "",
                _KEY_TTL_MS,
            ],
        )

    def commit(self, reservation: Reservation, change_key: str, pending_ttl: float) -> bool:
        """Turn the held units into an unconfirmed change, on the server."""
        a, h, p, _ = self._keys(reservation.customer_id, reservation.feature)
        done = self._run(
            "commit",
            [h, p, a],
            [reservation.id, change_key, int(pending_ttl * 1000), "0", _KEY_TTL_MS],
        )
        return bool(done)

    def release(self, reservation: Reservation) -> bool:
        """Give the held units back."""
        h = self._keys(reservation.customer_id, reservation.feature)[1]
        return bool(self._call("release", self._client.hdel, h, reservation.id))

    def add_pending(
        self, customer_id: str, feature: str, change_key: str, delta: int, pending_ttl: float
    ) -> None:
        """Count a change of ours as unconfirmed."""
        a, h, p, _ = self._keys(customer_id, feature)
        self._run(
            "commit", [h, p, a], ["", change_key, int(pending_ttl * 1000), delta, _KEY_TTL_MS]
        )

    def confirm(
        self, customer_id: str, feature: str, change_key: str, new_balance: Number | None
    ) -> bool:
        """Fold a confirmed change into the stored balance."""
        a, _, p, _ = self._keys(customer_id, feature)
        balance = "" if new_balance is None else repr(new_balance)
        return bool(self._run("confirm", [a, p], [change_key, balance]))

    def forget(self, customer_id: str, feature: str, change_key: str) -> None:
        """Drop the change and make the next check read Commet."""
        a, _, p, _ = self._keys(customer_id, feature)
        pipe = self._client.pipeline(transaction=True)
        pipe.hdel(p, change_key)
        pipe.hset(a, "at", 0)
        self._call("forget", pipe.execute)

    def in_flight(self, customer_id: str, feature: str) -> int:
        """Return the units held (leases not expired)."""
        h = self._keys(customer_id, feature)[1]
        return int(_number(self._run("held", [h], [])))

    def last_known(self, customer_id: str, feature: str) -> QuotaAllowance | None:
        """Return the stored allowance with our unconfirmed changes applied."""
        a, _, p, _ = self._keys(customer_id, feature)
        answer = self._run("last_known", [a, p], [])
        if not answer:
            return None
        current = _number(answer[0])
        base = QuotaAllowance(
            feature,
            current,
            _number(answer[1]),
            None,
            _number(answer[4]),
            _text(answer[2]) == "1",
            _text(answer[3]) == "1",
            _text(answer[5]) or None,
        )
        return with_balance(base, current)

    def begin_idempotent(self, record: str, fingerprint: str, lease: float) -> IdempotencyState:
        """Claim ``record`` for this request, or say why not."""
        answer = self._run(
            "begin_idempotent",
            ["commet:idem:" + record],
            [fingerprint, max(int(lease * 1000), 1)],
        )
        state = _text(answer[0])
        if state == "done":
            return IdempotencyState("done", bytes(answer[1]) if len(answer) > 1 else None)
        if state == "new":
            return IdempotencyState("new")
        if state == "running":
            return IdempotencyState("running")
        return IdempotencyState("reused")

    def finish_idempotent(
        self, record: str, fingerprint: str, response: bytes | None, ttl: float
    ) -> None:
        """Keep the succeeded request's record for ``ttl`` seconds."""
        key = "commet:idem:" + record
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(key)
        mapping: dict[str, str | bytes] = {"fp": fingerprint, "st": "done"}
        if response is not None:
            mapping["resp"] = response
        pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
        pipe.pexpire(key, max(int(ttl * 1000), 1))
        self._call("finish_idempotent", pipe.execute)

    def abandon_idempotent(self, record: str, fingerprint: str) -> None:
        """Forget the failed request's record."""
        self._run("abandon_idempotent", ["commet:idem:" + record], [fingerprint])

    def close(self) -> None:
        """Close the connection pool."""
        with contextlib.suppress(*self._errors):
            self._client.close()
