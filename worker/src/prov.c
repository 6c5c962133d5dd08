/* Provider runtime state: keys, slots, rate limits, circuits, probes, watsonx tokens. */
#include "prov.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "promptq/log.h"
#include "promptq/util.h"
#include "providers/provider.h"
#include "providers/watsonx.h"

#define NOUTCOMES                                                                                  \
    (2 + (PQ_ERR__RETRYABLE_END - PQ_ERR__RETRYABLE_BEGIN) +                                       \
     (PQ_ERR__PERMANENT_END - PQ_ERR__PERMANENT_BEGIN))
#define PROBE_MAX_BYTES  (256 * 1024)
#define IAM_TIMEOUT_MS   10000
#define IAM_MAX_BYTES    (64 * 1024)
#define MIN_RATIO_CALLS  10
#define STATUS_POLL_MS   5000
#define STATUS_MAX_BYTES (64 * 1024)

enum { C_CLOSED, C_OPEN, C_HALF_OPEN };

typedef struct bucket_s {
    double level, rate, cap; /* rate: units per ms; rate 0 = unlimited */
    int64_t last;
} bucket_t;

typedef struct tok_s {
    char *token;
    int64_t refresh_at; /* monotonic ms */
    pq_http_req_t *req;
    uint64_t round; /* exchanges answered so far; waiters of this one carry it */
    TAILQ_HEAD(, pq_token_wait_s) waiters;
} tok_t;

typedef struct pkey_s {
    pq_prov_t *pv;
    int idx;
    int64_t rest_until; /* monotonic ms */
    int rest_auth;
    bucket_t rpm, tpm;
    tok_t tok;
} pkey_t;

struct pq_circuit_s {
    pq_prov_t *pv;
    const pq_target_t *target;
    int state;
    int consecutive;
    uint8_t *ring; /* 1 = failure */
    /* 429 rests of this model, per key (monotonic ms), and 429s in a row per key (the backoff
     * of a 429 without Retry-After) */
    int64_t *rest_until;
    int *rate_hits;
    int ring_size, ring_pos, ring_count, ring_fail;
    int probe_inflight;
    int probe_own; /* the configured probe is ours (not a job's call) */
    pq_http_req_t *probe_req;
    pq_token_wait_t probe_tw;
    struct event *timer;
    int64_t probe_at;       /* wall ms of the last probe result, 0 = none */
    int probe_ok;           /* its outcome */
    char probe_what[96];    /* its summary ("ok (HTTP 200, 3 ms)", "connect (HTTP 0, 1 ms)") */
    uint64_t probes_failed; /* failed probes since the circuit last opened (summaries) */
    pq_counter_t *outcomes[NOUTCOMES];
    pq_circuit_t *next;
};

struct pq_prov_s {
    pq_provs_t *ps;
    const pq_provider_conf_t *conf;
    const pq_provider_ops_t *ops;
    pkey_t *keys;
    int nkeys; /* at least 1 (a virtual key for a keyless provider) */
    int rr;
    int inflight;
    /* slot waiters in FIFO order: the priority ones (the interactive lane) are served first;
     * two queues, so that a wait is queued and served in O(1) */
    TAILQ_HEAD(pq_slot_queue_s, pq_slot_wait_s) pqueue, queue;
    struct event *pump;
    pq_circuit_t *circuits;
    pq_hist_t *latency;
    uint64_t token_fetches;
    struct event *status_timer; /* status_url poll */
    pq_http_req_t *status_req;
    char indicator[16]; /* statuspage.io status.indicator ("none", "minor", "major", ...), "" */
};

struct pq_provs_s {
    struct event_base *base;
    const pq_conf_t *conf;
    pq_http_t *http;
    pq_metrics_t *metrics;
    pq_prov_t *provs;
    size_t nprovs;
    pq_circuit_cb *listener;
    void *listener_opaque;
};

static void circuit_open(pq_circuit_t *c, const char *why);
static void label_value(const char *s, char *buf, size_t size);
static void probe_start(pq_circuit_t *c);

/* ---- token buckets ---- */

static void bucket_init(bucket_t *b, int per_minute, int64_t now)
{
    b->rate = per_minute > 0 ? (double)per_minute / 60000.0 : 0.0;
    b->cap = per_minute > 0 ? fmax(1.0, (double)per_minute / 60.0) : 0.0;
    b->level = b->cap;
    b->last = now;
}

static void bucket_fill(bucket_t *b, int64_t now)
{
    if (b->rate <= 0.0 || now <= b->last)
        return;
    b->level = fmin(b->cap, b->level + b->rate * (double)(now - b->last));
    b->last = now;
}

/* ms until the bucket allows a call that needs `need` in the bucket (0 = now). */
static int64_t bucket_wait(bucket_t *b, double need, int64_t now)
{
    if (b->rate <= 0.0)
        return 0;
    bucket_fill(b, now);
    if (b->level >= need)
        return 0;
    return (int64_t)ceil((need - b->level) / b->rate);
}

/* ---- keys and slots ---- */

