-- summon as an HAProxy plugin (HAProxy 2.6+, built with Lua: Debian's haproxy is).
--
-- `http-request lua.summon_decide` asks summon's decision endpoint ([plugin] listen)
-- which instance should answer, and waits while a cold pool boots. It sets:
--   txn.summon_ip, txn.summon_port   the instance (for set-dst / set-dst-port)
--   txn.summon_status                the status the client must get when refused
--                                    (404 no route, 503 no instance, 400...)
--   txn.summon_retry                 Retry-After of a 503
--   txn.summon_lease                 the lease, given back by lua.summon_done
-- `filter lua.summon_done` gives the lease back once the response has been sent.
-- Load it with `lua-load-per-thread` (see the completion hook below).
--
-- Edit SUMMON below, or set the environment variables SUMMON_PLUGIN (HOST:PORT) and
-- SUMMON_TOKEN ([plugin] token) for haproxy.

local SUMMON = os.getenv("SUMMON_PLUGIN") or "127.0.0.1:8082"
local TOKEN = os.getenv("SUMMON_TOKEN")
local TIMEOUT_MS = 60000  -- a cold call waits for the boot: keep this above boot_timeout

-- Fields that are not the client's own, or that summon's description replaces.
local SKIP = {
  ["host"] = true, ["content-length"] = true, ["transfer-encoding"] = true, ["connection"] = true,
  ["keep-alive"] = true, ["upgrade"] = true, ["te"] = true, ["x-forwarded-for"] = true,
  ["x-summon-token"] = true, ["x-summon-done"] = true,
}

local function first(headers, name)
  local values = headers and headers[name]
  if values == nil then return nil end
  return values[0] or values[1]
end

core.register_action("summon_decide", { "http-req" }, function(txn)
  local headers = {}
  for name, values in pairs(txn.http:req_get_headers()) do
    local lname = string.lower(name)
    if not SKIP[lname] and string.sub(lname, 1, 11) ~= "x-original-" then
      local list = {}
      for i = 0, #values do
        if values[i] ~= nil then list[#list + 1] = values[i] end
      end
      headers[name] = list
    end
  end
  headers["X-Original-Method"] = { txn.sf:method() }
  headers["X-Original-URI"] = { txn.sf:pathq() }
  headers["X-Original-Host"] = { txn.sf:req_hdr("host") or "" }
  headers["X-Forwarded-For"] = { txn.sf:src() }
  headers["X-Summon-Done"] = { "1" }
  if TOKEN then headers["X-Summon-Token"] = { TOKEN } end

  local res = core.httpclient():get({ url = "http://" .. SUMMON .. "/decide", headers = headers,
                                      timeout = TIMEOUT_MS })
  if res == nil or res.status == nil or res.status == 0 then
    txn:set_var("txn.summon_status", "503")
    txn:set_var("txn.summon_retry", "1")
    return
  end
  if res.status ~= 204 then
    txn:set_var("txn.summon_status", first(res.headers, "x-summon-status") or tostring(res.status))
    txn:set_var("txn.summon_retry", first(res.headers, "retry-after") or "1")
    return
  end
  local upstream = first(res.headers, "x-summon-upstream") or ""
  local ip, port = string.match(upstream, "^%[?([^%]]+)%]?:(%d+)$")
  if ip == nil then
    txn:set_var("txn.summon_status", "503")
    txn:set_var("txn.summon_retry", "1")
    return
  end
  txn:set_var("txn.summon_ip", ip)
  txn:set_var("txn.summon_port", tonumber(port))
  txn:set_var("txn.summon_lease", first(res.headers, "x-summon-lease") or "")
end)

-- The completion hook: a filter whose end_analyze on the response channel runs once the
-- response has been sent in full (also after an error HAProxy made itself). It only
-- queues the lease: one task per Lua state, started at load time, gives the queued
-- leases back in batches (GET /done?leases=ID:STATUS,...), so a burst costs a few calls,
-- not a task and a call per request. Load this file with lua-load-per-thread: HAProxy
-- 2.6 runs the filters of a shared state (lua-load) without its lock, and with several
-- threads a burst corrupted that state ("Lua filter 'summon_done': attempt to index a
-- thread value"), losing the leases of those requests, once even aborting HAProxy.
local BATCH = 64       -- leases per /done call (the URL stays under 2 kB)
local IDLE_MS = 5      -- how often an empty queue is looked at
local ATTEMPTS = 3     -- a batch that still fails is left to summon's lease_timeout
local pending = {}     -- "ID:STATUS" strings, oldest first

local Done = { id = "summon done", flags = filter.FLT_CFG_FL_HTX }
Done.__index = Done

function Done:new()
  return setmetatable({}, Done)
end

function Done:end_analyze(txn, chn)
  if not chn:is_resp() then return end
  local lease = txn:get_var("txn.summon_lease")
  if lease == nil or lease == "" then return end
  txn:set_var("txn.summon_lease", "")
  pending[#pending + 1] = lease .. ":" .. tostring(txn.sf:status() or 0)
end

core.register_filter("summon_done", Done, function(flt, args) return flt end)

local function give_back(batch)
  local headers = {}
  if TOKEN then headers["X-Summon-Token"] = { TOKEN } end
  local url = "http://" .. SUMMON .. "/done?leases=" .. table.concat(batch, ",")
  for attempt = 1, ATTEMPTS do
    local res = core.httpclient():get({ url = url, headers = headers, timeout = 5000 })
    if res and res.status and res.status > 0 and res.status < 500 then return end
    core.msleep(100 * attempt)
  end
end

core.register_task(function()
  while true do
    if #pending == 0 then
      core.msleep(IDLE_MS)
    else
      local batch = {}
      local n = math.min(#pending, BATCH)
      for i = 1, n do batch[i] = pending[i] end
      table.move(pending, n + 1, #pending + n, 1)  -- drop the first n (the tail shifts down)
      give_back(batch)
    end
  end
end)
