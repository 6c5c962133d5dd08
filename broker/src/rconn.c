/* The loop's hiredis async connection: reconnects with backoff, and since hiredis 0.14 has no
 * async timeouts, a watchdog drops a connection whose replies stopped coming (each request
 * also has its own timer in its slot). */
#include "broker.h"
#include "rconn.h"
#include "rsub.h"

#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/util.h>

#include <hiredis/adapters/libevent.h>
#include <hiredis/hiredis.h>
#include <openssl/evp.h>

#include "promptq/rasync.h"
#include "promptq/log.h"
#include "promptq/scripts.h"
#include "promptq/util.h"

#define RCONN_RETRY_MIN_MS 100
#define RCONN_RETRY_MAX_MS 2000
#define RCONN_WATCH_MS     250
#define RCONN_STALL_MS     2000

const char pq_bscript_idem_claim[] = "local v = redis.call('GET', KEYS[1])\n"
                                     "if v then return v end\n"
                                     "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])\n"
                                     "return false\n";

const char pq_bscript_cancel[] = PQ_LUA_CALLBACK_ENQUEUE
    "local s = redis.call('HGET', KEYS[1], 'status')\n"
    "if not s then return '' end\n"
    "if s ~= 'queued' and s ~= 'parked' then return s end\n"
    "redis.call('HSET', KEYS[1], 'status', 'cancelled', 'result', ARGV[1], 'error', ARGV[2],\n"
    "  'updated_at', ARGV[3])\n"
    "local v = redis.call('HMGET', KEYS[1], 'batch', 'callback_url', 'tenant')\n"
    "if v[1] and v[1] ~= '' then redis.call('HINCRBY', v[1], 'failed', 1) end\n"
    "if v[2] and v[2] ~= '' then callback_enqueue(KEYS[2], v[2], v[3] or '', ARGV[3]) end\n"
    "return 1\n";

const char pq_bscript_batch_status[] =
    "local s = redis.call('HGET', KEYS[1], 'status')\n"
    "if not s or not string.find(ARGV[1], '|' .. s .. '|', 1, true) then return 0 end\n"
    "redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[3], ARGV[4])\n"
    "for i = 5, #ARGV - 1, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end\n"
    "return 1\n";

const char pq_bscript_jobs_list[] =
    "local z, pfx, want = KEYS[1], ARGV[1], ARGV[4]\n"
    "local limit, cap = tonumber(ARGV[3]), tonumber(ARGV[5])\n"
    "local start = 0\n"
    "if ARGV[2] ~= '' then\n"
    "  local r = redis.call('ZREVRANK', z, ARGV[2])\n"
    "  if not r then return {0} end\n"
    "  start = r + 1\n"
    "end\n"
    "local out = {1, 0, ''}\n"
    "local n, scanned, gone, cursor = 0, 0, {}, ''\n"
    "while n <= limit and scanned < cap do\n"
    "  local chunk = math.min(cap - scanned, math.max(limit + 1 - n, 32))\n"
    "  local ids = redis.call('ZREVRANGE', z, start, start + chunk - 1)\n"
    "  for _, id in ipairs(ids) do\n"
    "    scanned = scanned + 1\n"
    "    cursor = id\n"
    "    local v = redis.call('HMGET', pfx .. id, 'status', 'route', 'created_at',\n"
    "      'updated_at', 'attempts', 'provider', 'model')\n"
    "    if not v[1] then gone[#gone + 1] = id\n"
    "    elseif want == '' or v[1] == want then\n"
    "      n = n + 1\n"
    "      if n > limit then out[2] = 1 break end\n"
    "      out[#out + 1] = id\n"
    "      for i = 1, 7 do out[#out + 1] = v[i] or '' end\n"
    "    end\n"
    "  end\n"
    "  if #ids < chunk then break end\n"
    "  start = start + chunk\n"
    "end\n"
    "if n <= limit and scanned >= cap and\n"
    "   #redis.call('ZREVRANGE', z, start, start) > 0 then\n"
    "  out[2] = 1\n"
    "  out[3] = cursor\n"
    "end\n"
    "for _, id in ipairs(gone) do\n"
    "  if id ~= out[3] then redis.call('ZREM', z, id) end\n"
    "end\n"
    "return out\n";