/* The key for a waiter: >= 0 usable now; -1 none usable (err, wake); -2 keys rest on their
 * buckets only (*wake = when to try again). */
static int choose_key(pq_prov_t *pv, uint64_t excluded, const pq_circuit_t *c, int64_t now,
                      pq_err_t *err, int64_t *wake)
{
    int64_t best_rest = INT64_MAX, best_bucket = INT64_MAX;
    int any_rate_rest = 0;

    for (int n = 0; n < pv->nkeys; n++) {
        int i = (pv->rr + n) % pv->nkeys;
        pkey_t *k = &pv->keys[i];
        int64_t w;

        if (i < 64 && (excluded & (1ULL << i)))
            continue;
        if (k->rest_until > now) {
            if (!k->rest_auth) {
                any_rate_rest = 1;
                if (k->rest_until < best_rest)
                    best_rest = k->rest_until;
            }
            continue;
        }
        if (c && c->rest_until[i] > now) { /* rate limited for this model only */
            any_rate_rest = 1;
            if (c->rest_until[i] < best_rest)
                best_rest = c->rest_until[i];
            continue;
        }
        w = bucket_wait(&k->rpm, 1.0, now);
        if (w == 0)
            w = bucket_wait(&k->tpm, 1e-9, now);
        if (w == 0)
            return i;
        if (now + w < best_bucket)
            best_bucket = now + w;
    }
    if (best_bucket != INT64_MAX) {
        *wake = best_bucket;
        return -2;
    }
    *err = any_rate_rest ? PQ_ERR_RATE_LIMITED : PQ_ERR_AUTH;
    *wake = any_rate_rest ? best_rest : 0;
    return -1;
}

static void grant(pq_prov_t *pv, int key, double cost)
{
    pkey_t *k = &pv->keys[key];

    pv->inflight++;
    pv->rr = (key + 1) % pv->nkeys;
    if (k->rpm.rate > 0.0)
        k->rpm.level -= 1.0;
    if (k->tpm.rate > 0.0)
        k->tpm.level -= cost;
}

static int slots_full(const pq_prov_t *pv)
{
    return pv->conf->max_concurrency > 0 && pv->inflight >= pv->conf->max_concurrency;
}

static void pump_in(pq_prov_t *pv, int64_t ms)
{
    struct timeval tv;

    if (ms < 0)
        ms = 0;
    tv.tv_sec = (time_t)(ms / 1000);
    tv.tv_usec = (suseconds_t)((ms % 1000) * 1000);
    evtimer_add(pv->pump, &tv);
}

static struct pq_slot_queue_s *queue_of(pq_prov_t *pv, const pq_slot_wait_t *w)
{
    return w->priority ? &pv->pqueue : &pv->queue;
}

static pq_slot_wait_t *queue_head(pq_prov_t *pv)
{
    pq_slot_wait_t *w = TAILQ_FIRST(&pv->pqueue);
    return w ? w : TAILQ_FIRST(&pv->queue);
}

static void on_pump(evutil_socket_t fd, short what, void *arg)
{
    pq_prov_t *pv = arg;
    pq_slot_wait_t *w;

    while ((w = queue_head(pv))) {
        int64_t now = pq_mono_ms(), wake = 0;
        pq_err_t err = PQ_OK;
        int key;

        if (slots_full(pv))
            break; /* a release pumps again */
        key = choose_key(pv, w->excluded, w->circ, now, &err, &wake);
        if (key == -2) {
            pump_in(pv, wake - now);
            break;
        }
        TAILQ_REMOVE(queue_of(pv, w), w, link);
        w->queued = 0;
        if (key < 0) {
            w->cb(w->opaque, -1, err, wake);
            continue;
        }
        grant(pv, key, w->cost);
        w->cb(w->opaque, key, PQ_OK, 0);
    }
}

int pq_prov_acquire(pq_prov_t *pv, pq_slot_wait_t *w, int *key, pq_err_t *err, int64_t *wake_ms)
{
    int64_t now = pq_mono_ms(), wake = 0;
    int k;

    if (!queue_head(pv) && !slots_full(pv)) {
        k = choose_key(pv, w->excluded, w->circ, now, err, &wake);
        if (k >= 0) {
            grant(pv, k, w->cost);
            *key = k;
            return 0;
        }
        if (k == -1) {
            *wake_ms = wake;
            return -1;
        }
        pump_in(pv, wake - now);
    }
    /* after the other waiters of its kind; a priority one before every other kind */
    TAILQ_INSERT_TAIL(queue_of(pv, w), w, link);
    w->queued = 1;
    return 1;
}

void pq_prov_cancel(pq_prov_t *pv, pq_slot_wait_t *w)
{
    if (!w->queued)
        return;
    TAILQ_REMOVE(queue_of(pv, w), w, link);
    w->queued = 0;
    if (queue_head(pv))
        pump_in(pv, 0); /* the head may have changed */
}

