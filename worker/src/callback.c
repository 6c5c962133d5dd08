/* Callback dispatch. See callback.h. */
#include "callback.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include "http.h"
#include "promptq/callback.h"
#include "promptq/keys.h"
#include "promptq/log.h"
#include "promptq/scripts.h"
#include "promptq/util.h"

#define CLAIM_MAX       64   /* entries taken per claim */
#define CLAIM_MARGIN_MS 2000 /* claim = POST timeout + this (the outcome write) */
#define HOST_CONNS      16   /* connections per receiver host */
#define ANSWER_MAX      4096 /* receivers' answers are read and dropped */
#define REDIS_RETRY_MS  1000

typedef struct cb_item_s {
    pq_callbacks_t *cb;
    char *key; /* the job's record */
    int attempts;
    const char *outcome; /* the outcome being recorded (a literal), its due time and why */
    int64_t due_ms;
    char why[320];
    pq_http_req_t *req;
    TAILQ_ENTRY(cb_item_s) link;
} cb_item_t;

TAILQ_HEAD(cb_item_list, cb_item_s);

struct pq_callbacks_s {
    const pq_conf_t *conf;
    pq_redis_t *redis; /* its own connection: callback traffic and job steps never queue
                          behind each other */
    pq_http_t *http;
    struct event *poll;
    char zkey[256];
    struct cb_item_list items; /* POSTs in flight and outcome writes */
    size_t nposts;             /* POSTs in flight (callbacks.max_inflight caps these) */
    int starved;               /* the last claim stopped at the cap: a POST ending claims again */
    size_t asked;              /* entries the claim in flight may take */
    int claiming;              /* a claim is in flight */
    int again;                 /* kicked while claiming: claim again when it returns */
    int stopping;
    int claim_eval; /* the next claim goes as EVAL with the text (after a NOSCRIPT) */
    pq_counter_t *m_delivered, *m_retried, *m_failed, *m_refused;
    pq_hist_t *m_latency;
};

static void poll_in(pq_callbacks_t *cb, int64_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000)};

    if (!cb->stopping)
        event_add(cb->poll, &tv);
}

static void item_free(cb_item_t *it)
{
    pq_callbacks_t *cb = it->cb;

    TAILQ_REMOVE(&cb->items, it, link);
    free(it->key);
    free(it);
}

/* ---- outcome ---- */

static void item_done_send(cb_item_t *it, int eval);

static void on_done_reply(void *opaque, redisReply *r)
{
    cb_item_t *it = opaque;

    if (r && r->type == REDIS_REPLY_ERROR && pq_script_noscript(r->str, r->len)) {
        /* the script cache was flushed: the script did not run; once more with its text */
        item_done_send(it, 1);
        return;
    }
    if (!r || r->type == REDIS_REPLY_ERROR)
        PQ_WARN("callback of %s: outcome not recorded (%s); it is sent again when its claim "
                "expires",
                it->key, r ? r->str : "redis connection lost");
    item_free(it);
}

static void item_done_send(cb_item_t *it, int eval)
{
    pq_callbacks_t *cb = it->cb;
    pq_script_cmd_t cmd;

    if (pq_script_callback_done_cmd(&cmd, eval, cb->zkey, it->key, it->outcome, it->attempts,
                                    pq_now_ms(), it->due_ms, it->why) != 0 ||
        pq_redis_command(cb->redis, cmd.argc, cmd.argv, cmd.lens, on_done_reply, it) != 0) {
        PQ_WARN("callback of %s: outcome not recorded (redis down); it is sent again when its "
                "claim expires",
                it->key);
        item_free(it);
    }
}

/* outcome: "delivered", "failed", "refused" or "retry" (then after delay_ms). */
static void item_done(cb_item_t *it, const char *outcome, int64_t delay_ms, const char *why)
{
    it->outcome = outcome;
    it->due_ms = pq_now_ms() + delay_ms;
    pq_strlcpy(it->why, why ? why : "", sizeof(it->why));
    item_done_send(it, 0);
}

