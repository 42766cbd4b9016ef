//! The Lua scripts: each step the fleet must agree on runs atomically in Redis, on Redis's
//! clock (`TIME`, ms).

use std::sync::LazyLock;

use redis::Script;

const CLOCK: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// KEYS[1] credential record (a hash: `st` state, `ep` epoch, `le` lease end ms, `rd` parked
/// round, `gen` generation, `lost` answer lost, `ans` answered failure JSON, `out` staged
/// `session.created`, sealed, `anew` failed without bunq taking the credential); ARGV lease ms, round, replayed generation (empty: none), keep
/// ms, fresh (`1`: a new message). Returns {found, epoch or generation or round, generation,
/// lost, answered, staged} as strings; the transitions of [`crate::ledger::Book::claim`].
pub static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{CLOCK}{}",
        r"
local h = redis.call('HMGET', KEYS[1], 'st', 'ep', 'le', 'rd', 'gen', 'lost', 'ans', 'out', 'anew')
local st = h[1] or 'free'
local gen = tonumber(h[5]) or 0
if st == 'created' then return {'created', '0'} end
local staged = h[8]
if st == 'failed' then
  local replays = ARGV[3] ~= '' and tonumber(ARGV[3]) == gen
  if replays or (ARGV[5] == '1' and ARGV[3] == '' and h[9] == '1') then
    gen = gen + 1
    redis.call('HSET', KEYS[1], 'gen', gen)
  else
    return {'failed', tostring(gen)}
  end
end
local rd = tonumber(h[4]) or 0
if not staged and st == 'parked' and tonumber(ARGV[2]) < rd and (tonumber(h[3]) or 0) > now then
  return {'parked', tostring(rd)}
end
if st == 'claimed' and (tonumber(h[3]) or 0) > now then return {'held', '0'} end
local ep = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'st', 'claimed', 'ep', ep, 'le', now + tonumber(ARGV[1]))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {'acquired', tostring(ep), tostring(gen), h[6] or '', h[7] or '', staged or ''}
"
    ))
});

/// KEYS[1] credential record; ARGV epoch, lease ms, keep ms. Renews the claim of that epoch
/// and returns `held`, or returns the state that replaced it.
pub static FENCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{CLOCK}{}",
        r"
local h = redis.call('HMGET', KEYS[1], 'st', 'ep')
if h[1] == 'claimed' and h[2] == ARGV[1] then
  redis.call('HSET', KEYS[1], 'le', now + tonumber(ARGV[2]))
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 'held'
end
return h[1] or 'free'
"
    ))
});

/// KEYS[1] credential record; ARGV sealed `session.created`, keep ms. Stages it unless one is
/// staged or the record is created.
pub static STAGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], 'st') == 'created' then return 0 end
local set = redis.call('HSETNX', KEYS[1], 'out', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return set
",
    )
});

/// KEYS[1] credential record; ARGV epoch, failure JSON, keep ms. Keeps the failure on the
/// claim of that epoch (returns 1), or returns 0 when the claim is another's.
pub static ANSWER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local h = redis.call('HMGET', KEYS[1], 'st', 'ep')
if h[1] ~= 'claimed' or h[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'ans', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
",
    )
});

/// KEYS[1] credential record; ARGV keep ms. A session-server answer was lost.
pub static ANSWER_LOST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('HSET', KEYS[1], 'lost', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
",
    )
});

/// KEYS[1] credential record; ARGV epoch, how (`created`, `failed`, `unspent` (failed, bunq
/// never took the credential), `parked`, `answered`, `released`), round, failure JSON, keep ms, stale ms (parked). Returns 1 when the record
/// changed; only `created` changes it without holding the claim.
pub static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{CLOCK}{}",
        r"
local h = redis.call('HMGET', KEYS[1], 'st', 'ep')
local how = ARGV[2]
if how == 'created' then
  redis.call('HSET', KEYS[1], 'st', 'created')
  redis.call('HDEL', KEYS[1], 'ans', 'out')