void pq_prov_release(pq_prov_t *pv, int key, double cost, int64_t tokens, int refund)
{
    pkey_t *k = key >= 0 && key < pv->nkeys ? &pv->keys[key] : NULL;

    if (pv->inflight > 0)
        pv->inflight--;
    if (k && k->tpm.rate > 0.0 && (refund || tokens >= 0)) {
        bucket_fill(&k->tpm, pq_mono_ms());
        k->tpm.level = fmin(k->tpm.cap, k->tpm.level + cost - (refund ? 0.0 : (double)tokens));
    }
    if (k && refund && k->rpm.rate > 0.0)
        k->rpm.level = fmin(k->rpm.cap, k->rpm.level + 1.0);
    if (queue_head(pv))
        pump_in(pv, 0);
}

void pq_prov_key_rest(pq_prov_t *pv, int key, int64_t ms, int auth)
{
    pkey_t *k;
    int64_t until;

    if (key < 0 || key >= pv->nkeys || ms <= 0)
        return;
    k = &pv->keys[key];
    until = pq_mono_ms() + ms;
    if (until > k->rest_until || auth) {
        k->rest_until = until;
        k->rest_auth = auth;
    }
    if (auth) {
        /* a bad key is an operator's problem: say so loudly (the index, never the key) */
        char prov[160], labels[240];
        label_value(pv->conf->name, prov, sizeof(prov));
        snprintf(labels, sizeof(labels), "provider=\"%s\",key=\"%d\"", prov, key);
        pq_counter_add(pq_metrics_counter(pv->ps->metrics, "promptq_worker_key_refused_total",
                                          "provider keys refused (401/403) by provider and key "
                                          "index: rotate the key",
                                          labels),
                       1);
        PQ_WARN("provider %s: key #%d was refused (401/403): it rests %" PRId64 " ms; rotate it",
                pv->conf->name, key, ms);
    } else if (pv->conf->napi_keys > 1) {
        PQ_INFO("provider %s: key #%d rests %" PRId64 " ms (quota for the whole key)",
                pv->conf->name, key, ms);
    }
}

const char *pq_prov_key(const pq_prov_t *pv, int key)
{
    if (key < 0 || (size_t)key >= pv->conf->napi_keys)
        return NULL;
    return pv->conf->api_keys[key];
}

const pq_provider_conf_t *pq_prov_conf(const pq_prov_t *pv)
{
    return pv->conf;
}

/* ---- watsonx IAM tokens ---- */

static void tok_drop(tok_t *t)
{
    if (t->token) {
        explicit_bzero(t->token, strlen(t->token));
        free(t->token);
        t->token = NULL;
    }
    t->refresh_at = 0;
}

/* Answers the waiters of the exchange that just ended, and only them: a callback may ask again
 * (joining the next exchange, a later round) or cancel another waiter. The token is read anew
 * for each waiter, since a callback may invalidate it. */
static void tok_notify(tok_t *t, pq_err_t err)
{
    pq_token_wait_t *w;
    uint64_t round = t->round++;

    while ((w = TAILQ_FIRST(&t->waiters)) && w->round == round) {
        TAILQ_REMOVE(&t->waiters, w, link);
        w->queued = 0;
        if (err == PQ_OK && !t->token)
            w->cb(w->opaque, NULL, PQ_ERR_AUTH); /* invalidated by an earlier callback */
        else
            w->cb(w->opaque, err == PQ_OK ? t->token : NULL, err);
    }
}

static void on_iam_done(void *opaque, const pq_http_result_t *res)
{
    pkey_t *k = opaque;
    pq_prov_t *pv = k->pv;
    tok_t *t = &k->tok;
    char errstr[256] = "", *token = NULL;
    int64_t expires_at = 0;
    pq_err_t err = res->err;

    t->req = NULL;
    if (err == PQ_OK)
        err = pq_watsonx_token_parse(res->status, res->body, res->body_len, &token, &expires_at,
                                     errstr, sizeof(errstr));
    else
        snprintf(errstr, sizeof(errstr), "%s", res->detail);
    if (err == PQ_OK) {
        int64_t left = expires_at - pq_now_ms();
        tok_drop(t);
        t->token = token;
        t->refresh_at = pq_mono_ms() + (left > 0 ? left : 0);
        PQ_DBG("provider %s: IAM token for key #%d, refresh in %" PRId64 " s", pv->conf->name,
               k->idx, left / 1000);
    } else {
        PQ_WARN("provider %s: IAM token exchange for key #%d failed: %s (%s)", pv->conf->name,
                k->idx, pq_err_name(err), errstr);
    }
    tok_notify(t, err);
}

