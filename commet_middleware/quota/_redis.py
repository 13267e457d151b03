"""The Redis quota store: one state for every host, each decision one Lua script on the server.

Reservations are made by the server atomically (a script reads the allowance, the units held
and our unconfirmed changes, decides with the rule of ``_decide.decide`` and holds the units),
never by check-then-set from Python. Leases and freshness use the server's clock (``TIME``),
so hosts with skewed clocks agree. Every call is bounded by ``timeout`` (tens of milliseconds
by default); a slow or unreachable server raises ``QuotaStoreError`` and the guard's
``on_unavailable`` policy decides.

Keys, per customer and feature (``{...}`` is a cluster hash tag, so one script's keys share a
slot): ``commet:quota:{c\\x1ff}:a`` the allowance and the running sums (hash), ``:h`` held
units (hash id -> count) with ``:hx`` their lease ends (sorted set), ``:p`` unconfirmed
changes (hash key -> delta) with ``:px`` their ends, ``:r`` the read claim;
``commet:idem:RECORD`` an idempotency record.
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

# Every script gets the same keys, KEYS[1..6] = a h hx p px r (see the module docstring), and
# starts here: the server's time (ms), then expired holds and unconfirmed changes are swept out
# of the running sums kept in the allowance hash (held, pend, npend), so no script ever reads a
# whole hash: each costs O(log n) in what is stored, however far delivery lags behind.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local A, H, HX, P, PX, R = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local function num(x)
  if x == math.floor(x) and math.abs(x) < 1e15 then return string.format('%d', x) end
  return string.format('%.17g', x)
end
local function field(name)
  return tonumber(redis.call('HGET', A, name) or '0') or 0
end
local function drop(hash, zset, id, sum, counter)
  local v = redis.call('HGET', hash, id)
  redis.call('ZREM', zset, id)
  if not v then return nil end
  redis.call('HDEL', hash, id)
  redis.call('HSET', A, sum, num(field(sum) - tonumber(v)))
  if counter then redis.call('HSET', A, counter, num(field(counter) - 1)) end
  return tonumber(v)
end
local function sweep()
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', HX, '-inf', now)) do
    drop(H, HX, id, 'held', nil)
  end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', PX, '-inf', now)) do
    drop(P, PX, id, 'pend', 'npend')
  end
  if field('npend') <= 0 then redis.call('HDEL', A, 'ovl') end
end
local function touch()
  for _, key in ipairs({A, H, HX, P, PX}) do redis.call('PEXPIRE', key, ARGV[1]) end
end
local function add_pending(key, delta, ttl_ms)
  if redis.call('HEXISTS', P, key) == 1 then return end
  redis.call('HSET', P, key, num(delta))
  redis.call('ZADD', PX, now + ttl_ms, key)
  redis.call('HSET', A, 'pend', num(field('pend') + delta), 'npend', num(field('npend') + 1))
  if field('npend') > 1 then redis.call('HSET', A, 'ovl', '1') end
end
sweep()
"""

