//! The Lua scripts: each step the fleet must agree on runs atomically in Redis, on Redis's
//! clock (`TIME`, ms).

use std::sync::LazyLock;

use redis::Script;

/// KEYS[1] claim key; ARGV owner, lease ms. Returns `acquired`, `settled` or `held`.
pub static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'acquired'
end
if v == 'settled' then return 'settled' end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 'acquired'
end
return 'held'
",
    )
});

/// KEYS[1] claim key; ARGV seconds to keep. Marks the credential settled.
pub static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('SET', KEYS[1], 'settled', 'EX', ARGV[1])
return 1
",
    )
});

/// KEYS[1] claim key; ARGV owner. Deletes the claim if this owner holds it.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
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

/// KEYS[1] rate hash; ARGV max wait ms, configured interval ms (0: none). Returns {1, wait ms}
/// after reserving a slot, or {0, earliest wait ms} without.
pub static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    with_now(
        r"
local slot = math.max(now, nxt, paused)
if slot - now > tonumber(ARGV[1]) then return {0, slot - now} end
local interval = tonumber(ARGV[2])
if interval == 0 then interval = learned end
if interval > 0 then redis.call('HSET', KEYS[1], 'next', slot + interval) end
redis.call('PEXPIRE', KEYS[1], 86400000)
return {1, slot - now}
",
    )
});

/// KEYS[1] rate hash; ARGV configured interval ms (0: none). The next slot is at least one
/// interval after now.
pub static ANSWERED: LazyLock<Script> = LazyLock::new(|| {
    with_now(
        r"
local interval = tonumber(ARGV[1])
if interval == 0 then interval = learned end
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
