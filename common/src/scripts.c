#include "promptq/scripts.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <openssl/evp.h>

#define TERMINAL_CHECK                                                                             \
    "local function terminal(s) return s == 'succeeded' or s == 'failed' or s == 'expired' "       \
    "or s == 'cancelled' end\n"

/* Lua: job_create(k, z, hash, now, ttl, route, cb, tenant, id), the one definition of a job
 * record's creation: pq_script_job_create runs it once, the broker's job_create_many (broker/src
 * /rconn.c) once per job of a batch. Returns as pq_script_job_create; a created record's id is
 * added to the index z (when z and id), scored by its creation time; index_trim drops the entries
 * older than the records' TTL (cheap: amortised over the adds) and lets an idle tenant's index
 * expire with its records. */
#define JOB_CREATE_FN                                                                              \
    "local function job_create(k, z, hash, now, ttl, route, cb, tenant, id)\n"                     \
    "  local h = redis.call('HGET', k, 'request_hash')\n"                                          \
    "  if h then if h == hash then return 0 else return -1 end end\n"                              \
    "  redis.call('HSET', k, 'status', 'queued', 'request_hash', hash, 'created_at', now,\n"       \
    "    'updated_at', now, 'route', route, 'attempts', '0', 'deliveries', '0')\n"                 \
    "  if cb and cb ~= '' then redis.call('HSET', k, 'callback_url', cb, 'tenant', tenant) end\n"  \
    "  redis.call('PEXPIRE', k, ttl)\n"                                                            \
    "  if z and id then redis.call('ZADD', z, now, id) end\n"                                      \
    "  return 1\n"                                                                                 \
    "end\n"                                                                                        \
    "local function index_trim(z, now, ttl)\n"                                                     \
    "  redis.call('ZREMRANGEBYSCORE', z, '-inf', '(' .. (tonumber(now) - tonumber(ttl)))\n"        \
    "  redis.call('PEXPIRE', z, ttl)\n"                                                            \
    "end\n"

const char pq_lua_job_create[] = JOB_CREATE_FN;

const char pq_script_job_create[] = JOB_CREATE_FN
    "local r = job_create(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4],\n"
    "  ARGV[5], ARGV[6], ARGV[7])\n"
    "if r == 1 and KEYS[2] and ARGV[7] then index_trim(KEYS[2], ARGV[2], ARGV[3]) end\n"
    "return r\n";

const char pq_script_job_drop[] =
    "local v = redis.call('HMGET', KEYS[1], 'status', 'deliveries')\n"
    "if v[1] == 'queued' and v[2] == '0' then redis.call('DEL', KEYS[1]) return 1 end\n"
    "return 0\n";

/* One HMGET, the lease SET, one HSET; on a record created here also its PEXPIRE and the
 * index's ZADD + PEXPIRE (the trim on about one add in 16, from the caller's clock). */
const char pq_script_job_begin[] = TERMINAL_CHECK
    "local v = redis.call('HMGET', KEYS[1], 'status', 'request_hash', 'result', 'delivery',\n"
    "  'deliveries')\n"
    "local created = not v[1]\n"
    "if not created then\n"
    "  if v[2] ~= ARGV[1] then return {'conflict'} end\n"
    "  if terminal(v[1]) then return {'terminal', v[3] or ''} end\n"
    "  if v[1] == 'parked' and ARGV[10] == '1' then return {'parked'} end\n"
    "end\n"
    "if not redis.call('SET', KEYS[2], ARGV[5], 'NX', 'PX', ARGV[6]) then\n"
    "  if redis.call('GET', KEYS[2]) ~= ARGV[5] then\n"
    "    return {'leased', redis.call('PTTL', KEYS[2])}\n"
    "  end\n"
    "  redis.call('PEXPIRE', KEYS[2], ARGV[6])\n"
    "end\n"
    "local d = tonumber(v[5]) or 0\n"
    "if not (ARGV[8] and v[4] == ARGV[8]) then d = d + 1 end\n"
    "local poison = d > tonumber(ARGV[7])\n"
    "local f = {'deliveries', d, 'updated_at', ARGV[2]}\n"
    "local function add(k, x) f[#f + 1] = k; f[#f + 1] = x end\n"
    "if ARGV[8] then add('delivery', ARGV[8]) end\n"
    "if not poison then add('status', 'running') elseif created then add('status', 'queued') end\n"
    "if created then\n"
    "  add('request_hash', ARGV[1]); add('created_at', ARGV[2]); add('route', ARGV[4])\n"
    "  add('attempts', 0)\n"
    "end\n"
    "redis.call('HSET', KEYS[1], unpack(f))\n"
    "if created then\n"
    "  redis.call('PEXPIRE', KEYS[1], ARGV[3])\n"
    "  if KEYS[3] and ARGV[9] then\n"
    "    redis.call('ZADD', KEYS[3], ARGV[2], ARGV[9])\n"
    "    if tonumber(ARGV[2]) % 16 == 0 then\n"
    "      redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf',\n"
    "        '(' .. (tonumber(ARGV[2]) - tonumber(ARGV[3])))\n"
    "    end\n"
    "    redis.call('PEXPIRE', KEYS[3], ARGV[3])\n"
    "  end\n"
    "end\n"
    "if poison then return {'poison', d} end\n"
    "return {'run', d}\n";