/* The n-th retry's delay: base * 2^(n-1), capped, with the upper half jittered, so a receiver
 * that comes back is not hit by every queued callback at once. */
static int64_t backoff_ms(const pq_conf_t *c, int n)
{
    int64_t d = pq_backoff_step_ms(c->callback_backoff_ms, c->callback_max_backoff_ms, n);

    return d / 2 + (int64_t)(random() % (d / 2 + 1));
}

static void on_post(void *opaque, const pq_http_result_t *res)
{
    cb_item_t *it = opaque;
    pq_callbacks_t *cb = it->cb;
    const pq_conf_t *c = cb->conf;
    char why[160];
    int64_t delay;

    it->req = NULL;
    cb->nposts--;
    if (cb->starved) {
        cb->starved = 0;
        pq_callbacks_kick(cb);
    }
    pq_hist_observe(cb->m_latency, (double)res->elapsed_ms / 1000.0);
    if (res->err == PQ_OK && res->status >= 200 && res->status < 300) {
        pq_counter_add(cb->m_delivered, 1);
        PQ_LOG(PQ_LOG_DEBUG, "callback of %s delivered (HTTP %ld, attempt %d)", it->key,
               res->status, it->attempts);
        item_done(it, "delivered", 0, "");
        return;
    }
    if (res->err == PQ_OK)
        snprintf(why, sizeof(why), "HTTP %ld", res->status);
    else
        snprintf(why, sizeof(why), "%s%s%.100s", pq_err_name(res->err), res->detail[0] ? ": " : "",
                 res->detail);
    if (res->err == PQ_OK && res->status == 410) {
        /* the receiver says the resource is gone for good */
        pq_counter_add(cb->m_failed, 1);
        PQ_WARN("callback of %s failed: receiver answered 410 Gone", it->key);
        item_done(it, "failed", 0, why);
        return;
    }
    if (it->attempts >= c->callback_max_attempts) {
        pq_counter_add(cb->m_failed, 1);
        PQ_WARN("callback of %s failed after %d attempts (last: %s)", it->key, it->attempts, why);
        item_done(it, "failed", 0, why);
        return;
    }
    delay = backoff_ms(c, it->attempts);
    if (res->retry_after_ms >= 0 && res->retry_after_ms <= c->callback_max_backoff_ms &&
        res->retry_after_ms > delay)
        delay = res->retry_after_ms;
    pq_counter_add(cb->m_retried, 1);
    PQ_INFO("callback of %s: attempt %d: %s; next in %" PRId64 " ms", it->key, it->attempts, why,
            delay);
    item_done(it, "retry", delay, why);
}

/* ---- sending ---- */

