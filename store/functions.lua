#!lua name=tcpcp
-- tcpcp checkpoint store: every write, atomically, with the epoch (fencing token) checked.
-- Loaded and versioned by store/client.py on connect; bump LIBRARY_VERSION on every change.
--
-- KEYS, always the four keys of one origin (one hash tag, one cluster slot):
--   1 meta   hash   epoch, owner
--   2 lease  string holder, with TTL
--   3 rec    hash   conn -> record bytes
--   4 ver    hash   conn -> version (decimal string)
-- Refusals are error replies "TCPCP_<REASON> key=value ...", parsed by the client.

local LIBRARY_VERSION = 3

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

-- ARGV: epoch, max_records, max_record_bytes, then triples conn, version, record.
-- Returns one status per triple: "OK", "VERSION_NOT_NEWER <stored>", "TOO_MANY <count>",
-- "TOO_LARGE <bytes>". A stale epoch refuses the whole batch.
local function put(keys, args)
  local refused = check_epoch(keys[1], args[1])
  if refused then return refused end
  local max_records = tonumber(args[2])
  local max_bytes = tonumber(args[3])
  local count = redis.call('HLEN', keys[4])
  local statuses = {}
  for i = 4, #args, 3 do
    local conn, ver, record = args[i], args[i + 1], args[i + 2]
    local stored = redis.call('HGET', keys[4], conn)
    if #record > max_bytes then
      statuses[#statuses + 1] = 'TOO_LARGE ' .. #record
    elseif stored and not greater(ver, stored) then
      statuses[#statuses + 1] = 'VERSION_NOT_NEWER ' .. stored
    elseif not stored and count >= max_records then
      statuses[#statuses + 1] = 'TOO_MANY ' .. count
    else
      if not stored then count = count + 1 end
      redis.call('HSET', keys[3], conn, record)
      redis.call('HSET', keys[4], conn, ver)
      statuses[#statuses + 1] = 'OK'
    end
  end
  return statuses
end

-- ARGV: epoch, conn... Returns how many records were deleted.
local function delete(keys, args)
  local refused = check_epoch(keys[1], args[1])
  if refused then return refused end
  local deleted = 0
  for i = 2, #args do
    deleted = deleted + redis.call('HDEL', keys[3], args[i])
    redis.call('HDEL', keys[4], args[i])
  end
  return deleted
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
redis.register_function('tcpcp_lease_acquire', lease_acquire)
redis.register_function('tcpcp_lease_renew', lease_renew)
redis.register_function('tcpcp_lease_release', lease_release)
redis.register_function('tcpcp_claim', claim)
redis.register_function{function_name='tcpcp_state', callback=state, flags={'no-writes'}}