int pq_prov_token(pq_prov_t *pv, int key, pq_token_wait_t *w, const char **token, pq_err_t *err)
{
    tok_t *t;
    pq_provider_req_t req;
    char errstr[256];
    pq_err_t e;

    if (key < 0 || key >= pv->nkeys) {
        *err = PQ_ERR_CONFIG;
        return -1;
    }
    t = &pv->keys[key].tok;
    if (t->token && pq_mono_ms() < t->refresh_at) {
        *token = t->token;
        return 0;
    }
    w->key = key;
    if (t->req) {
        TAILQ_INSERT_TAIL(&t->waiters, w, link);
        w->queued = 1;
        w->round = t->round;
        return 1;
    }
    memset(&req, 0, sizeof(req));
    e = pq_watsonx_token_request(pv->conf, pq_prov_key(pv, key), &req, errstr, sizeof(errstr));
    if (e != PQ_OK) {
        pq_provider_req_clear(&req);
        PQ_WARN("provider %s: cannot build the IAM request: %s", pv->conf->name, errstr);
        *err = e;
        return -1;
    }
    pv->token_fetches++;
    t->req =
        pq_http_post(pv->ps->http, req.url, req.headers, req.body, req.body_len,
                     pv->conf->timeout_ms < IAM_TIMEOUT_MS ? pv->conf->timeout_ms : IAM_TIMEOUT_MS,
                     IAM_MAX_BYTES, on_iam_done, &pv->keys[key]);
    req.headers = NULL;
    req.body = NULL; /* taken (holds the API key: http.c frees it) */
    pq_provider_req_clear(&req);
    if (!t->req) {
        *err = PQ_ERR_INTERNAL;
        return -1;
    }
    TAILQ_INSERT_TAIL(&t->waiters, w, link);
    w->queued = 1;
    w->round = t->round;
    return 1;
}

void pq_prov_token_cancel(pq_prov_t *pv, pq_token_wait_t *w)
{
    if (!w->queued)
        return;
    TAILQ_REMOVE(&pv->keys[w->key].tok.waiters, w, link);
    w->queued = 0;
}

void pq_prov_token_invalidate(pq_prov_t *pv, int key, const char *token)
{
    tok_t *t;

    if (key < 0 || key >= pv->nkeys)
        return;
    t = &pv->keys[key].tok;
    if (t->token && token && strcmp(t->token, token) == 0)
        tok_drop(t);
}

uint64_t pq_prov_token_fetches(const pq_prov_t *pv)
{
    return pv->token_fetches;
}

/* ---- circuits ---- */

static const char *state_name(int s)
{
    return s == C_OPEN ? "open" : s == C_HALF_OPEN ? "half_open" : "closed";
}

const char *pq_circuit_state(const pq_circuit_t *c)
{
    return state_name(c->state);
}

static void circuit_timer_in(pq_circuit_t *c, int64_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000)};
    evtimer_add(c->timer, &tv);
}

static void ring_reset(pq_circuit_t *c)
{
    memset(c->ring, 0, (size_t)c->ring_size);
    c->ring_pos = c->ring_count = c->ring_fail = 0;
    c->consecutive = 0;
}

static int64_t reprobe_ms(const pq_circuit_t *c)
{
    const pq_provider_conf_t *p = c->pv->conf;
    return p->probe_interval_ms < p->circuit_cooldown_ms ? p->probe_interval_ms
                                                         : p->circuit_cooldown_ms;
}

static void circuit_open(pq_circuit_t *c, const char *why)
{
    int was = c->state;

    c->state = C_OPEN;
    ring_reset(c);
    circuit_timer_in(c, was == C_HALF_OPEN ? reprobe_ms(c) : c->pv->conf->circuit_cooldown_ms);
    if (was == C_CLOSED) {
        c->probes_failed = 0;
        PQ_WARN("circuit %s/%s opened: %s", c->pv->conf->name, c->target->model, why);
        if (c->pv->ps->listener)
            c->pv->ps->listener(c->pv->ps->listener_opaque, c->pv->conf, c->target->model, 0);
    } else {
        /* an outage: one line per state change, the worker's summary counts the rest */
        c->probes_failed++;
        PQ_DBG("circuit %s/%s stays open: %s", c->pv->conf->name, c->target->model, why);
    }
}

static void circuit_close(pq_circuit_t *c, const char *why)
{
    int was = c->state;

    if (was != C_CLOSED)
        PQ_WARN("circuit %s/%s closed: %s (%" PRIu64 " failed probes while open)",
                c->pv->conf->name, c->target->model, why, c->probes_failed);
    c->state = C_CLOSED;
    evtimer_del(c->timer);
    ring_reset(c);
    if (was != C_CLOSED && c->pv->ps->listener)
        c->pv->ps->listener(c->pv->ps->listener_opaque, c->pv->conf, c->target->model, 1);
}

static void on_circuit_timer(evutil_socket_t fd, short what, void *arg)
{
    pq_circuit_t *c = arg;

    if (c->state == C_CLOSED)
        return;
    c->state = C_HALF_OPEN;
    /* half_open "call": the next job's call takes the probe role (pq_circuit_allow) */
    if (!c->probe_inflight && strcmp(c->pv->conf->half_open, "call") != 0)
        probe_start(c);
    /* a probe that never answers (or a job holding the probe role) cannot wedge it */
    circuit_timer_in(c, reprobe_ms(c) + c->pv->conf->timeout_ms);
}

int pq_circuit_allow(pq_circuit_t *c)
{
    if (c->state == C_CLOSED)
        return 1;
    if (c->state == C_HALF_OPEN && !c->probe_inflight) {
        c->probe_inflight = 1;
        c->probe_own = 0;
        return 2;
    }
    return 0;
}