/* job_create_many: pq_lua_job_create's job_create once per job, for the creates one loop
 * iteration queued (intake.c): KEYS = (job key, index key) per job, ARGV = job_create's 7
 * arguments per job (pq_job_create_argv's ARGV). Each job runs under pcall, so one that fails
 * (a key of another type) fails alone; each index a job was added to is trimmed once, after the
 * batch, with the now and ttl of the last job added to it (pq_script_job_create trims after each
 * add: the same entries remain). Returns one element per job: job_create's integer or that
 * job's error. */
#define CREATE_MANY_TAIL                                                                           \
    "local out, zs, zlast = {}, {}, {}\n"                                                          \
    "for i = 1, #KEYS / 2 do\n"                                                                    \
    "  local z, o = KEYS[2 * i], 7 * (i - 1)\n"                                                    \
    "  local ok, r = pcall(job_create, KEYS[2 * i - 1], z, unpack(ARGV, o + 1, o + 7))\n"          \
    "  if ok then\n"                                                                               \
    "    out[i] = r\n"                                                                             \
    "    if r == 1 and z and ARGV[o + 7] then\n"                                                   \
    "      if not zlast[z] then zs[#zs + 1] = z end\n"                                             \
    "      zlast[z] = o\n"                                                                         \
    "    end\n"                                                                                    \
    "  elseif type(r) == 'table' and r.err then out[i] = r\n"                                      \
    "  else out[i] = {err = tostring(r)} end\n"                                                    \
    "end\n"                                                                                        \
    "for _, z in ipairs(zs) do index_trim(z, ARGV[zlast[z] + 2], ARGV[zlast[z] + 3]) end\n"        \
    "return out\n"
static char create_many[4096 + sizeof(CREATE_MANY_TAIL)];

#define NSCRIPTS 7

/* EVALSHA instead of EVAL: Redis then neither receives nor hashes the script per job. */
static struct {
    const char *script;
    char sha[41];
} scripts[NSCRIPTS];
static pthread_once_t scripts_once = PTHREAD_ONCE_INIT;

static void scripts_init(void)
{
    static const char hex[] = "0123456789abcdef";

    scripts[0].script = pq_script_job_create;
    scripts[1].script = pq_script_job_drop;
    scripts[2].script = pq_bscript_idem_claim;
    scripts[3].script = pq_bscript_cancel;
    scripts[4].script = pq_bscript_batch_status;
    scripts[5].script = pq_bscript_jobs_list;
    if (snprintf(create_many, sizeof(create_many), "%s%s", pq_lua_job_create, CREATE_MANY_TAIL) <
        (int)sizeof(create_many))
        scripts[6].script = create_many;
    for (int i = 0; i < NSCRIPTS && scripts[i].script; i++) {
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned int mdlen = 0;

        EVP_Digest(scripts[i].script, strlen(scripts[i].script), md, &mdlen, EVP_sha1(), NULL);
        for (unsigned int j = 0; j < mdlen && j < 20; j++) {
            scripts[i].sha[2 * j] = hex[md[j] >> 4];
            scripts[i].sha[2 * j + 1] = hex[md[j] & 15];
        }
        scripts[i].sha[40] = '\0';
    }
}

const char *pq_rconn_sha(const char *script)
{
    pthread_once(&scripts_once, scripts_init);
    for (int i = 0; i < NSCRIPTS; i++)
        if (script && scripts[i].script == script)
            return scripts[i].sha;
    return NULL;
}

const char *pq_rconn_create_many(void)
{
    pthread_once(&scripts_once, scripts_init);
    return scripts[6].script;
}

static void on_setup_reply(redisAsyncContext *ac, void *r, void *privdata);

/* Queues SCRIPT LOAD for the broker's scripts; commands on one connection run in order, so
 * every EVALSHA sent after this finds them. */
static void load_scripts(pq_bthread_t *t)
{
    pthread_once(&scripts_once, scripts_init);
    for (int i = 0; i < NSCRIPTS && scripts[i].script; i++) {
        if (redisAsyncCommand(t->rc, on_setup_reply, "SCRIPT LOAD", "SCRIPT LOAD %s",
                              scripts[i].script) == REDIS_OK)
            t->redis_pending++;
    }
}