static void item_send(pq_callbacks_t *cb, const redisReply *e)
{
    const char *key = e->element[0]->str, *url = e->element[1]->str, *tenant = e->element[2]->str;
    const redisReply *body = e->element[3];
    const char *secret;
    struct curl_slist *h = NULL, *nh;
    char why[300], sig[PQ_CALLBACK_SIG_SIZE], hdr[PQ_CALLBACK_SIG_SIZE + 40];
    char *copy;
    cb_item_t *it = calloc(1, sizeof(*it));

    if (!it || !(it->key = strdup(key))) {
        free(it);
        return; /* its claim expires: sent later */
    }
    it->cb = cb;
    it->attempts = atoi(e->element[4]->str) + 1;
    TAILQ_INSERT_TAIL(&cb->items, it, link);
    /* the URL was allowed when it was queued; this worker's config decides now */
    if (pq_callback_check(cb->conf, tenant, url, why, sizeof(why))) {
        pq_counter_add(cb->m_refused, 1);
        PQ_WARN("callback of %s refused: %s", key, why);
        item_done(it, "refused", 0, why);
        return;
    }
    secret = pq_callback_secret(cb->conf, tenant);
    if (pq_callback_sign(secret, pq_now_ms() / 1000, body->str, body->len, sig, sizeof(sig)))
        goto out_later;
    snprintf(hdr, sizeof(hdr), "x-promptq-signature: %s", sig);
    if (!(nh = curl_slist_append(h, "Content-Type: application/json")))
        goto out_later;
    h = nh;
    if (!(nh = curl_slist_append(h, hdr)))
        goto out_later;
    h = nh;
    snprintf(hdr, sizeof(hdr), "x-promptq-attempt: %d", it->attempts);
    if (!(nh = curl_slist_append(h, hdr)))
        goto out_later;
    h = nh;
    if (!(nh = curl_slist_append(h, "User-Agent: promptq")))
        goto out_later;
    h = nh;
    if (!(nh = curl_slist_append(h, "Expect:"))) /* no 100-continue round trip */
        goto out_later;
    h = nh;
    if (!(copy = malloc(body->len + 1)))
        goto out_later;
    memcpy(copy, body->str, body->len);
    copy[body->len] = '\0';
    it->req = pq_http_post(cb->http, url, h, copy, body->len, cb->conf->callback_timeout_ms,
                           ANSWER_MAX, on_post, it);
    if (it->req)
        cb->nposts++;
    if (!it->req) {
        /* headers and body were taken */
        PQ_WARN("callback of %s: cannot start the POST; retried when its claim expires", key);
        item_free(it);
    }
    return;

out_later:
    curl_slist_free_all(h);
    PQ_WARN("callback of %s: out of memory; retried when its claim expires", key);
    item_free(it);
}

static int claim_entry_ok(const redisReply *e)
{
    if (e->type != REDIS_REPLY_ARRAY || e->elements != 5)
        return 0;
    for (size_t i = 0; i < 5; i++)
        if (e->element[i]->type != REDIS_REPLY_STRING)
            return 0;
    return 1;
}

static void claim(pq_callbacks_t *cb);

static void on_claim(void *opaque, redisReply *r)
{
    pq_callbacks_t *cb = opaque;
    size_t n = 0;

    cb->claiming = 0;
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements < cb->asked)
        cb->starved = 0; /* took every due entry: nothing waits for room */
    if (r && r->type == REDIS_REPLY_ERROR && pq_script_noscript(r->str, r->len)) {
        cb->claim_eval = 1; /* the script cache was flushed: claim again with its text */
        claim(cb);
        return;
    }
    if (!r || r->type != REDIS_REPLY_ARRAY) {
        if (r && r->type == REDIS_REPLY_ERROR)
            PQ_ERR("callbacks: claim: %.200s", r->str);
        poll_in(cb, REDIS_RETRY_MS);
        return;
    }
    for (size_t i = 0; i < r->elements; i++) {
        if (!claim_entry_ok(r->element[i])) {
            PQ_ERR("callbacks: unexpected claim reply");
            continue;
        }
        if (!cb->stopping)
            item_send(cb, r->element[i]);
        n++;
    }
    /* a full claim: more are probably due */
    if (cb->again || (n == CLAIM_MAX && !cb->starved)) {
        cb->again = 0;
        claim(cb);
    } else {
        poll_in(cb, cb->conf->callback_poll_ms);
    }
}

static void claim(pq_callbacks_t *cb)
{
    const pq_conf_t *c = cb->conf;
    pq_script_cmd_t cmd;
    size_t room;

    if (cb->stopping)
        return;
    if (cb->claiming) {
        cb->again = 1;
        return;
    }
    room = (size_t)c->callback_max_inflight > cb->nposts
               ? (size_t)c->callback_max_inflight - cb->nposts
               : 0;
    if (room <= CLAIM_MAX)
        cb->starved = 1; /* at the cap after this claim: the next POST to end claims again */
    if (room == 0) {
        poll_in(cb, c->callback_poll_ms);
        return;
    }
    if (room > CLAIM_MAX)
        room = CLAIM_MAX;
    cb->asked = room;
    if (pq_script_callback_claim_cmd(&cmd, cb->claim_eval, cb->zkey, pq_now_ms(),
                                     c->callback_timeout_ms + CLAIM_MARGIN_MS,
                                     (int64_t)room) != 0 ||
        pq_redis_command(cb->redis, cmd.argc, cmd.argv, cmd.lens, on_claim, cb) != 0) {
        poll_in(cb, REDIS_RETRY_MS); /* Redis down */
        return;
    }
    cb->claim_eval = 0;
    cb->claiming = 1;
}