void pq_circuit_force_close(pq_circuit_t *c, const char *why)
{
    circuit_close(c, why);
}

void pq_circuit_probe_abort(pq_circuit_t *c)
{
    if (c->probe_inflight && !c->probe_own)
        c->probe_inflight = 0;
}

void pq_circuit_record(pq_circuit_t *c, int failure, int probe)
{
    const pq_provider_conf_t *p = c->pv->conf;
    char why[128];
    int min_calls;

    if (probe) {
        c->probe_inflight = 0;
        if (failure)
            circuit_open(c, "probe failed");
        else
            circuit_close(c, "probe succeeded");
        return;
    }
    if (c->state != C_CLOSED)
        return; /* calls started before it opened */
    if (c->ring_count == c->ring_size) {
        c->ring_fail -= c->ring[c->ring_pos];
        c->ring_count--;
    }
    c->ring[c->ring_pos] = (uint8_t)(failure ? 1 : 0);
    c->ring_fail += failure ? 1 : 0;
    c->ring_pos = (c->ring_pos + 1) % c->ring_size;
    c->ring_count++;
    c->consecutive = failure ? c->consecutive + 1 : 0;
    if (!failure)
        return;
    min_calls = c->ring_size < MIN_RATIO_CALLS ? c->ring_size : MIN_RATIO_CALLS;
    if (c->consecutive >= p->circuit_failures) {
        snprintf(why, sizeof(why), "%d consecutive failures", c->consecutive);
        circuit_open(c, why);
    } else if (c->ring_count >= min_calls &&
               (double)c->ring_fail >= p->circuit_ratio * (double)c->ring_count) {
        snprintf(why, sizeof(why), "%d of the last %d calls failed", c->ring_fail, c->ring_count);
        circuit_open(c, why);
    }
}

static int outcome_slot(pq_err_t e)
{
    if (e == PQ_OK)
        return 0;
    if (e > PQ_ERR__RETRYABLE_BEGIN && e < PQ_ERR__RETRYABLE_END)
        return 1 + (int)(e - PQ_ERR__RETRYABLE_BEGIN);
    if (e > PQ_ERR__PERMANENT_BEGIN && e < PQ_ERR__PERMANENT_END)
        return 1 + (int)(PQ_ERR__RETRYABLE_END - PQ_ERR__RETRYABLE_BEGIN) +
               (int)(e - PQ_ERR__PERMANENT_BEGIN);
    return -1;
}

/* Writes s into buf as a Prometheus label value (backslash, quote and newline escaped). */
static void label_value(const char *s, char *buf, size_t size)
{
    size_t o = 0;

    for (; *s && o + 3 < size; s++) {
        if (*s == '\\' || *s == '"') {
            buf[o++] = '\\';
            buf[o++] = *s;
        } else if (*s == '\n') {
            buf[o++] = '\\';
            buf[o++] = 'n';
        } else {
            buf[o++] = *s;
        }
    }
    buf[o] = '\0';
}

void pq_circuit_count(pq_circuit_t *c, pq_err_t outcome, int64_t latency_ms)
{
    int slot = outcome_slot(outcome);

    if (slot < 0 || slot >= NOUTCOMES)
        return;
    if (!c->outcomes[slot]) {
        char prov[160], model[256], labels[600];
        label_value(c->pv->conf->name, prov, sizeof(prov));
        label_value(c->target->model, model, sizeof(model));
        snprintf(labels, sizeof(labels), "provider=\"%s\",model=\"%s\",outcome=\"%s\"", prov, model,
                 outcome == PQ_OK ? "ok" : pq_err_name(outcome));
        c->outcomes[slot] = pq_metrics_counter(
            c->pv->ps->metrics, "promptq_worker_attempts_total",
            "provider attempts by provider, model and outcome (skips included)", labels);
    }
    pq_counter_add(c->outcomes[slot], 1);
    if (latency_ms >= 0)
        pq_hist_observe(c->pv->latency, (double)latency_ms / 1000.0);
}

pq_circuit_t *pq_prov_circuit(pq_prov_t *pv, const pq_target_t *target)
{
    pq_circuit_t *c;

    for (c = pv->circuits; c; c = c->next)
        if (c->target == target || strcmp(c->target->model, target->model) == 0)
            return c;
    c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->pv = pv;
    c->target = target;
    c->ring_size = pv->conf->circuit_window > 0 ? pv->conf->circuit_window : 20;
    c->ring = calloc((size_t)c->ring_size, 1);
    c->rest_until = calloc((size_t)pv->nkeys, sizeof(*c->rest_until));
    c->rate_hits = calloc((size_t)pv->nkeys, sizeof(*c->rate_hits));
    c->timer = evtimer_new(pv->ps->base, on_circuit_timer, c);
    if (!c->ring || !c->rest_until || !c->rate_hits || !c->timer) {
        free(c->ring);
        free(c->rest_until);
        free(c->rate_hits);
        if (c->timer)
            event_free(c->timer);
        free(c);
        return NULL;
    }
    c->next = pv->circuits;
    pv->circuits = c;
    return c;
}