static void schedule_retry(pq_bthread_t *t)
{
    struct timeval tv;

    if (t->stopping || !t->redis_retry_ev)
        return;
    tv.tv_sec = t->redis_retry_ms / 1000;
    tv.tv_usec = (t->redis_retry_ms % 1000) * 1000;
    event_add(t->redis_retry_ev, &tv);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    pq_bthread_t *t = ac->data;

    if (status != REDIS_OK) {
        if (t->redis_connected || t->redis_retry_ms == RCONN_RETRY_MIN_MS)
            PQ_WARN("thread %d: redis %s:%d: connect failed: %s", t->no, t->bc->conf->redis_host,
                    t->bc->conf->redis_port, ac->errstr);
        t->rc = NULL; /* hiredis frees it */
        t->redis_connected = 0;
        t->redis_pending = 0;
        if (t->redis_retry_ms < RCONN_RETRY_MAX_MS)
            t->redis_retry_ms *= 2;
        schedule_retry(t);
        return;
    }
    t->redis_connected = 1;
    t->redis_last_reply_ms = pq_mono_ms();
    t->redis_retry_ms = RCONN_RETRY_MIN_MS;
    PQ_INFO("thread %d: redis connected (%s:%d)", t->no, ac->c.tcp.host ? ac->c.tcp.host : "?",
            ac->c.tcp.port);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    pq_bthread_t *t = ac->data;

    if (status != REDIS_OK || !t->stopping)
        PQ_WARN("thread %d: redis disconnected%s%s", t->no, ac->errstr[0] ? ": " : "", ac->errstr);
    t->rc = NULL;
    t->redis_connected = 0;
    t->redis_pending = 0;
    schedule_retry(t);
}

static void on_setup_reply(redisAsyncContext *ac, void *r, void *privdata)
{
    const redisReply *reply = r;
    pq_bthread_t *t = ac->data;

    t->redis_pending--;
    if (reply && reply->type == REDIS_REPLY_ERROR)
        PQ_ERR("thread %d: redis %s failed: %s", t->no, (const char *)privdata, reply->str);
}

/* ---- resolution on the loop ---- */

typedef struct {
    pq_bthread_t *t;
    struct evdns_getaddrinfo_request **pending;
    void (*fn)(pq_bthread_t *t, const char *addr);
} resolve_t;

static int host_numeric(const char *host)
{
    unsigned char buf[sizeof(struct in6_addr)];

    return evutil_inet_pton(AF_INET, host, buf) == 1 || evutil_inet_pton(AF_INET6, host, buf) == 1;
}

static void on_resolved(int err, struct evutil_addrinfo *res, void *arg)
{
    resolve_t *r = arg;
    pq_bthread_t *t = r->t;
    const struct evutil_addrinfo *ai, *pick = NULL;
    char addr[INET6_ADDRSTRLEN] = "";

    if (err == EVUTIL_EAI_CANCEL) {
        /* whoever cancelled cleared *pending (maybe started another lookup since) */
        free(r);
        if (res)
            evutil_freeaddrinfo(res);
        return;
    }
    *r->pending = NULL;
    for (ai = err ? NULL : res; ai; ai = ai->ai_next) {
        if (ai->ai_family == AF_INET) {
            pick = ai;
            break;
        }
        if (ai->ai_family == AF_INET6 && !pick)
            pick = ai;
    }
    if (pick && pick->ai_family == AF_INET)
        evutil_inet_ntop(AF_INET, &((const struct sockaddr_in *)pick->ai_addr)->sin_addr, addr,
                         sizeof(addr));
    else if (pick)
        evutil_inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)pick->ai_addr)->sin6_addr, addr,
                         sizeof(addr));
    if (!addr[0])
        PQ_WARN("thread %d: redis host %s: %s", t->no, t->bc->conf->redis_host,
                err ? evutil_gai_strerror(err) : "no address");
    if (res)
        evutil_freeaddrinfo(res);
    r->fn(t, addr[0] ? addr : NULL);
    free(r);
}