# ARGV: key_ttl mode count hard_limit ttl_ms id lease_ms.
_RESERVE = (
    _PRELUDE
    + """
local mode, count = ARGV[2], tonumber(ARGV[3])
local held = field('held')
local function hold()
  redis.call('HSET', H, ARGV[6], ARGV[3])
  redis.call('ZADD', HX, now + tonumber(ARGV[7]), ARGV[6])
  held = held + count
  redis.call('HSET', A, 'held', num(held))
  touch()
end
if mode == 'blind' then
  hold()
  return {'allowed', num(held)}
end
local a = redis.call('HMGET', A, 'cur', 'inc', 'unl', 'ovr', 'at', 'bill', 'asof')
if not a[2] then return {'miss'} end
if mode == 'fresh' and now - tonumber(a[5]) >= tonumber(ARGV[5]) then return {'miss'} end
local cur = math.max(tonumber(a[1]) + field('pend'), 0)
local inc = tonumber(a[2])
local unl = a[3] == '1'
local enforced = (not unl) and (ARGV[4] == '1' or a[4] ~= '1')
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

# ARGV: key_ttl cur inc bill unl ovr asof. Also ends the read claim. While changes of ours are
# unconfirmed, the answer may predate some of them: the higher balance is kept.
_SAVE = (
    _PRELUDE
    + """
local known = redis.call('HEXISTS', A, 'inc') == 1
local cur = tonumber(ARGV[2])
if field('npend') > 0 and known then cur = math.max(cur, field('cur')) end
redis.call('HSET', A, 'cur', num(cur), 'inc', ARGV[3], 'bill', ARGV[4], 'unl', ARGV[5],
           'ovr', ARGV[6], 'asof', ARGV[7], 'at', now)
touch()
redis.call('DEL', R)
return 1
"""
)

# ARGV: key_ttl lease_ms ttl_ms. The read claim, refused while the allowance is fresh.
_CLAIM = (
    _PRELUDE
    + """
local at = redis.call('HGET', A, 'at')
if at and now - tonumber(at) < tonumber(ARGV[3]) then return 0 end
if redis.call('SET', R, '1', 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
)

# ARGV: key_ttl id change_key pending_ttl_ms. A hold becomes an unconfirmed change.
_COMMIT = (
    _PRELUDE
    + """
local count = drop(H, HX, ARGV[2], 'held', nil)
if not count then return 0 end
add_pending(ARGV[3], count, tonumber(ARGV[4]))
touch()
return 1
"""
)

# ARGV: key_ttl id. Returns 1 if the hold was there.
_RELEASE = (
    _PRELUDE
    + """
if drop(H, HX, ARGV[2], 'held', nil) then return 1 end
return 0
"""
)

# ARGV: key_ttl change_key delta pending_ttl_ms. A change of ours (a removal) not yet confirmed.
_ADD_PENDING = (
    _PRELUDE
    + """
add_pending(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
touch()
return 1
"""
)

# ARGV: key_ttl change_key new_balance ('' when unknown) forget ('1': never applied).
_SETTLE = (
    _PRELUDE
    + """
local delta = drop(P, PX, ARGV[2], 'pend', 'npend')
local left = field('npend')
local exact = false
if ARGV[4] == '1' then
  redis.call('HSET', A, 'at', '0')
elseif delta and redis.call('HEXISTS', A, 'inc') == 1 then
  exact = left <= 0 and redis.call('HGET', A, 'ovl') ~= '1' and ARGV[3] ~= ''
  if exact then
    redis.call('HSET', A, 'cur', ARGV[3])
  else
    redis.call('HSET', A, 'cur', num(math.max(field('cur') + delta, 0)))
  end
end
if left <= 0 then redis.call('HDEL', A, 'ovl') end
if exact then return 1 end
return 0
"""
)

# ARGV: key_ttl. The allowance with our unconfirmed changes applied, its age, the units held.
_STATE = (
    _PRELUDE
    + """
local a = redis.call('HMGET', A, 'cur', 'inc', 'unl', 'ovr', 'bill', 'asof', 'at')
local held = num(field('held'))
if not a[2] then return {held} end
return {held, num(math.max(tonumber(a[1]) + field('pend'), 0)), a[2], a[3], a[4], a[5] or '0',
        a[6] or '', tostring(now - tonumber(a[7]))}
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
                ("release", _RELEASE),
                ("add_pending", _ADD_PENDING),
                ("settle", _SETTLE),
                ("state", _STATE),
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

    def _run(self, script: str, customer_id: str, feature: str, *args: Any) -> Any:
        base = "commet:quota:{" + customer_id + "\x1f" + feature + "}"
        keys = [base + suffix for suffix in (":a", ":h", ":hx", ":p", ":px", ":r")]
        return self._call(script, self._scripts[script], keys=keys, args=[_KEY_TTL_MS, *args])

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
        reservation = Reservation(customer_id, feature, count)
        answer = self._run(
            "reserve",
            customer_id,
            feature,
            mode,
            count,
            "1" if hard_limit else "0",
            int(ttl * 1000),
            reservation.id,
            max(int(lease * 1000), 1),
        )
        kind = _text(answer[0])
        if kind == "miss":
            return MISS
        held = int(_number(answer[1]))
        if mode == "blind":
            return StoreOutcome("allowed", None, None, held, False, reservation)
        current = _number(answer[2])
        allowance = with_balance(
            QuotaAllowance(
                feature,
                current,
                _number(answer[3]),
                None,
                _number(answer[8]),
                _text(answer[4]) == "1",
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
        answer = self._run(
            "claim", customer_id, feature, max(int(lease * 1000), 1), int(ttl * 1000)
        )
        return bool(answer)

    def end_read(self, customer_id: str, feature: str) -> None:
        """Give the read claim back."""
        key = "commet:quota:{" + customer_id + "\x1f" + feature + "}:r"
        self._call("end_read", self._client.delete, key)

    def reading(self, customer_id: str, feature: str) -> bool:
        """Return True while a read claim is held."""
        key = "commet:quota:{" + customer_id + "\x1f" + feature + "}:r"
        return bool(self._call("reading", self._client.exists, key))

    def _state(self, customer_id: str, feature: str) -> list[Any]:
        return list(self._run("state", customer_id, feature))

    def fresh(self, customer_id: str, feature: str, ttl: float) -> bool:
        """Return True when the stored allowance is younger than ``ttl``."""
        answer = self._state(customer_id, feature)
        return len(answer) > 1 and int(_number(answer[7])) < ttl * 1000

    def save_allowance(self, customer_id: str, feature: str, allowance: QuotaAllowance) -> None:
        """Store Commet's answer and end the read claim."""
        self._run(
            "save",
            customer_id,
            feature,
            repr(allowance.current),
            repr(allowance.included),
            repr(allowance.billed_quantity),
            "1" if allowance.unlimited else "0",
            "1" if allowance.overage_enabled else "0",
            allowance.as_of or "",
        )

    def commit(self, reservation: Reservation, change_key: str, pending_ttl: float) -> bool:
        """Turn the held units into an unconfirmed change, on the server."""
        done = self._run(
            "commit",
            reservation.customer_id,
            reservation.feature,
            reservation.id,
            change_key,
            int(pending_ttl * 1000),
        )
        return bool(done)

    def release(self, reservation: Reservation) -> bool:
        """Give the held units back."""
        return bool(
            self._run("release", reservation.customer_id, reservation.feature, reservation.id)
        )

    def add_pending(
        self, customer_id: str, feature: str, change_key: str, delta: int, pending_ttl: float
    ) -> None:
        """Count a change of ours as unconfirmed."""
        self._run("add_pending", customer_id, feature, change_key, delta, int(pending_ttl * 1000))

    def confirm(
        self, customer_id: str, feature: str, change_key: str, new_balance: Number | None
    ) -> bool:
        """Fold a confirmed change into the stored balance."""
        balance = "" if new_balance is None else repr(new_balance)
        return bool(self._run("settle", customer_id, feature, change_key, balance, "0"))

    def forget(self, customer_id: str, feature: str, change_key: str) -> None:
        """Drop the change and make the next check read Commet."""
        self._run("settle", customer_id, feature, change_key, "", "1")

    def in_flight(self, customer_id: str, feature: str) -> int:
        """Return the units held (leases not expired)."""
        return int(_number(self._state(customer_id, feature)[0]))

    def last_known(self, customer_id: str, feature: str) -> QuotaAllowance | None:
        """Return the stored allowance with our unconfirmed changes applied."""
        answer = self._state(customer_id, feature)
        if len(answer) < 2:
            return None
        current = _number(answer[1])
        base = QuotaAllowance(
            feature,
            current,
            _number(answer[2]),
            None,
            _number(answer[5]),
            _text(answer[3]) == "1",
            _text(answer[4]) == "1",
            _text(answer[6]) or None,
        )
        return with_balance(base, current)

    def begin_idempotent(self, record: str, fingerprint: str, lease: float) -> IdempotencyState:
        """Claim ``record`` for this request, or say why not."""
        answer = self._call(
            "begin_idempotent",
            self._scripts["begin_idempotent"],
            keys=["commet:idem:" + record],
            args=[fingerprint, max(int(lease * 1000), 1)],
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
        self._call(
            "abandon_idempotent",
            self._scripts["abandon_idempotent"],
            keys=["commet:idem:" + record],
            args=[fingerprint],
        )

    def close(self) -> None:
        """Close the connection pool."""
        with contextlib.suppress(*self._errors):
            self._client.close()