/* ---- probes ---- */

static int status_bad(const pq_prov_t *pv)
{
    return strcmp(pv->indicator, "major") == 0 || strcmp(pv->indicator, "critical") == 0;
}

static void probe_done(pq_circuit_t *c, int failure, const char *what)
{
    /* the provider's status page reporting a major or critical incident is a failure signal
     * of its own: an answering probe does not close the circuit during one */
    if (!failure && status_bad(c->pv)) {
        failure = 1;
        snprintf(c->probe_what, sizeof(c->probe_what), "status page %s; %s", c->pv->indicator,
                 what);
    } else {
        pq_strlcpy(c->probe_what, what, sizeof(c->probe_what));
    }
    PQ_DBG("probe of %s/%s: %s", c->pv->conf->name, c->target->model, c->probe_what);
    c->probe_at = pq_now_ms();
    c->probe_ok = !failure;
    c->probe_own = 0;
    pq_circuit_record(c, failure, 1);
}

static void on_probe_http(void *opaque, const pq_http_result_t *res)
{
    pq_circuit_t *c = opaque;
    json_t *completion = NULL;
    char errstr[256] = "", what[300];
    pq_err_t err = res->err;
    int models = c->pv->conf->probe && strcmp(c->pv->conf->probe, "models") == 0;

    c->probe_req = NULL;
    if (err == PQ_OK) {
        if (models && !strcmp(c->pv->ops->type, "openai"))
            err = pq_err_from_http_status(res->status);
        else
            err = c->pv->ops->parse_response(c->target, res->status, res->body, res->body_len,
                                             &completion, NULL, errstr, sizeof(errstr));
    }
    json_decref(completion);
    pq_circuit_count(c, err, res->elapsed_ms);
    snprintf(what, sizeof(what), "%s (HTTP %ld, %" PRId64 " ms)",
             err == PQ_OK ? "ok" : pq_err_name(err), res->status, res->elapsed_ms);
    /* a refusal (400, 401, ...) still proves the provider answers */
    probe_done(c, pq_err_is_retryable(err), what);
}

static void probe_send(pq_circuit_t *c, const char *key)
{
    pq_prov_t *pv = c->pv;
    pq_provider_req_t req;
    json_t *body;
    char errstr[256] = "";
    pq_err_t err;
    int models = pv->conf->probe && strcmp(pv->conf->probe, "models") == 0 &&
                 strcmp(pv->ops->type, "openai") == 0;

    memset(&req, 0, sizeof(req));
    body = json_pack("{s:s, s:[{s:s, s:s}], s:i}", "model", c->target->model, "messages", "role",
                     "user", "content", "ping", "max_tokens", 1);
    err = body ? pv->ops->build_request(c->target, body, key, &req, errstr, sizeof(errstr))
               : PQ_ERR_NOMEM;
    json_decref(body);
    if (err != PQ_OK) {
        probe_done(c, 1, "cannot build the probe request");
        return;
    }
    if (models) {
        char *url = NULL;
        if (asprintf(&url, "%s/models", pv->conf->base_url) < 0)
            url = NULL;
        if (!url) {
            pq_provider_req_clear(&req);
            probe_done(c, 1, "out of memory");
            return;
        }
        c->probe_req = pq_http_get(pv->ps->http, url, req.headers, pv->conf->timeout_ms,
                                   PROBE_MAX_BYTES, on_probe_http, c);
        free(url);
    } else {
        c->probe_req = pq_http_post(pv->ps->http, req.url, req.headers, req.body, req.body_len,
                                    pv->conf->timeout_ms, PROBE_MAX_BYTES, on_probe_http, c);
        req.body = NULL;
    }
    req.headers = NULL;
    pq_provider_req_clear(&req);
    if (!c->probe_req)
        probe_done(c, 1, "cannot start the probe request");
}

static void on_probe_token(void *opaque, const char *token, pq_err_t err)
{
    pq_circuit_t *c = opaque;

    if (!token) {
        probe_done(c, pq_err_is_retryable(err), "IAM token exchange failed");
        return;
    }
    probe_send(c, token);
}

/* The configured probe of a half-open circuit: a 1-token completion (or GET models for an
 * OpenAI-format provider with probe "models"), with the next rested key, outside the slot and
 * rate accounting. */
static void probe_start(pq_circuit_t *c)
{
    pq_prov_t *pv = c->pv;
    int64_t now = pq_mono_ms();
    int key = 0;
    const char *token = NULL;
    pq_err_t err;

    for (int n = 0; n < pv->nkeys; n++) {
        int i = (pv->rr + n) % pv->nkeys;
        if (pv->keys[i].rest_until <= now) {
            key = i;
            break;
        }
    }
    c->probe_inflight = 1;
    c->probe_own = 1;
    PQ_DBG("probing %s/%s (%s)", pv->conf->name, c->target->model,
           pv->conf->probe ? pv->conf->probe : "completion");
    if (strcmp(pv->ops->type, "watsonx") == 0) {
        c->probe_tw.cb = on_probe_token;
        c->probe_tw.opaque = c;
        switch (pq_prov_token(pv, key, &c->probe_tw, &token, &err)) {
        case 0:
            probe_send(c, token);
            break;
        case 1:
            break;
        default:
            probe_done(c, 1, "IAM token unavailable");
            break;
        }
        return;
    }
    probe_send(c, pq_prov_key(pv, key));
}