const char pq_script_lease_renew[] =
    "local o = redis.call('GET', KEYS[1])\n"
    "if o == ARGV[1] then\n"
    "  redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end\n"
    "if not o then\n"
    "  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end\n"
    "return 0\n";

/* One HMGET, one HSET (record, callback fields), PEXPIRE, DEL of the lease. */
const char pq_script_job_finish[] = TERMINAL_CHECK
    "local v = redis.call('HMGET', KEYS[1], 'status', 'result', 'batch', 'created_at')\n"
    "if v[1] and terminal(v[1]) then return {0, v[2] or '', v[1]} end\n"
    "if v[3] and v[3] ~= '' then\n"
    "  redis.call('HINCRBY', v[3], ARGV[1] == 'succeeded' and 'completed' or 'failed', 1)\n"
    "end\n"
    "local f = {'status', ARGV[1], 'result', ARGV[2], 'response', ARGV[3], 'error', ARGV[4],\n"
    "  'provider', ARGV[5], 'model', ARGV[6], 'attempts', ARGV[7], 'updated_at', ARGV[8],\n"
    "  'route', ARGV[10], 'request_hash', ARGV[11]}\n"
    "local function add(k, x) f[#f + 1] = k; f[#f + 1] = x end\n"
    "if not v[4] then add('created_at', ARGV[8]) end\n"
    "if ARGV[12] and ARGV[12] ~= '' then\n"
    "  add('callback', 'pending'); add('callback_url', ARGV[12]); add('tenant', ARGV[13])\n"
    "  add('callback_attempts', 0)\n"
    "elseif ARGV[14] and ARGV[14] ~= '' then\n"
    "  add('callback', 'refused'); add('callback_error', ARGV[14])\n"
    "end\n"
    "redis.call('HSET', KEYS[1], unpack(f))\n"
    "if ARGV[12] and ARGV[12] ~= '' then redis.call('ZADD', KEYS[3], ARGV[8], KEYS[1]) end\n"
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

const char pq_script_job_release[] =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1])\n"
    "  if redis.call('HGET', KEYS[2], 'status') == 'running' then\n"
    "    redis.call('HSET', KEYS[2], 'status', 'queued', 'updated_at', ARGV[2]) end\n"
    "  return 1 end\n"
    "return 0\n";

/* ---- by SHA1 ---- */

static const char *const script_text[PQ_SCRIPT__CNT] = {
    [PQ_SCRIPT_JOB_CREATE] = pq_script_job_create,
    [PQ_SCRIPT_JOB_DROP] = pq_script_job_drop,
    [PQ_SCRIPT_JOB_BEGIN] = pq_script_job_begin,
    [PQ_SCRIPT_LEASE_RENEW] = pq_script_lease_renew,
    [PQ_SCRIPT_JOB_FINISH] = pq_script_job_finish,
    [PQ_SCRIPT_CALLBACK_CLAIM] = pq_script_callback_claim,
    [PQ_SCRIPT_CALLBACK_DONE] = pq_script_callback_done,
    [PQ_SCRIPT_JOB_STATUS] = pq_script_job_status,
    [PQ_SCRIPT_JOB_PARK] = pq_script_job_park,
    [PQ_SCRIPT_JOB_RELEASE] = pq_script_job_release,
};