static void on_poll(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    claim(arg);
}

/* ---- public ---- */

static void on_redis_state(void *opaque, int up)
{
    if (up)
        pq_callbacks_kick(opaque);
}

pq_callbacks_t *pq_callbacks_new(struct event_base *base, const pq_conf_t *conf,
                                 pq_metrics_t *metrics, char *errstr, size_t errstr_size)
{
    static const char name[] = "promptq_callbacks_total",
                      help[] = "callback POSTs by outcome (retried: another attempt follows)";
    static const double bounds[] = {0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
    pq_callbacks_t *cb = calloc(1, sizeof(*cb));

    if (!cb) {
        snprintf(errstr, errstr_size, "out of memory");
        return NULL;
    }
    cb->conf = conf;
    TAILQ_INIT(&cb->items);
    if (pq_key_callbacks(cb->zkey, sizeof(cb->zkey), conf->redis_prefix) < 0) {
        snprintf(errstr, errstr_size, "redis.prefix: too long");
        goto out_fail;
    }
    cb->m_delivered = pq_metrics_counter(metrics, name, help, "outcome=\"delivered\"");
    cb->m_retried = pq_metrics_counter(metrics, name, help, "outcome=\"retried\"");
    cb->m_failed = pq_metrics_counter(metrics, name, help, "outcome=\"failed\"");
    cb->m_refused = pq_metrics_counter(metrics, name, help, "outcome=\"refused\"");
    cb->m_latency =
        pq_metrics_histogram(metrics, "promptq_callback_seconds", "callback POST duration", NULL,
                             bounds, sizeof(bounds) / sizeof(bounds[0]));
    if (!(cb->poll = evtimer_new(base, on_poll, cb))) {
        snprintf(errstr, errstr_size, "out of memory");
        goto out_fail;
    }
    if (conf->ncallback_hosts == 0) {
        cb->stopping = 1; /* nothing may be sent: do not poll */
        return cb;
    }
    if (!(cb->http = pq_http_new(base, HOST_CONNS, errstr, errstr_size)))
        goto out_fail;
    cb->redis = pq_redis_new(base, conf->redis_host, conf->redis_port, conf->redis_password,
                             conf->redis_db, 5000, on_redis_state, cb, errstr, errstr_size);
    if (!cb->redis)
        goto out_fail;
    poll_in(cb, 0);
    return cb;

out_fail:
    pq_callbacks_destroy(cb);
    return NULL;
}

void pq_callbacks_kick(pq_callbacks_t *cb)
{
    if (cb && !cb->stopping)
        poll_in(cb, 0);
}

void pq_callbacks_stop(pq_callbacks_t *cb)
{
    if (!cb)
        return;
    cb->stopping = 1;
    if (cb->poll)
        event_del(cb->poll);
}

void pq_callbacks_destroy(pq_callbacks_t *cb)
{
    cb_item_t *it;

    if (!cb)
        return;
    cb->stopping = 1;
    /* pending outcome writes run with NULL (their items are freed), then POSTs are cancelled
     * without their callbacks: their claims expire and another worker sends them */
    pq_redis_destroy(cb->redis);
    pq_http_destroy(cb->http);
    while ((it = TAILQ_FIRST(&cb->items)))
        item_free(it);
    if (cb->poll)
        event_free(cb->poll);
    free(cb);
}
