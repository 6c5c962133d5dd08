#include "promptq/scripts.h"

#define TERMINAL_CHECK                                                                             \
    "local function terminal(s) return s == 'succeeded' or s == 'failed' or s == 'expired' "       \
    "or s == 'cancelled' end\n"

/* Lua: index_add(z, id, now, ttl) adds a newly created job to its tenant's listing index
 * (pq_key_jobs), scored by its creation time, trims the entries older than the records' TTL
 * (cheap: amortised over the adds) and lets an idle tenant's index expire with its records. */
#define INDEX_ADD                                                                                  \
    "local function index_add(z, id, now, ttl)\n"                                                  \
    "  redis.call('ZADD', z, now, id)\n"                                                           \
    "  redis.call('ZREMRANGEBYSCORE', z, '-inf', '(' .. (tonumber(now) - tonumber(ttl)))\n"        \
    "  redis.call('PEXPIRE', z, ttl)\n"                                                            \
    "end\n"

const char pq_script_job_create[] = INDEX_ADD
    "local h = redis.call('HGET', KEYS[1], 'request_hash')\n"
    "if h then if h == ARGV[1] then return 0 else return -1 end end\n"
    "redis.call('HSET', KEYS[1], 'status', 'queued', 'request_hash', ARGV[1], 'created_at',\n"
    "  ARGV[2], 'updated_at', ARGV[2], 'route', ARGV[4], 'attempts', 0, 'deliveries', 0)\n"
    "if ARGV[5] and ARGV[5] ~= '' then\n"
    "  redis.call('HSET', KEYS[1], 'callback_url', ARGV[5], 'tenant', ARGV[6])\n"
    "end\n"
    "redis.call('PEXPIRE', KEYS[1], ARGV[3])\n"
    "if KEYS[2] and ARGV[7] then index_add(KEYS[2], ARGV[7], ARGV[2], ARGV[3]) end\n"
    "return 1\n";

const char pq_script_job_drop[] =
    "local v = redis.call('HMGET', KEYS[1], 'status', 'deliveries')\n"
    "if v[1] == 'queued' and v[2] == '0' then redis.call('DEL', KEYS[1]) return 1 end\n"
    "return 0\n";

const char pq_script_job_begin[] = TERMINAL_CHECK INDEX_ADD
    "local v = redis.call('HMGET', KEYS[1], 'status', 'request_hash', 'result')\n"
    "if not v[1] then\n"
    "  redis.call('HSET', KEYS[1], 'status', 'queued', 'request_hash', ARGV[1], 'created_at',\n"
    "    ARGV[2], 'updated_at', ARGV[2], 'route', ARGV[4], 'attempts', 0, 'deliveries', 0)\n"
    "  if KEYS[3] and ARGV[9] then index_add(KEYS[3], ARGV[9], ARGV[2], ARGV[3]) end\n"
    "elseif v[2] ~= ARGV[1] then return {'conflict'}\n"
    "elseif terminal(v[1]) then return {'terminal', v[3] or ''} end\n"
    "local ok = redis.call('SET', KEYS[2], ARGV[5], 'NX', 'PX', ARGV[6])\n"
    "if not ok then\n"
    "  if redis.call('GET', KEYS[2]) ~= ARGV[5] then\n"
    "    return {'leased', redis.call('PTTL', KEYS[2])}\n"
    "  end\n"
    "  redis.call('PEXPIRE', KEYS[2], ARGV[6])\n"
    "end\n"
    "local d\n"
    "if ARGV[8] and redis.call('HGET', KEYS[1], 'delivery') == ARGV[8] then\n"
    "  d = tonumber(redis.call('HGET', KEYS[1], 'deliveries')) or 0\n"
    "else\n"
    "  d = redis.call('HINCRBY', KEYS[1], 'deliveries', 1)\n"
    "  if ARGV[8] then redis.call('HSET', KEYS[1], 'delivery', ARGV[8]) end\n"
    "end\n"
    "redis.call('PEXPIRE', KEYS[1], ARGV[3])\n"
    "if d > tonumber(ARGV[7]) then return {'poison', d} end\n"
    "redis.call('HSET', KEYS[1], 'status', 'running', 'updated_at', ARGV[2])\n"
    "return {'run', d}\n";

