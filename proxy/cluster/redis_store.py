"""The fleet's shared state in Redis: several proxies, on one machine or many.

Why Redis: it is one well-kept server that Debian ships, its Lua scripts run atomically
(a claim reads the permit count and adds a permit with nothing in between, whichever proxy
asks), keys expire by themselves, and a replica can take over from its primary. Every
operation of the `proxy.cluster.store.Store` contract is one script, so one round trip;
the warm request path makes none. Time comes from Redis itself (`TIME` inside the
scripts), so proxies whose clocks disagree still agree on when a lease ends.

Keys (all under the `{summon}` hash tag, so they live in one slot):

    {summon}:permits        ZSET  instance id -> lease end (ms)       the cap is its size
    {summon}:lock:<route>   STRING "node|instance", PX = boot timeout  one cold boot per route
    {summon}:instances      HASH  instance id -> JSON entry             the registry
    {summon}:instances:exp  ZSET  instance id -> lease end
    {summon}:usage          HASH  "node|instance" -> JSON [in flight, idle s, at ms]
    {summon}:usage:exp      ZSET  "node|instance" -> lease end
    {summon}:usage-of:<node> SET  the usage fields a node wrote last time (replaced each sync)
    {summon}:demand         HASH  node -> JSON {route: {client region: recent requests}}
    {summon}:demand:exp     ZSET  node -> lease end
    {summon}:nodes          ZSET  node -> lease end               a boot lock's holder is alive

A Redis failover can cost the cap: writes the old primary acknowledged but had not yet
sent to the replica are lost, so for up to one lease after a failover the new primary may
not know of permits taken just before it. That is bounded: every proxy re-publishes its
instances and their permits on each sync (a tenth of a second), so the count is whole
again within one sync after the failover, and a proxy that finds the fleet over its cap
gives instances back (`proxy.runtime.coordinator`, degraded mode).
"""

from __future__ import annotations

import json
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .store import Claim, Entry, Snapshot, StoreUnavailable, sum_demand

PREFIX = "{summon}:"
PERMITS = PREFIX + "permits"
INSTANCES = PREFIX + "instances"
INSTANCES_EXP = PREFIX + "instances:exp"
USAGE = PREFIX + "usage"
USAGE_EXP = PREFIX + "usage:exp"
DEMAND = PREFIX + "demand"
DEMAND_EXP = PREFIX + "demand:exp"
NODES = PREFIX + "nodes"
STREAM = PREFIX + "events"  # the fleet's event log (proxy.observe.fleetlog)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: permits, lock, instances, nodes   ARGV: instance, node, cold, cap, lease_ms, lock_ms, route
CLAIM = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[5]), ARGV[2])
if ARGV[3] == '1' then
  local holder = redis.call('GET', KEYS[2])
  if holder then
    local owner = string.match(holder, '^(.-)|') or holder
    local alive = tonumber(redis.call('ZSCORE', KEYS[4], owner) or '0')
    if owner ~= ARGV[2] and alive >= now then
      return {0, 'lock', owner, redis.call('PTTL', KEYS[2])}
    end
    -- (a holder that stopped renewing its lease was killed mid-boot: its lock is not waited for)
  end
  local all = redis.call('HGETALL', KEYS[3])
  for i = 2, #all, 2 do
    local e = cjson.decode(all[i])
    if e.route == ARGV[7] and e.state == 'ready' and e.node ~= ARGV[2] then
      return {0, 'ready', e.node, 0}
    end
  end
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return {0, 'cap', '', 0}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), ARGV[1])
if ARGV[3] == '1' then
  redis.call('SET', KEYS[2], ARGV[2] .. '|' .. ARGV[1], 'PX', tonumber(ARGV[6]))
end
return {1, '', '', 0}
"""

# KEYS: instances, instances:exp, lock   ARGV: instance, entry JSON, lease_ms, node
READY = _NOW + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
if redis.call('GET', KEYS[3]) == ARGV[4] .. '|' .. ARGV[1] then
  redis.call('DEL', KEYS[3])
end
return 1
"""

# KEYS: permits, instances, instances:exp, lock   ARGV: instance, node
RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('GET', KEYS[4]) == ARGV[2] .. '|' .. ARGV[1] then
  redis.call('DEL', KEYS[4])
end
return 1
"""

# KEYS: permits, instances, instances:exp, usage, usage:exp, usage-of:<node>, demand, demand:exp, nodes
# ARGV: node, lease_ms, mine [[id, entry JSON], ...], usage [[id, in flight, idle s], ...], demand JSON
SYNC = _NOW + """
local node = ARGV[1]
local lease_end = now + tonumber(ARGV[2])
for _, m in ipairs(cjson.decode(ARGV[3])) do
  redis.call('HSET', KEYS[2], m[1], m[2])
  redis.call('ZADD', KEYS[3], lease_end, m[1])
  redis.call('ZADD', KEYS[1], lease_end, m[1])
end
local old = redis.call('SMEMBERS', KEYS[6])
for _, f in ipairs(old) do
  redis.call('HDEL', KEYS[4], f)
  redis.call('ZREM', KEYS[5], f)
