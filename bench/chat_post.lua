-- wrk driver for the web chat ingest benchmark (bench/ingest.py runs it; see docs/benchmarks.md).
--
-- Every request is a POST /chat/api/messages with a unique client_msg_id:
--   {"conversation_id":"c<k>","user_id":"bench","text":"echo <n>","client_msg_id":"<prefix>-<tid>-<n>"}
-- where n counts this thread's requests and k = n mod BENCH_CONVS.
-- Responses are classified in Lua: 2xx without "duplicate": true -> accepted, 2xx with it ->
-- duplicate, anything else -> failed. done() prints one line "BENCH_JSON {...}" for the caller.
--
-- Environment: BENCH_PREFIX (id prefix, unique per run), BENCH_CONVS (conversations, default 1000).

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  prefix = os.getenv("BENCH_PREFIX") or "r"
  nconv = tonumber(os.getenv("BENCH_CONVS") or "1000")
  sent = 0
  accepted = 0
  duplicate = 0
  failed = 0
  headers = { ["Content-Type"] = "application/json" }
end

function request()
  local n = sent
  sent = sent + 1
  local text = string.format("echo %d", n)
  local body = string.format(
    '{"conversation_id":"c%d","user_id":"bench","text":"%s","client_msg_id":"%s-%d-%d"}',
    n % nconv, text, prefix, tid, n)
  return wrk.format("POST", "/chat/api/messages", headers, body)
end

function response(status, hdrs, body)
  if status >= 200 and status < 300 then
    if body and string.find(body, '"duplicate": true', 1, true) then
      duplicate = duplicate + 1
    else
      accepted = accepted + 1
    end
  else
    failed = failed + 1
  end
end

function done(summary, latency, requests)
  local s, a, d, f = 0, 0, 0, 0
  local per_thread = {}
  for _, t in ipairs(threads) do
    s = s + t:get("sent")
    a = a + t:get("accepted")
    d = d + t:get("duplicate")
    f = f + t:get("failed")
    table.insert(per_thread, string.format('{"tid":%d,"sent":%d}', t:get("tid"), t:get("sent")))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"duration_us":%d,"requests":%d,"bytes":%d,"sent":%d,"accepted":%d,"duplicate":%d,' ..
    '"failed":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"max":%d},"threads":[%s]}\n',
    summary.duration, summary.requests, summary.bytes, s, a, d, f,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    table.concat(per_thread, ",")))
end
