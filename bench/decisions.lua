-- wrk script for replayguard's decision endpoints (driven by bench/run.py).
--
-- Arguments (after `--`): token, pattern, otp_file, run_id, nthreads, replay_file, latency_file
--   pattern   one letter per request, cycled: N fresh nonce, O fresh TOTP code,
--             R replay (alternately a nonce and a code this thread had accepted earlier),
--             I invalid code, P replay-only (the next line of replay_file, cycled)
--   otp_file  lines "o <principal> <code>" (fresh codes of the current time step) and
--             "i <principal> <code>" (codes that match no step of the window); thread k
--             of n takes every n-th line, so no two threads send the same fresh code
--   replay_file  lines "<vm_id> <nonce>" consumed before the run ("-" when unused)
--   latency_file  each thread k writes "<completion ms since the epoch> <latency us> <reason>" per
--             answer to latency_file.k ("-": not recorded); each request carries an
--             X-Request-Id the service echoes, which pairs an answer with its send time
-- Each thread counts what it sent by kind and what came back by status and reason;
-- done() prints one line "BENCHJSON {...}" that run.py parses.

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } rg_timespec;
int clock_gettime(int clk_id, rg_timespec *tp);
]]
local clock_buf = ffi.new("rg_timespec")
local function now_us()
   ffi.C.clock_gettime(0, clock_buf)   -- CLOCK_REALTIME: comparable with the samplers' times
   return tonumber(clock_buf.tv_sec) * 1000000 + math.floor(tonumber(clock_buf.tv_nsec) / 1000)
end

local threads = {}
local nthreads_setup = 0

function setup(thread)
   nthreads_setup = nthreads_setup + 1
   thread:set("tid", nthreads_setup)
   table.insert(threads, thread)
end

local VMS = 256
local REPLAY_LAG = 512   -- replay what was sent this many fresh requests ago (committed by now)

local headers, pattern, plen, run_id
local fresh_otps, invalid_otps, replay_lines = {}, {}, {}
local next_otp, next_invalid, next_replay = 1, 1, 1
local nonce_ring, otp_ring = {}, {}
local nonce_count, otp_count, replay_flip = 0, 0, 0
local pos = 0
local sent_at, req_count, lat_out = {}, 0, nil
sent = {N = 0, O = 0, R = 0, I = 0, P = 0, O_short = 0, R_short = 0}
statuses = {}
reasons = {}
otp_used = 0

local function slice(path, nthreads, keep)
   if path == "-" then return end
   local k = 0
   for line in io.lines(path) do
      k = k + 1
      if (k - 1) % nthreads == tid - 1 then keep(line) end
   end
end

