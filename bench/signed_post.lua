-- wrk driver for the signed-webhook benchmarks (bench/webhooks.py writes the requests and runs it
-- for bench/feishu_webhook.py and bench/slack_events.py; see docs/benchmarks.md).
--
-- BENCH_REQUESTS names a file of pre-built requests, four lines each: the values of the three
-- headers named in BENCH_HEADERS (comma-separated; "-" as a value leaves that header out), then
-- the body (a signed event with its own event and message id). BENCH_PATH is the URL path. Thread t of T sends requests t, t+T, t+2T, ... so no two
-- requests share an event. 2xx counts as accepted; done() prints "BENCH_JSON {...}".

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  local path = os.getenv("BENCH_REQUESTS")
  nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")
  url_path = os.getenv("BENCH_PATH")
  header_names = {}
  for name in string.gmatch(os.getenv("BENCH_HEADERS"), "[^,]+") do table.insert(header_names, name) end
  reqs = {}
  local f = assert(io.open(path, "r"))
  local lines = {}
  for line in f:lines() do table.insert(lines, line) end
  f:close()
  for i = 1, #lines, 4 do
    table.insert(reqs, { lines[i], lines[i + 1], lines[i + 2], lines[i + 3] })
  end
  sent = 0
  accepted = 0
  failed = 0
  wrapped = 0
end

function request()
  local index = tid + sent * nthreads
  if index >= #reqs then
    wrapped = wrapped + 1
    index = index % #reqs
  end
  sent = sent + 1
  local r = reqs[index + 1]
  local headers = { ["Content-Type"] = "application/json" }
  for i, name in ipairs(header_names) do
    if r[i] ~= "-" then headers[name] = r[i] end
  end
  return wrk.format("POST", url_path, headers, r[4])
end

function response(status, hdrs, body)
  if status >= 200 and status < 300 then
    accepted = accepted + 1
  else
    failed = failed + 1
  end
end

function done(summary, latency, requests)
  local s, a, f, w = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    s = s + t:get("sent")
    a = a + t:get("accepted")
    f = f + t:get("failed")
    w = w + t:get("wrapped")
  end
  io.write(string.format(
    'BENCH_JSON {"sent":%d,"accepted":%d,"failed":%d,"wrapped":%d,"requests":%d,"duration_us":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
    s, a, f, w, summary.requests, summary.duration,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.status,
    summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
