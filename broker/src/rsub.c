/* The loop's subscriber: a dedicated hiredis async connection in SUBSCRIBE mode on the
 * process's reply channel (promptq:reply:<instance_id>). Workers PUBLISH "<tenant>:<id>" there
 * after a job whose envelope named this channel in reply_to reached its terminal state.
 *
 * Every loop subscribes to the same channel and looks the message up in its own waiter table
 * (the waiters live on the loop that owns their HTTP request); a message for another loop's
 * waiter costs one hash lookup. Reconnects back off like the command connection; every
 * confirmed (re)subscription makes the waiters read their records again, since messages
 * published while the subscription was down are lost (pub/sub does not queue). */
#include "broker.h"
#include "rconn.h"
#include "rsub.h"

#include <string.h>

#include <hiredis/adapters/libevent.h>
#include <hiredis/hiredis.h>

#include "promptq/rasync.h"
#include "promptq/log.h"

#define RSUB_RETRY_MIN_MS 100
#define RSUB_RETRY_MAX_MS 2000

static void rsub_connect(pq_bthread_t *t);

static void rsub_schedule(pq_bthread_t *t)
{
    struct timeval tv;

    if (t->stopping || !t->sub_retry_ev)
        return;
    tv.tv_sec = t->sub_retry_ms / 1000;
    tv.tv_usec = (t->sub_retry_ms % 1000) * 1000;
    event_add(t->sub_retry_ev, &tv);
    if (t->sub_retry_ms < RSUB_RETRY_MAX_MS)
        t->sub_retry_ms *= 2;
}

static void on_sub_connect(const redisAsyncContext *ac, int status)
{
    pq_bthread_t *t = ac->data;

    if (status != REDIS_OK) {
        if (t->sub_retry_ms == RSUB_RETRY_MIN_MS)
            PQ_WARN("thread %d: redis subscriber: connect failed: %s", t->no, ac->errstr);
        t->sub = NULL; /* hiredis frees it */
        t->sub_ready = 0;
        rsub_schedule(t);
    }
}

static void on_sub_disconnect(const redisAsyncContext *ac, int status)
{
    pq_bthread_t *t = ac->data;

    if (!t->stopping)
        PQ_WARN("thread %d: redis subscriber disconnected%s%s", t->no, ac->errstr[0] ? ": " : "",
                ac->errstr);
    t->sub = NULL;
    t->sub_ready = 0;
    rsub_schedule(t);
}

static void on_auth(redisAsyncContext *ac, void *r, void *privdata)
{
    const redisReply *reply = r;
    pq_bthread_t *t = ac->data;

    if (reply && reply->type == REDIS_REPLY_ERROR)
        PQ_ERR("thread %d: redis subscriber AUTH failed: %s", t->no, reply->str);
}

/* Every reply on the subscription: the confirmation, then one per message. NULL when the
 * connection goes away. */
static void on_sub_message(redisAsyncContext *ac, void *r, void *privdata)
{
    const redisReply *reply = r;
    pq_bthread_t *t = ac->data;
    const redisReply *kind;

    if (!reply || reply->type != REDIS_REPLY_ARRAY || reply->elements < 3)
        return;
    kind = reply->element[0];
    if (kind->type != REDIS_REPLY_STRING)
        return;
    if (!strcmp(kind->str, "message")) {
        const redisReply *payload = reply->element[2];

        if (payload->type == REDIS_REPLY_STRING)
            t->sub_message(t, payload->str, payload->len);
    } else if (!strcmp(kind->str, "subscribe")) {
        t->sub_ready = 1;
        t->sub_retry_ms = RSUB_RETRY_MIN_MS;
        pq_counter_add(t->b->m_sub_subscribed, 1);
        PQ_DBG("thread %d: subscribed to %s", t->no, t->b->reply_channel);
        t->sub_confirmed(t);
    }
}

static void rsub_connect_addr(pq_bthread_t *t, const char *addr);

static void rsub_connect(pq_bthread_t *t)
{
    if (pq_rconn_resolve(t, &t->dns_sub, rsub_connect_addr))
        rsub_schedule(t);
}

static void rsub_connect_addr(pq_bthread_t *t, const char *addr)
{
    const pq_conf_t *conf = t->bc->conf;
    redisAsyncContext *ac;

    if (!addr || t->stopping || t->sub) {
        if (!addr)
            rsub_schedule(t);
        return;
    }
    /* no SELECT: channels are the same in every database */
    pq_rasync_opts_t o = {.base = t->base,
                          .addr = addr,
                          .port = conf->redis_port,
                          .password = conf->redis_password,
                          .data = t,
                          .on_connect = on_sub_connect,
                          .on_disconnect = on_sub_disconnect,
                          .on_setup = on_auth,
                          .priority = -1};
    char err[128];

    if (!(ac = pq_rasync_open(&o, NULL, err, sizeof(err)))) {
        rsub_schedule(t);
        return;
    }
    t->sub = ac;
    t->sub_ready = 0;
    redisAsyncCommand(ac, on_sub_message, NULL, "SUBSCRIBE %b", t->b->reply_channel,
                      strlen(t->b->reply_channel));
}

static void retry_cb(evutil_socket_t fd, short what, void *arg)
{
    pq_bthread_t *t = arg;

    if (!t->sub && !t->stopping)
        rsub_connect(t);
}

int pq_rsub_start(pq_bthread_t *t, void (*message)(pq_bthread_t *, const char *, size_t),
                  void (*confirmed)(pq_bthread_t *))
{
    t->sub_message = message;
    t->sub_confirmed = confirmed;
    t->sub_retry_ms = RSUB_RETRY_MIN_MS;
    t->sub_retry_ev = evtimer_new(t->base, retry_cb, t);
    if (!t->sub_retry_ev)
        return -1;
    rsub_connect(t);
    return 0;
}

void pq_rsub_reset(pq_bthread_t *t)
{
    redisAsyncContext *ac = t->sub;

    if (!ac)
        return;
    t->sub = NULL;
    t->sub_ready = 0;
    redisAsyncFree(ac);
    rsub_schedule(t);
}

void pq_rsub_stop(pq_bthread_t *t)
{
    t->stopping = 1;
    if (t->dns_sub) {
        evdns_getaddrinfo_cancel(t->dns_sub);
        t->dns_sub = NULL;
    }
    if (t->sub) {
        redisAsyncContext *ac = t->sub;

        t->sub = NULL;
        redisAsyncFree(ac);
    }
    t->sub_ready = 0;
    if (t->sub_retry_ev) {
        event_free(t->sub_retry_ev);
        t->sub_retry_ev = NULL;
    }
}
