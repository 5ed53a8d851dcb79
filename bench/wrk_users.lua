-- wrk script of bench/bench_reads.py: every request reads a random user's cached timeline.
--
--   wrk -t2 -c64 -d10s --latency -s bench/wrk_users.lua http://127.0.0.1:3005 \
--       -- <users file> [path prefix] [bearer token | -] [gzip | plain]
--
-- The users file holds one user id per line. The default prefix is /api/cache/ and the default
-- token sandbox-service; "gzip" adds Accept-Encoding: gzip. Requests are formatted once in
-- init(), so the load generator (which shares the CPUs with the server) spends its time on
-- sockets rather than on Lua.

local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("thread_number", counter)
end

local requests = {}

function init(args)
  local file = args[1] or error("usage: -- <users file> [prefix] [token|-] [gzip|plain]")
  local prefix = args[2] or "/api/cache/"
  local token = args[3] or "sandbox-service"
  local headers = {}
  if token ~= "-" then
    headers["Authorization"] = "Bearer " .. token
  end
  if args[4] == "gzip" then
    headers["Accept-Encoding"] = "gzip"
  end
  for line in io.lines(file) do
    if #line > 0 then
      requests[#requests + 1] = wrk.format("GET", prefix .. line, headers)
    end
  end
  if #requests == 0 then
    error("no user ids in " .. file)
  end
  math.randomseed(os.time() * 1000 + (thread_number or 0))
end

function request()
  return requests[math.random(#requests)]
end