int pq_rconn_resolve(pq_bthread_t *t, struct evdns_getaddrinfo_request **pending,
                     void (*fn)(pq_bthread_t *t, const char *addr))
{
    const char *host = t->bc->conf->redis_host;
    struct evutil_addrinfo hints;
    struct evdns_getaddrinfo_request *req;
    resolve_t *r;

    if (*pending)
        return 0; /* a lookup is already running: its answer connects */
    if (host_numeric(host)) {
        fn(t, host);
        return 0;
    }
    if (!t->dns) {
        t->dns = evdns_base_new(t->base, EVDNS_BASE_INITIALIZE_NAMESERVERS |
                                             EVDNS_BASE_DISABLE_WHEN_INACTIVE);
        if (!t->dns) {
            /* no usable resolv.conf: /etc/hosts only */
            t->dns = evdns_base_new(t->base, EVDNS_BASE_DISABLE_WHEN_INACTIVE);
            if (t->dns)
                evdns_base_load_hosts(t->dns, NULL);
        }
        if (!t->dns)
            return -1;
    }
    if (!(r = calloc(1, sizeof(*r))))
        return -1;
    r->t = t;
    r->pending = pending;
    r->fn = fn;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    hints.ai_flags = EVUTIL_AI_ADDRCONFIG;
    /* the callback may run before this returns (hosts file): it then returned NULL */
    req = evdns_getaddrinfo(t->dns, host, NULL, &hints, on_resolved, r);
    if (req)
        *pending = req;
    return 0;
}

void pq_rconn_dns_free(pq_bthread_t *t)
{
    if (t->dns_rc)
        evdns_getaddrinfo_cancel(t->dns_rc);
    if (t->dns_sub)
        evdns_getaddrinfo_cancel(t->dns_sub);
    t->dns_rc = t->dns_sub = NULL;
    if (t->dns) {
        evdns_base_free(t->dns, 0);
        t->dns = NULL;
    }
}

static void connect_addr(pq_bthread_t *t, const char *addr);

static void connect_now(pq_bthread_t *t)
{
    if (pq_rconn_resolve(t, &t->dns_rc, connect_addr))
        schedule_retry(t);
}

static void connect_addr(pq_bthread_t *t, const char *addr)
{
    const pq_conf_t *conf = t->bc->conf;
    redisAsyncContext *ac;

    if (!addr || t->stopping || t->rc) {
        if (!addr) {
            if (t->redis_retry_ms < RCONN_RETRY_MAX_MS)
                t->redis_retry_ms *= 2;
            schedule_retry(t);
        }
        return;
    }
    pq_rasync_opts_t o = {.base = t->base,
                          .addr = addr,
                          .port = conf->redis_port,
                          .password = conf->redis_password,
                          .db = conf->redis_db,
                          .data = t,
                          .on_connect = on_connect,
                          .on_disconnect = on_disconnect,
                          .on_setup = on_setup_reply,
                          .priority = -1};
    char err[128];
    int nsetup = 0;

    ac = pq_rasync_open(&o, &nsetup, err, sizeof(err));
    if (!ac) {
        PQ_WARN("thread %d: redis %s:%d: %s", t->no, conf->redis_host, conf->redis_port, err);
        schedule_retry(t);
        return;
    }
    t->rc = ac;
    t->redis_pending = nsetup; /* AUTH and SELECT, queued first */
    load_scripts(t);
}

static void retry_cb(evutil_socket_t fd, short what, void *arg)
{
    pq_bthread_t *t = arg;

    if (!t->rc && !t->stopping)
        connect_now(t);
}

static void watch_cb(evutil_socket_t fd, short what, void *arg)
{
    pq_bthread_t *t = arg;
    int64_t now = pq_mono_ms(), since;

    if (!t->rc || !t->redis_connected || t->redis_pending <= 0)
        return;
    since = t->redis_last_reply_ms > t->redis_oldest_sent_ms ? t->redis_last_reply_ms
                                                             : t->redis_oldest_sent_ms;
    if (now - since < RCONN_STALL_MS)
        return;
    PQ_WARN("thread %d: redis stalled (%d commands without a reply for %lld ms): reconnecting",
            t->no, t->redis_pending, (long long)(now - since));
    redisAsyncFree(t->rc); /* pending callbacks get NULL, then on_disconnect runs */
    t->rc = NULL;
    t->redis_connected = 0;
    t->redis_pending = 0;
    schedule_retry(t);
    /* The subscriber shares the server: a stalled Redis may hold it silently too. Its
     * resubscription makes every waiter read its record again. */
    pq_rsub_reset(t);
}