elseif not (h[1] == 'claimed' and h[2] == ARGV[1]) then
  return 0
elseif how == 'failed' or how == 'unspent' then
  redis.call('HSET', KEYS[1], 'st', 'failed', 'anew', how == 'unspent' and '1' or '0')
  redis.call('HDEL', KEYS[1], 'ans')
elseif how == 'parked' then
  redis.call('HSET', KEYS[1], 'st', 'parked', 'rd', ARGV[3], 'le', now + tonumber(ARGV[6]))
elseif how == 'answered' then
  redis.call('HSET', KEYS[1], 'st', 'free', 'ans', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'st', 'free')
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"
    ))
});

/// KEYS[1] the readiness probe key. Writes it from a script, as every claim does.
pub static PROBE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('SET', KEYS[1], '1', 'PX', 10000)
return 1
",
    )
});

/// KEYS[1] the fleet's seal key; ARGV a fresh random key (hex). The first replica's key wins;
/// returns the fleet's.
pub static SEAL_KEY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
",
    )
});

const NOW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'next', 'paused', 'learned')
local nxt = tonumber(h[1]) or 0
local paused = tonumber(h[2]) or 0
local learned = tonumber(h[3]) or 0
";

fn with_now(body: &str) -> Script {
    Script::new(&format!("{NOW}{body}"))
}

/// KEYS[1] rate hash; ARGV base interval ms (0: none). Takes the scope's next slot if it is
/// due, spacing the one after by the slower of the base and the learned interval: returns
/// {1, next before, take number}; else takes nothing and returns {0, ms until it is due, 0}.
/// Every take has a number of its own (`seq`), so a slot is given back only by its taker.
pub static TAKE: LazyLock<Script> = LazyLock::new(|| {
    with_now(
        r"
local slot = math.max(now, nxt, paused)
if slot > now then return {0, slot - now, 0} end
local interval = math.max(tonumber(ARGV[1]), learned)
if interval > 0 then redis.call('HSET', KEYS[1], 'next', now + interval) end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('PEXPIRE', KEYS[1], 86400000)
return {1, nxt, seq}
",
    )
});

/// KEYS[1] rate hash. Returns ms until the scope's next slot is due (0: now), taking nothing.
pub static PEEK: LazyLock<Script> = LazyLock::new(|| {
    with_now(
        r"
return math.max(now, nxt, paused) - now
",
    )
});

/// KEYS[1] rate hash; ARGV next before the take, the take's number. Gives the slot back
/// unless another take came since.
pub static GIVE_BACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], 'seq') == ARGV[2] then
  redis.call('HSET', KEYS[1], 'next', ARGV[1])
end
return 1
",
    )
});

/// KEYS[1] rate hash; ARGV base interval ms (0: none). The next slot is at least one interval
/// (the slower of the base and the learned one) after now.
pub static ANSWERED: LazyLock<Script> = LazyLock::new(|| {
    with_now(
        r"
local interval = math.max(tonumber(ARGV[1]), learned)
if interval > 0 then redis.call('HSET', KEYS[1], 'next', math.max(nxt, now + interval)) end
redis.call('PEXPIRE', KEYS[1], 86400000)
return 1
",
    )
});

/// KEYS[1] rate hash; ARGV window ms, jitter ms, learned interval ms. Returns the pause left.
pub static RATE_LIMITED: LazyLock<Script> = LazyLock::new(|| {
    with_now(
        r"
paused = math.max(paused, now + tonumber(ARGV[1]) + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'paused', paused, 'learned', ARGV[3], 'next', math.max(nxt, paused))
redis.call('PEXPIRE', KEYS[1], 86400000)
return paused - now
",
    )
});

/// KEYS[1] rate hash; ARGV ms. Pauses at least that long; returns the pause left.
pub static PAUSE_FOR: LazyLock<Script> = LazyLock::new(|| {
    with_now(
        r"
paused = math.max(paused, now + tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], 'paused', paused)
redis.call('PEXPIRE', KEYS[1], 86400000)
return paused - now
",
    )
});
