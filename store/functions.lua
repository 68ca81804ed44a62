#!lua name=tcpcp
-- tcpcp checkpoint store: every write, atomically, with the epoch (fencing token) checked.
-- Loaded and versioned by store/client.py on connect; bump LIBRARY_VERSION on every change.
--
-- KEYS, always the four keys of one origin (one hash tag, one cluster slot):
--   1 meta   hash   epoch, owner
--   2 lease  string holder, with TTL
--   3 rec    hash   conn -> record bytes
--   4 ver    hash   conn -> version (decimal string)
-- and, for the output log functions (and delete), after them:
--   5 outpos hash   conn -> "start first end": the log holds outbound bytes [start, end);
--                   its stream holds whole appends from `first` (<= start) on
--   6.. out  stream one per item of ARGV, in order: the item's connection's output log,
--                   one entry per append, ID "<offset>-1", field b = the signed entry
-- Refusals are error replies "TCPCP_<REASON> key=value ...", parsed by the client.

local LIBRARY_VERSION = 4

-- decimal strings without leading zeros, compared as unsigned integers of any width
local function greater(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end

local function current_epoch(meta)
  return redis.call('HGET', meta, 'epoch') or '0'
end

-- Epochs travel as decimal strings, never as Lua numbers (doubles: exact only up to 2^53).
-- HINCRBY stops at 2^63-1; at that point the origin cannot be claimed again.
local EPOCH_MAX = '9223372036854775807'

local function bump_epoch(meta)
  local current = current_epoch(meta)
  if not greater(EPOCH_MAX, current) then
    return nil, redis.error_reply('TCPCP_EPOCH_EXHAUSTED current=' .. current)
  end
  redis.call('HINCRBY', meta, 'epoch', 1)
  return redis.call('HGET', meta, 'epoch'), nil
end

local function check_epoch(meta, epoch)
  local current = current_epoch(meta)
  if current ~= epoch then
    return redis.error_reply('TCPCP_STALE_EPOCH given=' .. epoch .. ' current=' .. current)
  end
  if current == '0' then  -- never leased (or its state was lost): nobody may write yet
    return redis.error_reply('TCPCP_UNOWNED epoch=0')
  end
  return nil
end

local function version(keys, args)
  return LIBRARY_VERSION
end

-- Whether a record may be stored: "OK" (then `is_new` says it adds a connection) or a refusal.
local function check_record(keys, conn, ver, record, lim)
  local stored = redis.call('HGET', keys[4], conn)
  if #record > lim.record_bytes then
    return 'TOO_LARGE ' .. #record
  elseif stored and not greater(ver, stored) then
    return 'VERSION_NOT_NEWER ' .. stored
  elseif not stored and lim.records_held >= lim.records then
    return 'TOO_MANY ' .. lim.records_held
  end
  return 'OK', not stored
end

local function write_record(keys, conn, ver, record, is_new, lim)
  if is_new then lim.records_held = lim.records_held + 1 end
  redis.call('HSET', keys[3], conn, record)
  redis.call('HSET', keys[4], conn, ver)
end

-- ARGV: epoch, max_records, max_record_bytes, then triples conn, version, record.
-- Returns one status per triple: "OK", "VERSION_NOT_NEWER <stored>", "TOO_MANY <count>",
-- "TOO_LARGE <bytes>". A stale epoch refuses the whole batch.
local function put(keys, args)
  local refused = check_epoch(keys[1], args[1])
  if refused then return refused end
  local lim = {records = tonumber(args[2]), record_bytes = tonumber(args[3]),
               records_held = redis.call('HLEN', keys[4])}
  local statuses = {}
  for i = 4, #args, 3 do
    local conn, ver, record = args[i], args[i + 1], args[i + 2]
    local status, is_new = check_record(keys, conn, ver, record, lim)
    if status == 'OK' then write_record(keys, conn, ver, record, is_new, lim) end
    statuses[#statuses + 1] = status
  end
  return statuses
end

-- ARGV: epoch, conn... Returns how many records were deleted. Each connection's output log
-- goes with its record (KEYS 5 and 6.., when given: a version 3 client sends four keys).
local function delete(keys, args)
  local refused = check_epoch(keys[1], args[1])
  if refused then return refused end
  local deleted = 0
  for i = 2, #args do
    deleted = deleted + redis.call('HDEL', keys[3], args[i])
    redis.call('HDEL', keys[4], args[i])
    if keys[5] and keys[4 + i] then
      redis.call('HDEL', keys[5], args[i])
      redis.call('DEL', keys[4 + i])
    end
  end
  return deleted
end

-- --- output logs --------------------------------------------------------------------------
-- Offsets are unsigned 64-bit decimal strings without leading zeros, never Lua numbers;
-- only byte counts (bounded by the limits, far below 2^53) are numbers.

-- a + n, for a decimal string a and a Lua integer 0 <= n < 2^53
local function add(a, n)
  local digits, carry, i = {}, n, #a
  while i >= 1 or carry > 0 do
    local d = carry % 10
    carry = (carry - d) / 10
    if i >= 1 then d = d + string.byte(a, i) - 48 end
    if d >= 10 then d, carry = d - 10, carry + 1 end
    digits[#digits + 1] = string.char(48 + d)
    i = i - 1
  end
  return string.reverse(table.concat(digits))
end

-- a - b as a Lua number, for decimal strings a >= b whose difference is below 2^53
local function sub(a, b)
  local result, scale, borrow = 0, 1, 0
  for k = 0, #a - 1 do
    local d = string.byte(a, #a - k) - 48 - borrow
    if k < #b then d = d - (string.byte(b, #b - k) - 48) end
    if d < 0 then d, borrow = d + 10, 1 else borrow = 0 end
    result = result + d * scale
    scale = scale * 10
  end
  return result
end

local function count(n)
  return string.format('%d', n)
end

local function output_state(outpos, conn)
  local raw = redis.call('HGET', outpos, conn)
  if not raw then return nil end
  local start, first, stop = string.match(raw, '^(%d+) (%d+) (%d+)$')
  if not start then
    return nil, redis.error_reply('TCPCP_OUTPUT_STATE_CORRUPT conn=' .. conn)
  end
  return {start = start, first = first, stop = stop}
end

local function put_state(outpos, conn, st)
  redis.call('HSET', outpos, conn, st.start .. ' ' .. st.first .. ' ' .. st.stop)
end

-- Whether `n` bytes may be appended at `offset` to conn's log: "OK", "DUP" (this very entry
-- is stored already: a retried append) or a refusal; and the log's state (nil: no log yet).
local function check_output(keys, stream, conn, offset, n, entry, lim)
  if n > lim.append then return 'TOO_LARGE_APPEND ' .. count(n) end
  local st, err = output_state(keys[5], conn)
  if err then return nil, nil, err end
  if not st then
    if n > 0 and lim.logs_held >= lim.logs then return 'TOO_MANY_LOGS ' .. lim.logs_held end
    return 'OK', nil
  end
  if offset ~= st.stop then
    if n > 0 and greater(st.stop, offset) and not greater(st.first, offset) then
      local id = offset .. '-1'
      local found = redis.call('XRANGE', stream, id, id)
      if found[1] and found[1][2][2] == entry then return 'DUP', st end
    end
    return 'OFFSET ' .. st.stop, st
  end
  if n == 0 then return 'OK', st end
  local held = sub(st.stop, st.first)
  if held + n > lim.held then return 'FULL ' .. count(held) end
  local entries = redis.call('XLEN', stream)
  if entries >= lim.entries then return 'TOO_MANY_ENTRIES ' .. count(entries) end
  return 'OK', st
end

local function write_output(keys, stream, conn, offset, n, entry, st, status, lim)
  if status == 'DUP' then
    -- a no-op rewrite, so that this call's WAIT / WAITAOF also covers the stored original
    put_state(keys[5], conn, st)
    return
  end
  if n == 0 then return end
  if not st then
    st = {start = offset, first = offset, stop = offset}
    lim.logs_held = lim.logs_held + 1
  end
  redis.call('XADD', stream, offset .. '-1', 'b', entry)
  st.stop = add(st.stop, n)
  put_state(keys[5], conn, st)
end

local function output_limits(keys, args, at)
  return {append = tonumber(args[at]), held = tonumber(args[at + 1]),
          entries = tonumber(args[at + 2]), logs = tonumber(args[at + 3]),
          logs_held = redis.call('HLEN', keys[5])}
end

-- ARGV: epoch, max_append, max_held, max_entries, max_logs, then quadruples conn, offset,
-- length, entry (KEYS 6.. one stream per quadruple). An append must start where the log ends
-- (a new log starts anywhere). Returns one status per quadruple: "OK", "DUP",
-- "OFFSET <end>", "TOO_LARGE_APPEND <n>", "FULL <held>", "TOO_MANY_ENTRIES <n>",
-- "TOO_MANY_LOGS <n>". A stale epoch refuses the whole batch.
local function output_append(keys, args)
  local refused = check_epoch(keys[1], args[1])
  if refused then return refused end
  local lim = output_limits(keys, args, 2)
  local statuses = {}
  for i = 6, #args, 4 do
    local stream = keys[6 + (i - 6) / 4]
    local conn, offset, n, entry = args[i], args[i + 1], tonumber(args[i + 2]), args[i + 3]
    local status, st, err = check_output(keys, stream, conn, offset, n, entry, lim)
    if err then return err end
    if status == 'OK' or status == 'DUP' then
      write_output(keys, stream, conn, offset, n, entry, st, status, lim)
    end
    statuses[#statuses + 1] = status
  end
  return statuses
end

-- ARGV: epoch, max_records, max_record_bytes, max_append, max_held, max_entries, then
-- sextuples conn, version, record, offset, length, entry (KEYS 6.. one stream per sextuple).
-- Each record and its append are stored together or not at all; one status per sextuple,
-- the record's refusal first (as put's), then the append's (as output_append's).
local function put_output(keys, args)
  local refused = check_epoch(keys[1], args[1])
  if refused then return refused end
  local lim = {records = tonumber(args[2]), record_bytes = tonumber(args[3]),
               records_held = redis.call('HLEN', keys[4]),
               append = tonumber(args[4]), held = tonumber(args[5]),
               entries = tonumber(args[6]), logs = tonumber(args[2]),
               logs_held = redis.call('HLEN', keys[5])}
  local statuses = {}
  for i = 7, #args, 6 do
    local stream = keys[6 + (i - 7) / 6]
    local conn, ver, record = args[i], args[i + 1], args[i + 2]
    local offset, n, entry = args[i + 3], tonumber(args[i + 4]), args[i + 5]
    local status, is_new = check_record(keys, conn, ver, record, lim)
    if status == 'OK' then
      local out_status, st, err = check_output(keys, stream, conn, offset, n, entry, lim)
      if err then return err end
      if out_status == 'OK' or out_status == 'DUP' then
        write_record(keys, conn, ver, record, is_new, lim)
        write_output(keys, stream, conn, offset, n, entry, st, out_status, lim)
      else
        status = out_status
      end
    end
    statuses[#statuses + 1] = status
  end
  return statuses
end

-- ARGV: epoch, then pairs conn, upto (KEYS 6.. one stream per pair): the peer acknowledged
-- every byte below upto. Drops the appends wholly below it; the log then starts at upto
-- (an append straddling it is kept whole: its signature covers all of it). Trimming
-- backwards is a no-op. Returns per pair the log's start, "NONE" without a log, or
-- "OFFSET <end>" when upto lies past the log's end.
local function output_trim(keys, args)
  local refused = check_epoch(keys[1], args[1])
  if refused then return refused end
  local statuses = {}
  for i = 2, #args, 2 do
    local stream = keys[6 + (i - 2) / 2]
    local conn, upto = args[i], args[i + 1]
    local st, err = output_state(keys[5], conn)
    if err then return err end
    if not st then
      statuses[#statuses + 1] = 'NONE'
    elseif greater(upto, st.stop) then
      statuses[#statuses + 1] = 'OFFSET ' .. st.stop
    else
      if greater(upto, st.start) then
        if upto == st.stop then
          redis.call('DEL', stream)
          st.first = upto
        else
          local last = redis.call('XREVRANGE', stream, upto .. '-1', '-', 'COUNT', 1)
          if not last[1] then
            return redis.error_reply('TCPCP_OUTPUT_STATE_CORRUPT conn=' .. conn)
          end
          redis.call('XTRIM', stream, 'MINID', last[1][1])
          st.first = string.sub(last[1][1], 1, -3)
        end
        st.start = upto
        put_state(keys[5], conn, st)
      end
      statuses[#statuses + 1] = st.start
    end
  end
  return statuses
end

-- ARGV: conn, from (KEYS 6 its stream). Returns {} without a log, else {start, end} and, when
-- start <= from < end, the entries from the one holding `from` to the end: id, entry, ...
local function output_read(keys, args)
  local st, err = output_state(keys[5], args[1])
  if err then return err end
  if not st then return {} end
  local from = args[2]
  local reply = {st.start, st.stop}
  if greater(st.start, from) or not greater(st.stop, from) then return reply end
  local holding = redis.call('XREVRANGE', keys[6], from .. '-1', '-', 'COUNT', 1)
  if not holding[1] then return reply end  -- the client refuses a log that lacks its bytes
  for _, item in ipairs(redis.call('XRANGE', keys[6], holding[1][1], '+')) do
    reply[#reply + 1] = item[1]
    reply[#reply + 1] = item[2][2]
  end
  return reply
end

-- ARGV: holder, ttl_ms. Takes the lease (and ownership of a never-owned origin).
-- Returns the epoch the holder writes with (a decimal string).
local function lease_acquire(keys, args)
  local holder, ttl = args[1], args[2]
  local lease = redis.call('GET', keys[2])
  if lease and lease ~= holder then
    return redis.error_reply('TCPCP_LEASE_HELD holder=' .. lease)
  end
  local owner = redis.call('HGET', keys[1], 'owner')
  if owner and owner ~= holder then
    return redis.error_reply('TCPCP_NOT_OWNER owner=' .. owner .. ' epoch=' .. current_epoch(keys[1]))
  end
  local epoch = current_epoch(keys[1])
  if not owner then
    local refused
    epoch, refused = bump_epoch(keys[1])
    if refused then return refused end
    redis.call('HSET', keys[1], 'owner', holder)
  end
  redis.call('SET', keys[2], holder, 'PX', ttl)
  return epoch
end

-- ARGV: holder, epoch, ttl_ms. Extends a live lease of a holder that is not fenced.
local function lease_renew(keys, args)
  local holder, epoch, ttl = args[1], args[2], args[3]
  local refused = check_epoch(keys[1], epoch)
  if refused then return refused end
  local owner = redis.call('HGET', keys[1], 'owner')
  if owner ~= holder then
    return redis.error_reply('TCPCP_NOT_OWNER owner=' .. tostring(owner) .. ' epoch=' .. epoch)
  end
  local lease = redis.call('GET', keys[2])
  if lease ~= holder then
    return redis.error_reply('TCPCP_LEASE_LOST holder=' .. tostring(lease))
  end
  redis.call('PEXPIRE', keys[2], ttl)
  return 1
end

-- ARGV: holder, epoch. Gives the lease up (ownership stays: the epoch still fences others).
local function lease_release(keys, args)
  local holder, epoch = args[1], args[2]
  local refused = check_epoch(keys[1], epoch)
  if refused then return refused end
  local lease = redis.call('GET', keys[2])
  if lease ~= holder then
    return redis.error_reply('TCPCP_LEASE_LOST holder=' .. tostring(lease))
  end
  redis.call('DEL', keys[2])
  return 1
end

-- ARGV: holder, seen_epoch, ttl_ms. Bumps the epoch, makes holder the owner and gives it the
-- lease, provided no other holder's lease is live and nobody claimed since seen_epoch was read:
-- of several claimers that saw the same epoch, exactly one wins. Returns the new epoch (string).
local function claim(keys, args)
  local holder, seen, ttl = args[1], args[2], args[3]
  local lease = redis.call('GET', keys[2])
  if lease and lease ~= holder then
    return redis.error_reply('TCPCP_LEASE_HELD holder=' .. lease)
  end
  local current = current_epoch(keys[1])
  if current ~= seen then
    return redis.error_reply('TCPCP_CLAIM_LOST seen=' .. seen .. ' current=' .. current)
  end
  local epoch, refused = bump_epoch(keys[1])
  if refused then return refused end
  redis.call('HSET', keys[1], 'owner', holder)
  redis.call('SET', keys[2], holder, 'PX', ttl)
  return epoch
end

-- Returns {epoch, owner or "", lease holder or "", lease ms left or -2}: one consistent view.
local function state(keys, args)
  local owner = redis.call('HGET', keys[1], 'owner') or ''
  local lease = redis.call('GET', keys[2]) or ''
  return {current_epoch(keys[1]), owner, lease, redis.call('PTTL', keys[2])}
end

redis.register_function{function_name='tcpcp_version', callback=version, flags={'no-writes'}}
redis.register_function('tcpcp_put', put)
redis.register_function('tcpcp_delete', delete)
redis.register_function('tcpcp_output_append', output_append)
redis.register_function('tcpcp_put_output', put_output)
redis.register_function('tcpcp_output_trim', output_trim)
redis.register_function{function_name='tcpcp_output_read', callback=output_read,
                        flags={'no-writes'}}
redis.register_function('tcpcp_lease_acquire', lease_acquire)
redis.register_function('tcpcp_lease_renew', lease_renew)
redis.register_function('tcpcp_lease_release', lease_release)
redis.register_function('tcpcp_claim', claim)
redis.register_function{function_name='tcpcp_state', callback=state, flags={'no-writes'}}