end
redis.call('DEL', KEYS[6])
for _, u in ipairs(cjson.decode(ARGV[4])) do
  local f = node .. '|' .. u[1]
  redis.call('HSET', KEYS[4], f, cjson.encode({u[2], u[3], now}))
  redis.call('ZADD', KEYS[5], lease_end, f)
  redis.call('SADD', KEYS[6], f)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, f in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now)) do
  redis.call('HDEL', KEYS[4], f)
  redis.call('ZREM', KEYS[5], f)
end
redis.call('HSET', KEYS[7], node, ARGV[5])
redis.call('ZADD', KEYS[8], lease_end, node)
redis.call('ZADD', KEYS[9], lease_end, node)
redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', now)
for _, n in ipairs(redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', now)) do
  redis.call('HDEL', KEYS[7], n)
  redis.call('ZREM', KEYS[8], n)
end
return {redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[4]), redis.call('ZCARD', KEYS[1]), now,
        redis.call('HGETALL', KEYS[7])}
"""


def _lock(route: str) -> str:
    return f"{PREFIX}lock:{route}"


def connect(url: str, password: str | None = None, timeout_s: float = 0.5) -> aioredis.Redis:
    """A client that gives up quickly: a Redis that does not answer means degraded mode,
    not requests piling up behind it."""
    kwargs: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                              "health_check_interval": 5, "retry_on_timeout": False}
    if password is not None:
        kwargs["password"] = password
    return aioredis.from_url(url, **kwargs)


def sync_client(url: str, password: str | None = None, timeout_s: float = 1.0) -> redis.Redis:
    """A blocking client, for the CLI and for reads run off the event loop."""
    kwargs: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if password is not None:
        kwargs["password"] = password
    return redis.Redis.from_url(url, **kwargs)


class RedisStore:
    def __init__(self, client: aioredis.Redis, node: str, lease_s: float = 5.0) -> None:
        self.client = client
        self.node = node
        self.lease_ms = int(lease_s * 1000)
        self._claim = client.register_script(CLAIM)
        self._ready = client.register_script(READY)
        self._release = client.register_script(RELEASE)
        self._sync = client.register_script(SYNC)

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def claim(self, route: str, instance_id: str, cold: bool, cap: int, lock_s: float) -> Claim:
        ok, why, who, ttl_ms = await self._call(
            self._claim, [PERMITS, _lock(route), INSTANCES, NODES],
            [instance_id, self.node, "1" if cold else "0", cap, self.lease_ms, int(lock_s * 1000), route])
        if int(ok):
            return Claim(True)
        why, who = _text(why), _text(who)
        if why == "lock":
            return Claim(False, f"node {who} is booting {route}", wait_s=max(0.0, int(ttl_ms) / 1000))
        if why == "ready":
            return Claim(False, f"{route} is ready on node {who}", wait_s=self.lease_ms / 1000)
        return Claim(False, f"fleet at its cap ({cap} instances)")

    async def ready(self, entry: Entry) -> None:
        await self._call(self._ready, [INSTANCES, INSTANCES_EXP, _lock(entry.route)],
                         [entry.instance_id, _entry_json(entry, self.node), self.lease_ms, self.node])

    async def release(self, route: str, instance_id: str) -> None:
        await self._call(self._release, [PERMITS, INSTANCES, INSTANCES_EXP, _lock(route)], [instance_id, self.node])

    async def sync(self, mine: list[Entry], usage: dict[str, tuple[int, float]],
                   demand: dict[str, dict[str, float]] | None = None) -> Snapshot:
        mine_json = json.dumps([[e.instance_id, _entry_json(e, self.node)] for e in mine])
        usage_json = json.dumps([[iid, n, round(idle, 3)] for iid, (n, idle) in usage.items()])
        raw_entries, raw_usage, permits, now_ms, raw_demand = await self._call(
            self._sync, [PERMITS, INSTANCES, INSTANCES_EXP, USAGE, USAGE_EXP, f"{PREFIX}usage-of:{self.node}",
                         DEMAND, DEMAND_EXP, NODES],
            [self.node, self.lease_ms, mine_json if mine else "[]", usage_json if usage else "[]",
             json.dumps(demand or {})])
        entries = []
        for i in range(1, len(raw_entries), 2):
            e = json.loads(raw_entries[i])
            entries.append(Entry(e["id"], e["node"], e["route"], e["image"], e["host"], e["region"], e["address"],
                                 e["state"], e.get("machine", "")))
        ours = {e.instance_id for e in entries if e.node == self.node}
        theirs: dict[str, tuple[int, float]] = {}
        for i in range(0, len(raw_usage), 2):
            who, _, iid = _text(raw_usage[i]).partition("|")
            if who == self.node or iid not in ours:
                continue
            n, idle, at_ms = json.loads(raw_usage[i + 1])
            aged = float(idle) + max(0, int(now_ms) - int(at_ms)) / 1000
            have = theirs.get(iid)
            theirs[iid] = (int(n) + (have[0] if have else 0), min(aged, have[1]) if have else aged)
        others = (json.loads(raw_demand[i + 1]) for i in range(0, len(raw_demand), 2)
                  if _text(raw_demand[i]) != self.node)
        return Snapshot(tuple(entries), theirs, int(permits), sum_demand(others))

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except (RedisError, OSError):
            pass


def _entry_json(e: Entry, node: str) -> str:
    return json.dumps({"id": e.instance_id, "node": node, "route": e.route, "image": e.image, "host": e.host,
                       "region": e.region, "address": e.address, "state": e.state, "machine": e.machine},
                      separators=(",", ":"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