function init(args)
   local token, otp_file, nthreads, replay_file = args[1], args[3], tonumber(args[5]), args[6]
   if args[7] and args[7] ~= "-" then lat_out = io.open(args[7] .. "." .. tid, "w") end
   pattern, run_id = args[2], args[4]
   plen = #pattern
   headers = {["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json"}
   slice(otp_file, nthreads, function(line)
      local kind, principal, code = line:match("^(%a) (%S+) (%d+)$")
      if kind == "o" then table.insert(fresh_otps, {principal, code})
      elseif kind == "i" then table.insert(invalid_otps, {principal, code}) end
   end)
   slice(replay_file, nthreads, function(line)
      local vm, nonce = line:match("^(%S+) (%S+)$")
      if vm then table.insert(replay_lines, {vm, nonce}) end
   end)
   pos = (tid * 7) % plen
end

local function nonce_body(vm, nonce)
   return string.format('{"vm_id":"%s","scope":"bench","nonce":"%s","ttl_s":300}', vm, nonce)
end

local function otp_body(vm, principal, code)
   return string.format('{"vm_id":"%s","principal":"%s","otp":"%s","context":{"service":"sshd"}}',
                        vm, principal, code)
end

local function fresh_nonce()
   nonce_count = nonce_count + 1
   local vm = run_id .. "v" .. ((nonce_count * 31 + tid) % VMS)
   local nonce = run_id .. "-" .. tid .. "-" .. nonce_count
   nonce_ring[nonce_count % 4096] = {vm, nonce}
   return wrk.format("POST", "/v1/nonces/consume", headers, nonce_body(vm, nonce))
end

local function fresh_otp()
   if next_otp > #fresh_otps then
      sent.O_short = sent.O_short + 1   -- codes ran out: send a fresh nonce instead
      return fresh_nonce()
   end
   local entry = fresh_otps[next_otp]
   next_otp = next_otp + 1
   otp_used = next_otp - 1
   otp_count = otp_count + 1
   local vm = run_id .. "v" .. ((otp_count * 17 + tid) % VMS)
   otp_ring[otp_count % 4096] = {vm, entry[1], entry[2]}
   return wrk.format("POST", "/v1/otp/verify", headers, otp_body(vm, entry[1], entry[2]))
end

local function replay()
   replay_flip = 1 - replay_flip
   if replay_flip == 1 and otp_count > REPLAY_LAG / 8 then
      local e = otp_ring[(otp_count - REPLAY_LAG / 8) % 4096]
      return wrk.format("POST", "/v1/otp/verify", headers, otp_body(e[1], e[2], e[3]))
   end
   if nonce_count > REPLAY_LAG then
      local e = nonce_ring[(nonce_count - REPLAY_LAG) % 4096]
      return wrk.format("POST", "/v1/nonces/consume", headers, nonce_body(e[1], e[2]))
   end
   sent.R_short = sent.R_short + 1      -- nothing old enough yet: a fresh nonce instead
   return fresh_nonce()
end

local function invalid()
   local entry = invalid_otps[(next_invalid - 1) % #invalid_otps + 1]
   next_invalid = next_invalid + 1
   local vm = run_id .. "v" .. (next_invalid % VMS)
   return wrk.format("POST", "/v1/otp/verify", headers, otp_body(vm, entry[1], entry[2]))
end

local function replay_only()
   local entry = replay_lines[(next_replay - 1) % #replay_lines + 1]
   next_replay = next_replay + 1
   return wrk.format("POST", "/v1/nonces/consume", headers, nonce_body(entry[1], entry[2]))
end

local makers = {N = fresh_nonce, O = fresh_otp, R = replay, I = invalid, P = replay_only}

function request()
   pos = pos % plen + 1
   local kind = pattern:sub(pos, pos)
   sent[kind] = sent[kind] + 1
   if lat_out then
      req_count = req_count + 1
      local id = "b" .. tid .. "-" .. req_count
      headers["X-Request-Id"] = id
      sent_at[id] = now_us()
   end
   return makers[kind]()
end

function response(status, hdrs, body)
   local reason = body:match('"reason":"([%w_]+)"') or ("status_" .. status)
   if lat_out then
      local id = hdrs["X-Request-Id"] or hdrs["x-request-id"]
      local t0 = id and sent_at[id]
      if t0 then
         sent_at[id] = nil
         local t = now_us()
         lat_out:write(math.floor(t / 1000), " ", t - t0, " ", reason, "\n")
      end
   end
   statuses[status] = (statuses[status] or 0) + 1
   reasons[reason] = (reasons[reason] or 0) + 1
end

local function encode(t)
   local parts = {}
   for k, v in pairs(t) do
      if type(v) == "table" then
         table.insert(parts, string.format('"%s":%s', tostring(k), encode(v)))
      else
         table.insert(parts, string.format('"%s":%s', tostring(k), tostring(v)))
      end
   end
   return "{" .. table.concat(parts, ",") .. "}"
end

local function add(into, from)
   for k, v in pairs(from or {}) do into[tostring(k)] = (into[tostring(k)] or 0) + v end
end

function done(summary, latency, requests)
   local out = {
      requests = summary.requests, duration_us = summary.duration,
      errors = summary.errors,
      latency_us = {p50 = latency:percentile(50), p95 = latency:percentile(95),
                    p99 = latency:percentile(99), max = latency.max, mean = latency.mean},
      sent = {}, statuses = {}, reasons = {}, otp_used = {},
   }
   for _, thread in ipairs(threads) do
      add(out.sent, thread:get("sent"))
      add(out.statuses, thread:get("statuses"))
      add(out.reasons, thread:get("reasons"))
      out.otp_used[tostring(thread:get("tid"))] = thread:get("otp_used")
   end
   io.write("BENCHJSON " .. encode(out) .. "\n")
end