static char script_sha[PQ_SCRIPT__CNT][41];
static pthread_once_t sha_once = PTHREAD_ONCE_INIT;

static void sha_init(void)
{
    static const char hex[] = "0123456789abcdef";

    for (int i = 0; i < PQ_SCRIPT__CNT; i++) {
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned int mdlen = 0;

        if (!EVP_Digest(script_text[i], strlen(script_text[i]), md, &mdlen, EVP_sha1(), NULL) ||
            mdlen != 20)
            continue; /* left "": every call then goes as EVAL */
        for (unsigned int j = 0; j < 20; j++) {
            script_sha[i][2 * j] = hex[md[j] >> 4];
            script_sha[i][2 * j + 1] = hex[md[j] & 15];
        }
        script_sha[i][40] = '\0';
    }
}

const char *pq_script_text(pq_script_id_t id)
{
    return (int)id >= 0 && id < PQ_SCRIPT__CNT ? script_text[id] : NULL;
}

const char *pq_script_sha1(pq_script_id_t id)
{
    if ((int)id < 0 || id >= PQ_SCRIPT__CNT)
        return NULL;
    pthread_once(&sha_once, sha_init);
    return script_sha[id];
}

int pq_script_noscript(const char *str, size_t len)
{
    return str && len >= 8 && memcmp(str, "NOSCRIPT", 8) == 0;
}

void pq_script_cmd_clear(pq_script_cmd_t *c)
{
    c->argc = 0;
    c->overflow = 0;
    c->nnum = 0;
}

int pq_script_cmd_strn(pq_script_cmd_t *c, const char *s, size_t len)
{
    if (c->overflow || c->argc >= PQ_SCRIPT_ARGV_MAX) {
        c->overflow = 1;
        return -1;
    }
    c->argv[c->argc] = s ? s : "";
    c->lens[c->argc] = s ? len : 0;
    c->argc++;
    return 0;
}

int pq_script_cmd_str(pq_script_cmd_t *c, const char *s)
{
    return pq_script_cmd_strn(c, s, s ? strlen(s) : 0);
}

int pq_script_cmd_int(pq_script_cmd_t *c, int64_t v)
{
    char *buf;
    int n;

    if (c->overflow || c->nnum >= PQ_SCRIPT_NUM_MAX) {
        c->overflow = 1;
        return -1;
    }
    buf = c->num[c->nnum++];
    n = snprintf(buf, sizeof(c->num[0]), "%" PRId64, v);
    return pq_script_cmd_strn(c, buf, (size_t)n);
}

int pq_script_cmd_init(pq_script_cmd_t *c, pq_script_id_t id, int eval, int nkeys)
{
    const char *sha = pq_script_sha1(id);

    pq_script_cmd_clear(c);
    if (!sha || nkeys < 0 || nkeys > PQ_SCRIPT_ARGV_MAX) {
        c->overflow = 1;
        return -1;
    }
    if (!sha[0])
        eval = 1;
    snprintf(c->nkeys, sizeof(c->nkeys), "%d", nkeys);
    pq_script_cmd_str(c, eval ? "EVAL" : "EVALSHA");
    pq_script_cmd_str(c, eval ? script_text[id] : sha);
    return pq_script_cmd_str(c, c->nkeys);
}

static int cmd_end(const pq_script_cmd_t *c)
{
    return c->overflow ? -1 : 0;
}

int pq_script_job_begin_cmd(pq_script_cmd_t *c, int eval, const pq_job_begin_args_t *a)
{
    int index = a->index_key && a->index_key[0] && a->id;

    pq_script_cmd_init(c, PQ_SCRIPT_JOB_BEGIN, eval, index ? 3 : 2);
    pq_script_cmd_str(c, a->job_key);
    pq_script_cmd_str(c, a->lease_key);
    if (index)
        pq_script_cmd_str(c, a->index_key);
    pq_script_cmd_str(c, a->request_hash);
    pq_script_cmd_int(c, a->now_ms);
    pq_script_cmd_int(c, a->ttl_ms);
    pq_script_cmd_str(c, a->route);
    pq_script_cmd_str(c, a->owner);
    pq_script_cmd_int(c, a->lease_ms);
    pq_script_cmd_int(c, a->max_deliveries);
    pq_script_cmd_str(c, a->delivery);
    pq_script_cmd_str(c, index ? a->id : "");
    pq_script_cmd_str(c, a->from_source ? "1" : "0");
    return cmd_end(c);
}

