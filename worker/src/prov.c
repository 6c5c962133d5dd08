/* Provider runtime state: keys, slots, rate limits, exchanged tokens, construction (circuits,
 * probes and status pages are in circuit.c). */
#include "prov_int.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "promptq/log.h"
#include "promptq/util.h"
#include "providers/provider.h"

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
        prov_label_value(pv->conf->name, prov, sizeof(prov));
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

/* ---- exchanged tokens (adapters with token hooks: watsonx IAM) ---- */

static void tok_drop(tok_t *t)
{
    if (t->token) {
        explicit_bzero(t->token, strlen(t->token));
        free(t->token);
        t->token = NULL;
    }
    t->refresh_at = 0;
    t->gen = 0;
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

static void on_token_done(void *opaque, const pq_http_result_t *res)
{
    pkey_t *k = opaque;
    pq_prov_t *pv = k->pv;
    tok_t *t = &k->tok;
    char errstr[256] = "", *token = NULL;
    int64_t expires_at = 0;
    pq_err_t err = res->err;

    t->req = NULL;
    if (err == PQ_OK)
        err = pv->ops->token_parse(res->status, res->body, res->body_len, &token, &expires_at,
                                   errstr, sizeof(errstr));
    else
        snprintf(errstr, sizeof(errstr), "%s", res->detail);
    if (err == PQ_OK) {
        int64_t left = expires_at - pq_now_ms();
        tok_drop(t);
        t->token = token;
        t->gen = ++pv->ps->token_gens;
        t->refresh_at = pq_mono_ms() + (left > 0 ? left : 0);
        PQ_DBG("provider %s: token for key #%d, refresh in %" PRId64 " s", pv->conf->name, k->idx,
               left / 1000);
    } else {
        PQ_WARN("provider %s: token exchange for key #%d failed: %s (%s)", pv->conf->name, k->idx,
                pq_err_name(err), errstr);
    }
    tok_notify(t, err);
}

int pq_prov_uses_tokens(const pq_prov_t *pv)
{
    return pv->ops && pv->ops->token_request && pv->ops->token_parse;
}

uint64_t pq_prov_token_gen(const pq_prov_t *pv, int key)
{
    if (key < 0 || key >= pv->nkeys)
        return 0;
    return pv->keys[key].tok.gen;
}

int pq_prov_token(pq_prov_t *pv, int key, pq_token_wait_t *w, const char **token, pq_err_t *err)
{
    tok_t *t;
    pq_provider_req_t req;
    char errstr[256];
    pq_err_t e;

    if (key < 0 || key >= pv->nkeys || !pq_prov_uses_tokens(pv)) {
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
    e = pv->ops->token_request(pv->conf, pq_prov_key(pv, key), &req, errstr, sizeof(errstr));
    if (e != PQ_OK) {
        pq_provider_req_clear(&req);
        PQ_WARN("provider %s: cannot build the token exchange: %s", pv->conf->name, errstr);
        *err = e;
        return -1;
    }
    pv->token_fetches++;
    t->req = pq_http_post(pv->ps->http, req.url, req.headers, req.body, req.body_len,
                          pv->conf->timeout_ms < TOKEN_TIMEOUT_MS ? pv->conf->timeout_ms
                                                                  : TOKEN_TIMEOUT_MS,
                          TOKEN_MAX_BYTES, on_token_done, &pv->keys[key]);
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

void pq_prov_token_invalidate(pq_prov_t *pv, int key, uint64_t gen)
{
    tok_t *t;

    if (key < 0 || key >= pv->nkeys)
        return;
    t = &pv->keys[key].tok;
    if (t->token && gen && t->gen == gen)
        tok_drop(t);
}

uint64_t pq_prov_token_fetches(const pq_prov_t *pv)
{
    return pv->token_fetches;
}

/* Writes s into buf as a Prometheus label value (backslash, quote and newline escaped). */
void prov_label_value(const char *s, char *buf, size_t size)
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

/* ---- status pages ---- */

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

/* Starts the status page poll of a provider with status_url: 0, or -1 out of memory. */
static int prov_status_start(pq_prov_t *pv, struct event_base *base)
{
    struct timeval tv = {STATUS_POLL_MS / 1000, (STATUS_POLL_MS % 1000) * 1000};

    pv->status_timer = event_new(base, -1, EV_PERSIST, on_status_timer, pv);
    if (!pv->status_timer)
        return -1;
    event_add(pv->status_timer, &tv);
    event_active(pv->status_timer, EV_TIMEOUT, 0);
    return 0;
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
        prov_label_value(p->name, name, sizeof(name));
        snprintf(labels, sizeof(labels), "provider=\"%s\"", name);
        pv->latency = pq_metrics_histogram(metrics, "promptq_worker_provider_seconds",
                                           "provider call latency", labels,
                                           pq_metrics_latency_bounds, pq_metrics_latency_nbounds);
        if (p->status_url && prov_status_start(pv, base) != 0)
            goto out_nomem;
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