/* ---- status pages, availability, health ---- */

static void on_status_http(void *opaque, const pq_http_result_t *res)
{
    pq_prov_t *pv = opaque;
    json_t *doc = NULL;
    const char *ind = NULL;
    char was[sizeof(pv->indicator)];

    pv->status_req = NULL;
    pq_strlcpy(was, pv->indicator, sizeof(was));
    if (res->err == PQ_OK && res->status == 200)
        doc = json_loadb(res->body, res->body_len, 0, NULL);
    ind = json_string_value(json_object_get(json_object_get(doc, "status"), "indicator"));
    pq_strlcpy(pv->indicator, ind ? ind : "", sizeof(pv->indicator));
    if (ind && strcmp(was, pv->indicator) != 0)
        PQ_INFO("provider %s: status page indicator %s", pv->conf->name, pv->indicator);
    else if (!ind && was[0])
        PQ_DBG("provider %s: status page unreadable (HTTP %ld)", pv->conf->name, res->status);
    json_decref(doc);
}

static void on_status_timer(evutil_socket_t fd, short what, void *arg)
{
    pq_prov_t *pv = arg;

    if (pv->status_req)
        return;
    pv->status_req = pq_http_get(pv->ps->http, pv->conf->status_url, NULL,
                                 pv->conf->timeout_ms < 10000 ? pv->conf->timeout_ms : 10000,
                                 STATUS_MAX_BYTES, on_status_http, pv);
}

void pq_provs_set_listener(pq_provs_t *ps, pq_circuit_cb *cb, void *opaque)
{
    ps->listener = cb;
    ps->listener_opaque = opaque;
}

int pq_circuit_available(const pq_circuit_t *c)
{
    return c->state == C_CLOSED || (c->state == C_HALF_OPEN && !c->probe_inflight);
}

int64_t pq_circuit_rate_limited(pq_circuit_t *c, int key, int64_t retry_after_ms)
{
    const pq_provider_conf_t *p = c->pv->conf;
    int64_t ms, d, until;

    if (key < 0 || key >= c->pv->nkeys)
        return 0;
    if (c->rate_hits[key] < 30)
        c->rate_hits[key]++;
    if (retry_after_ms >= 0) {
        ms = retry_after_ms < p->max_rest_ms ? retry_after_ms : p->max_rest_ms;
    } else {
        /* no word from the provider: 1 s, 2 s, 4 s ... up to max_rest_ms, upper half jittered
         * so that the workers sharing a key do not come back together */
        d = pq_backoff_step_ms(1000, p->max_rest_ms, c->rate_hits[key]);
        ms = d / 2 + (int64_t)(random() % (d / 2 + 1));
    }
    until = pq_mono_ms() + ms;
    if (until > c->rest_until[key])
        c->rest_until[key] = until;
    PQ_INFO("provider %s: key #%d rests %" PRId64 " ms for model %s (429%s)", p->name, key, ms,
            c->target->model, retry_after_ms >= 0 ? " with Retry-After" : ", backing off");
    return ms;
}

void pq_circuit_key_ok(pq_circuit_t *c, int key)
{
    if (key >= 0 && key < c->pv->nkeys)
        c->rate_hits[key] = 0;
}

int pq_circuit_keys_ready(const pq_circuit_t *c, int64_t *wake_ms)
{
    int64_t now = pq_mono_ms(), best = INT64_MAX;

    for (int i = 0; i < c->pv->nkeys; i++) {
        const pkey_t *k = &c->pv->keys[i];
        int64_t until = k->rest_until > c->rest_until[i] ? k->rest_until : c->rest_until[i];

        if (until <= now)
            return 1;
        if (until < best)
            best = until;
    }
    if (wake_ms)
        *wake_ms = best;
    return 0;
}

int pq_provs_target_available(pq_provs_t *ps, const pq_target_t *t)
{
    pq_prov_t *pv = pq_provs_get(ps, t->p);
    pq_circuit_t *c = pv ? pq_prov_circuit(pv, t) : NULL;

    return !c || (pq_circuit_available(c) && pq_circuit_keys_ready(c, NULL));
}

size_t pq_provs_open_circuits(const pq_provs_t *ps)
{
    size_t n = 0;

    for (size_t i = 0; i < ps->nprovs; i++)
        for (const pq_circuit_t *c = ps->provs[i].circuits; c; c = c->next)
            n += c->state != C_CLOSED;
    return n;
}