int pq_script_job_finish_cmd(pq_script_cmd_t *c, int eval, const pq_job_finish_args_t *a)
{
    int cb = a->callback_url && a->callback_url[0];

    pq_script_cmd_init(c, PQ_SCRIPT_JOB_FINISH, eval, 3);
    pq_script_cmd_str(c, a->job_key);
    pq_script_cmd_str(c, a->lease_key);
    pq_script_cmd_str(c, a->callbacks_key);
    pq_script_cmd_str(c, a->status);
    pq_script_cmd_strn(c, a->result, a->result_len);
    pq_script_cmd_strn(c, a->response, a->response_len);
    pq_script_cmd_strn(c, a->error, a->error_len);
    pq_script_cmd_str(c, a->provider);
    pq_script_cmd_str(c, a->model);
    pq_script_cmd_int(c, a->attempts);
    pq_script_cmd_int(c, a->now_ms);
    pq_script_cmd_int(c, a->ttl_ms);
    pq_script_cmd_str(c, a->route);
    pq_script_cmd_str(c, a->request_hash);
    pq_script_cmd_str(c, cb ? a->callback_url : "");
    pq_script_cmd_str(c, a->tenant);
    pq_script_cmd_str(c, cb ? "" : a->callback_refused);
    return cmd_end(c);
}

int pq_script_job_park_cmd(pq_script_cmd_t *c, int eval, const char *job_key, const char *lease_key,
                           int64_t now_ms, const char *owner, int64_t ttl_ms, int attempts)
{
    pq_script_cmd_init(c, PQ_SCRIPT_JOB_PARK, eval, 2);
    pq_script_cmd_str(c, job_key);
    pq_script_cmd_str(c, lease_key);
    pq_script_cmd_int(c, now_ms);
    pq_script_cmd_str(c, owner);
    pq_script_cmd_int(c, ttl_ms);
    pq_script_cmd_int(c, attempts);
    return cmd_end(c);
}

int pq_script_job_release_cmd(pq_script_cmd_t *c, int eval, const char *lease_key,
                              const char *job_key, const char *owner, int64_t now_ms)
{
    pq_script_cmd_init(c, PQ_SCRIPT_JOB_RELEASE, eval, 2);
    pq_script_cmd_str(c, lease_key);
    pq_script_cmd_str(c, job_key);
    pq_script_cmd_str(c, owner);
    pq_script_cmd_int(c, now_ms);
    return cmd_end(c);
}

int pq_script_lease_renew_cmd(pq_script_cmd_t *c, int eval, const char *lease_key,
                              const char *owner, int lease_ms)
{
    pq_script_cmd_init(c, PQ_SCRIPT_LEASE_RENEW, eval, 1);
    pq_script_cmd_str(c, lease_key);
    pq_script_cmd_str(c, owner);
    pq_script_cmd_int(c, lease_ms);
    return cmd_end(c);
}

int pq_script_callback_claim_cmd(pq_script_cmd_t *c, int eval, const char *zkey, int64_t now_ms,
                                 int64_t claim_ms, int64_t most)
{
    pq_script_cmd_init(c, PQ_SCRIPT_CALLBACK_CLAIM, eval, 1);
    pq_script_cmd_str(c, zkey);
    pq_script_cmd_int(c, now_ms);
    pq_script_cmd_int(c, claim_ms);
    pq_script_cmd_int(c, most);
    return cmd_end(c);
}

int pq_script_callback_done_cmd(pq_script_cmd_t *c, int eval, const char *zkey, const char *job_key,
                                const char *outcome, int attempts, int64_t now_ms, int64_t due_ms,
                                const char *why)
{
    pq_script_cmd_init(c, PQ_SCRIPT_CALLBACK_DONE, eval, 2);
    pq_script_cmd_str(c, zkey);
    pq_script_cmd_str(c, job_key);
    pq_script_cmd_str(c, outcome);
    pq_script_cmd_int(c, attempts);
    pq_script_cmd_int(c, now_ms);
    pq_script_cmd_int(c, due_ms);
    pq_script_cmd_str(c, why);
    return cmd_end(c);
}