int pq_rconn_usable(const pq_bthread_t *t)
{
    int64_t since;

    if (!t->rc || !t->redis_connected || t->redis_pending >= PQ_BROKER_REDIS_PENDING_MAX)
        return 0;
    if (t->redis_pending == 0)
        return 1;
    /* A command has waited longer than a request may: Redis is stalled, do not queue more
     * behind it (the watchdog reconnects). */
    since = t->redis_last_reply_ms > t->redis_oldest_sent_ms ? t->redis_last_reply_ms
                                                             : t->redis_oldest_sent_ms;
    return pq_mono_ms() - since < PQ_BROKER_REDIS_TIMEOUT_MS;
}

static void sent(pq_bthread_t *t)
{
    if (t->redis_pending++ == 0)
        t->redis_oldest_sent_ms = pq_mono_ms();
}

pq_bthread_t *pq_rconn_replied(redisAsyncContext *ac, const void *r)
{
    const redisReply *reply = r;
    pq_bthread_t *t = ac->data;

    t->redis_pending--;
    if (!reply) {
        t->redis_connected = 0;
        return t;
    }
    t->redis_last_reply_ms = pq_mono_ms();
    if (reply->type == REDIS_REPLY_ERROR) {
        pq_counter_add(t->b->m_redis_errors, 1);
        PQ_WARN("thread %d: redis error: %s", t->no, reply->str);
        if (!strncmp(reply->str, "NOSCRIPT", 8) && t->redis_connected)
            load_scripts(t);
    }
    return t;
}

static void noop_cb(redisAsyncContext *ac, void *r, void *priv)
{
    pq_rconn_replied(ac, r);
}

int pq_rconn_send(pq_bthread_t *t, void (*cb)(redisAsyncContext *, void *, void *), void *priv,
                  int argc, const char **argv, const size_t *argvlen)
{
    if (!cb)
        cb = noop_cb;
    if (!pq_rconn_usable(t))
        return -1;
    if (redisAsyncCommandArgv(t->rc, cb, priv, argc, argv, argvlen) != REDIS_OK)
        return -1;
    sent(t);
    return 0;
}

int pq_rconn_sendf(pq_bthread_t *t, void (*cb)(redisAsyncContext *, void *, void *), void *priv,
                   const char *fmt, ...)
{
    va_list ap;
    int rc;

    if (!cb)
        cb = noop_cb;
    if (!pq_rconn_usable(t))
        return -1;
    va_start(ap, fmt);
    rc = redisvAsyncCommand(t->rc, cb, priv, fmt, ap);
    va_end(ap);
    if (rc != REDIS_OK)
        return -1;
    sent(t);
    return 0;
}

int pq_rconn_start(pq_bthread_t *t)
{
    struct timeval watch = {0, RCONN_WATCH_MS * 1000};

    t->redis_retry_ms = RCONN_RETRY_MIN_MS;
    t->redis_retry_ev = evtimer_new(t->base, retry_cb, t);
    t->redis_watch_ev = event_new(t->base, -1, EV_PERSIST, watch_cb, t);
    if (!t->redis_retry_ev || !t->redis_watch_ev)
        return -1;
    event_add(t->redis_watch_ev, &watch);
    connect_now(t);
    return 0;
}

void pq_rconn_stop(pq_bthread_t *t)
{
    t->stopping = 1;
    if (t->dns_rc) {
        evdns_getaddrinfo_cancel(t->dns_rc);
        t->dns_rc = NULL;
    }
    if (t->rc) {
        redisAsyncContext *ac = t->rc;

        t->rc = NULL;
        redisAsyncFree(ac);
    }
    if (t->redis_retry_ev) {
        event_free(t->redis_retry_ev);
        t->redis_retry_ev = NULL;
    }
    if (t->redis_watch_ev) {
        event_free(t->redis_watch_ev);
        t->redis_watch_ev = NULL;
    }
}
