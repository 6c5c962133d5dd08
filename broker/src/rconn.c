/* The loop's hiredis async connection: reconnects with backoff, and since hiredis 0.14 has no
 * async timeouts, a watchdog drops a connection whose replies stopped coming (each request
 * also has its own timer in its slot). */
#include "broker.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <hiredis/adapters/libevent.h>
#include <hiredis/hiredis.h>
#include <openssl/evp.h>

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

const char pq_bscript_cancel[] =
    "local s = redis.call('HGET', KEYS[1], 'status')\n"
    "if not s then return '' end\n"
    "if s ~= 'queued' and s ~= 'parked' then return s end\n"
    "redis.call('HSET', KEYS[1], 'status', 'cancelled', 'result', ARGV[1], 'error', ARGV[2],\n"
    "  'updated_at', ARGV[3])\n"
    "local b = redis.call('HGET', KEYS[1], 'batch')\n"
    "if b and b ~= '' then redis.call('HINCRBY', b, 'failed', 1) end\n"
    "return 1\n";

const char pq_bscript_batch_status[] =
    "local s = redis.call('HGET', KEYS[1], 'status')\n"
    "if not s or not string.find(ARGV[1], '|' .. s .. '|', 1, true) then return 0 end\n"
    "redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[3], ARGV[4])\n"
    "for i = 5, #ARGV - 1, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end\n"
    "return 1\n";

#define NSCRIPTS 5

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
    for (int i = 0; i < NSCRIPTS; i++) {
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
        if (scripts[i].script == script)
            return scripts[i].sha;
    return NULL;
}

static void on_setup_reply(redisAsyncContext *ac, void *r, void *privdata);

/* Queues SCRIPT LOAD for the broker's scripts; commands on one connection run in order, so
 * every EVALSHA sent after this finds them. */
static void load_scripts(pq_bthread_t *t)
{
    pthread_once(&scripts_once, scripts_init);
    for (int i = 0; i < NSCRIPTS; i++) {
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
    PQ_INFO("thread %d: redis connected", t->no);
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

static void connect_now(pq_bthread_t *t)
{
    const pq_conf_t *conf = t->bc->conf;
    redisAsyncContext *ac = redisAsyncConnect(conf->redis_host, conf->redis_port);

    if (!ac) {
        schedule_retry(t);
        return;
    }
    if (ac->err) {
        PQ_WARN("thread %d: redis %s:%d: %s", t->no, conf->redis_host, conf->redis_port,
                ac->errstr);
        redisAsyncFree(ac);
        schedule_retry(t);
        return;
    }
    ac->data = t;
    if (redisLibeventAttach(ac, t->base) != REDIS_OK) {
        redisAsyncFree(ac);
        schedule_retry(t);
        return;
    }
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    t->rc = ac;
    t->redis_pending = 0;
    /* Queued before the connection is up; hiredis sends them first. */
    if (conf->redis_password) {
        t->redis_pending++;
        redisAsyncCommand(ac, on_setup_reply, "AUTH", "AUTH %s", conf->redis_password);
    }
    if (conf->redis_db) {
        t->redis_pending++;
        redisAsyncCommand(ac, on_setup_reply, "SELECT", "SELECT %d", conf->redis_db);
    }
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

static void on_reply(redisAsyncContext *ac, void *r, void *handle)
{
    const redisReply *reply = r;
    pq_bthread_t *t = ac->data;
    pq_slot_t *s;

    t->redis_pending--;
    if (!reply) {
        /* The connection is going away: send nothing more on it. */
        t->redis_connected = 0;
    } else {
        t->redis_last_reply_ms = pq_mono_ms();
        if (reply->type == REDIS_REPLY_ERROR) {
            pq_counter_add(t->b->m_redis_errors, 1);
            PQ_WARN("thread %d: redis error: %s", t->no, reply->str);
            if (!strncmp(reply->str, "NOSCRIPT", 8) && t->redis_connected)
                load_scripts(t); /* someone flushed the script cache */
        }
    }
    if (!handle || !(s = pq_slot_from_handle(t, handle)))
        return;
    if (s->state == PQ_SLOT_GET) {
        pq_jobs_redis_reply(s, reply);
    } else if (s->state == PQ_SLOT_WAIT) {
        pq_chat_redis_reply(s, reply);
    } else if (s->state == PQ_SLOT_IDEM) {
        pq_idem_reply(s, reply);
    } else if (s->state == PQ_SLOT_CANCEL_READ || s->state == PQ_SLOT_CANCEL_CAS) {
        pq_jobs_cancel_reply(s, reply);
    } else if (s->state == PQ_SLOT_REDIS_CREATE || s->state == PQ_SLOT_PRODUCING ||
               s->state == PQ_SLOT_SPOOLING) {
        if (reply && reply->type == REDIS_REPLY_INTEGER)
            pq_intake_redis_reply(s, reply->integer, 1);
        else
            pq_intake_redis_reply(s, 0, 0);
    }
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

int pq_rconn_command(pq_bthread_t *t, void *handle, const char *fmt, ...)
{
    va_list ap;
    int rc;

    if (!pq_rconn_usable(t))
        return -1;
    va_start(ap, fmt);
    rc = redisvAsyncCommand(t->rc, on_reply, handle, fmt, ap);
    va_end(ap);
    if (rc != REDIS_OK)
        return -1;
    sent(t);
    return 0;
}

int pq_rconn_commandargv(pq_bthread_t *t, void *handle, int argc, const char **argv,
                         const size_t *argvlen)
{
    if (!pq_rconn_usable(t))
        return -1;
    if (redisAsyncCommandArgv(t->rc, on_reply, handle, argc, argv, argvlen) != REDIS_OK)
        return -1;
    sent(t);
    return 0;
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