const char pq_script_lease_renew[] = "if redis.call('GET', KEYS[1]) == ARGV[1] then\n"
                                     "  redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end\n"
                                     "return 0\n";

const char pq_script_job_finish[] = TERMINAL_CHECK PQ_LUA_CALLBACK_ENQUEUE
    "local v = redis.call('HMGET', KEYS[1], 'status', 'result', 'batch')\n"
    "if v[1] and terminal(v[1]) then return {0, v[2] or '', v[1]} end\n"
    "if v[3] and v[3] ~= '' then\n"
    "  redis.call('HINCRBY', v[3], ARGV[1] == 'succeeded' and 'completed' or 'failed', 1)\n"
    "end\n"
    "redis.call('HSET', KEYS[1], 'status', ARGV[1], 'result', ARGV[2], 'response', ARGV[3],\n"
    "  'error', ARGV[4], 'provider', ARGV[5], 'model', ARGV[6], 'attempts', ARGV[7],\n"
    "  'updated_at', ARGV[8], 'route', ARGV[10], 'request_hash', ARGV[11])\n"
    "redis.call('HSETNX', KEYS[1], 'created_at', ARGV[8])\n"
    "if ARGV[12] and ARGV[12] ~= '' then\n"
    "  callback_enqueue(KEYS[3], ARGV[12], ARGV[13], ARGV[8])\n"
    "elseif ARGV[14] and ARGV[14] ~= '' then\n"
    "  redis.call('HSET', KEYS[1], 'callback', 'refused', 'callback_error', ARGV[14])\n"
    "end\n"
    "redis.call('PEXPIRE', KEYS[1], ARGV[9])\n"
    "redis.call('DEL', KEYS[2])\n"
    "return {1}\n";

const char pq_script_callback_claim[] =
    "local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])\n"
    "local out = {}\n"
    "for _, k in ipairs(due) do\n"
    "  local v = redis.call('HMGET', k, 'callback', 'callback_url', 'tenant', 'result',\n"
    "    'callback_attempts')\n"
    "  if v[1] ~= 'pending' or not v[2] or not v[4] then\n"
    "    redis.call('ZREM', KEYS[1], k)\n"
    "  else\n"
    "    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), k)\n"
    "    out[#out + 1] = {k, v[2], v[3] or '', v[4], v[5] or '0'}\n"
    "  end\n"
    "end\n"
    "return out\n";

const char pq_script_callback_done[] =
    "if redis.call('HGET', KEYS[2], 'callback') ~= 'pending' then\n"
    "  redis.call('ZREM', KEYS[1], KEYS[2]) return 0 end\n"
    "redis.call('HSET', KEYS[2], 'callback_attempts', ARGV[2], 'callback_error', ARGV[5],\n"
    "  'callback_at', ARGV[3])\n"
    "if ARGV[1] == 'retry' then redis.call('ZADD', KEYS[1], ARGV[4], KEYS[2]) return 1 end\n"
    "redis.call('HSET', KEYS[2], 'callback', ARGV[1])\n"
    "redis.call('ZREM', KEYS[1], KEYS[2])\n"
    "return 1\n";

const char pq_script_job_status[] =
    TERMINAL_CHECK "local s = redis.call('HGET', KEYS[1], 'status')\n"
                   "if not s or terminal(s) then return 0 end\n"
                   "redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[2])\n"
                   "return 1\n";

const char pq_script_job_park[] =
    TERMINAL_CHECK "if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end\n"
                   "local s = redis.call('HGET', KEYS[1], 'status')\n"
                   "if not s or terminal(s) then return 0 end\n"
                   "redis.call('HSET', KEYS[1], 'status', 'parked', 'attempts', ARGV[4],\n"
                   "  'deliveries', 0, 'updated_at', ARGV[1])\n"
                   "redis.call('PEXPIRE', KEYS[1], ARGV[3])\n"
                   "return 1\n";
