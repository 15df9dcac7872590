-- wrk driver for bench/run.py. Arguments (after "--"):
--   path mode prefix n body [limit]
-- mode: fresh  every request a new Idempotency-Key (prefix-counter)
--       fixed  the same key on every request (prefix)
--       dup    groups of n consecutive requests share a key: concurrent duplicates across the connections
--       cycle  keys prefix-0 .. prefix-(n-1) in turn (keys created beforehand: key reuse, replays)
--       none   no key header (keyless requests)
--       mix    memory run: fresh /leased, fresh /atomic, replay /leased, keyless /optional in turn
-- body: "a" or "b" (the same shape, another amount: "b" is another command under the same key)
-- limit: stop the thread after that many responses (0 = run for the duration)
local path, mode, prefix, n, body_name, limit
local counter = 0
local responses = 0
statuses = {}

local bodies = {
  a = '{"amount": 1250, "currency": "EUR", "creditor": "ACME GmbH", "reference": "invoice 2024-0042"}',
  b = '{"amount": 9999, "currency": "EUR", "creditor": "ACME GmbH", "reference": "invoice 2024-0042"}',
}

function init(args)
  path = args[1]
  mode = args[2]
  prefix = args[3]
  n = tonumber(args[4]) or 1
  body_name = args[5] or "a"
  limit = tonumber(args[6]) or 0
end

local function headers_for(key)
  local h = { ["Content-Type"] = "application/json" }
  if key then
    h["Idempotency-Key"] = key
  end
  return h
end

function request()
  local c = counter
  counter = counter + 1
  local key
  local p = path
  if mode == "fresh" then
    key = prefix .. "-" .. c
  elseif mode == "fixed" then
    key = prefix
  elseif mode == "dup" then
    key = prefix .. "-" .. math.floor(c / n)
  elseif mode == "cycle" then
    key = prefix .. "-" .. (c % n)
  elseif mode == "mix" then
    local m = c % 4
    if m == 0 then
      p, key = "/leased", prefix .. "-l-" .. c
    elseif m == 1 then
      p, key = "/atomic", prefix .. "-a-" .. c
    elseif m == 2 then
      p, key = "/leased", prefix .. "-replay"
    else
      p, key = "/optional", nil
    end
  end
  return wrk.format("POST", p, headers_for(key), bodies[body_name])
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  responses = responses + 1
  if limit > 0 and responses >= limit then
    wrk.thread:stop()
  end
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local totals = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    if s then
      for code, count in pairs(s) do
        totals[code] = (totals[code] or 0) + count
      end
    end
  end
  local parts = {}
  for code, count in pairs(totals) do
    parts[#parts + 1] = string.format('"%s": %d', tostring(code), count)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"latency_us": {"min": %d, "mean": %.1f, "max": %d, "p50": %d, "p90": %d, "p99": %d, "p999": %d}, '
      .. '"statuses": {%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    table.concat(parts, ", ")
  ))
end