json_t *pq_provs_health(const pq_provs_t *ps)
{
    json_t *a = json_array();

    for (size_t i = 0; a && i < ps->nprovs; i++) {
        const pq_prov_t *pv = &ps->provs[i];
        for (const pq_circuit_t *c = pv->circuits; c; c = c->next) {
            json_t *e = json_object();
            json_object_set_new(e, "provider", json_string(pv->conf->name));
            json_object_set_new(e, "model", json_string(c->target->model));
            json_object_set_new(e, "circuit", json_string(state_name(c->state)));
            if (c->probe_at > 0)
                json_object_set_new(e, "last_probe",
                                    json_pack("{s:b, s:I, s:s}", "ok", c->probe_ok, "at",
                                              (json_int_t)c->probe_at, "detail", c->probe_what));
            else
                json_object_set_new(e, "last_probe", json_null());
            json_object_set_new(e, "status_page",
                                pv->indicator[0] ? json_string(pv->indicator) : json_null());
            json_array_append_new(a, e);
        }
    }
    return a;
}

/* ---- construction ---- */

pq_provs_t *pq_provs_new(struct event_base *base, const pq_conf_t *conf, pq_http_t *http,
                         pq_metrics_t *metrics, char *errstr, size_t errstr_size)
{
    pq_provs_t *ps = calloc(1, sizeof(*ps));
    int64_t now = pq_mono_ms();

    if (!ps)
        goto out_nomem;
    ps->base = base;
    ps->conf = conf;
    ps->http = http;
    ps->metrics = metrics;
    ps->nprovs = conf->nproviders;
    ps->provs = calloc(ps->nprovs ? ps->nprovs : 1, sizeof(*ps->provs));
    if (!ps->provs)
        goto out_nomem;
    for (size_t i = 0; i < ps->nprovs; i++) {
        pq_prov_t *pv = &ps->provs[i];
        const pq_provider_conf_t *p = &conf->providers[i];
        char labels[200], name[160];

        pv->ps = ps;
        pv->conf = p;
        pv->ops = pq_provider_find(p->type);
        pv->nkeys = p->napi_keys > 0 ? (int)p->napi_keys : 1;
        TAILQ_INIT(&pv->pqueue);
        TAILQ_INIT(&pv->queue);
        pv->keys = calloc((size_t)pv->nkeys, sizeof(*pv->keys));
        pv->pump = evtimer_new(base, on_pump, pv);
        if (!pv->keys || !pv->pump)
            goto out_nomem;
        for (int k = 0; k < pv->nkeys; k++) {
            pv->keys[k].pv = pv;
            pv->keys[k].idx = k;
            bucket_init(&pv->keys[k].rpm, p->rpm, now);
            bucket_init(&pv->keys[k].tpm, p->tpm, now);
            TAILQ_INIT(&pv->keys[k].tok.waiters);
        }
        label_value(p->name, name, sizeof(name));
        snprintf(labels, sizeof(labels), "provider=\"%s\"", name);
        pv->latency = pq_metrics_histogram(metrics, "promptq_worker_provider_seconds",
                                           "provider call latency", labels,
                                           pq_metrics_latency_bounds, pq_metrics_latency_nbounds);
        if (p->status_url) {
            struct timeval tv = {STATUS_POLL_MS / 1000, (STATUS_POLL_MS % 1000) * 1000};
            pv->status_timer = event_new(base, -1, EV_PERSIST, on_status_timer, pv);
            if (!pv->status_timer)
                goto out_nomem;
            event_add(pv->status_timer, &tv);
            event_active(pv->status_timer, EV_TIMEOUT, 0);
        }
    }
    return ps;

out_nomem:
    snprintf(errstr, errstr_size, "out of memory");
    pq_provs_destroy(ps);
    return NULL;
}

void pq_provs_destroy(pq_provs_t *ps)
{
    if (!ps)
        return;
    for (size_t i = 0; ps->provs && i < ps->nprovs; i++) {
        pq_prov_t *pv = &ps->provs[i];
        pq_circuit_t *c;

        while ((c = pv->circuits)) {
            pv->circuits = c->next;
            if (c->probe_req)
                pq_http_cancel(ps->http, c->probe_req);
            if (c->timer)
                event_free(c->timer);
            free(c->ring);
            free(c->rest_until);
            free(c->rate_hits);
            free(c);
        }
        for (int k = 0; pv->keys && k < pv->nkeys; k++) {
            tok_t *t = &pv->keys[k].tok;
            if (t->req)
                pq_http_cancel(ps->http, t->req);
            tok_drop(t);
        }
        if (pv->pump)
            event_free(pv->pump);
        if (pv->status_req)
            pq_http_cancel(ps->http, pv->status_req);
        if (pv->status_timer)
            event_free(pv->status_timer);
        free(pv->keys);
    }
    free(ps->provs);
    free(ps);
}

pq_prov_t *pq_provs_get(pq_provs_t *ps, const pq_provider_conf_t *p)
{
    size_t i;

    if (!p || p < ps->conf->providers)
        return NULL;
    i = (size_t)(p - ps->conf->providers);
    return i < ps->nprovs ? &ps->provs[i] : NULL;
}
