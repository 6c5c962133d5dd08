/* Circuit breakers per (provider, model), their probes and the providers' status pages. */
#include "prov_int.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "promptq/log.h"
#include "promptq/util.h"
#include "providers/provider.h"

static void probe_start(pq_circuit_t *c);

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

void pq_circuit_count(pq_circuit_t *c, pq_err_t outcome, int64_t latency_ms)
{
    int slot = outcome_slot(outcome);

    if (slot < 0 || slot >= NOUTCOMES)
        return;
    if (!c->outcomes[slot]) {
        char prov[160], model[256], labels[600];
        prov_label_value(c->pv->conf->name, prov, sizeof(prov));
        prov_label_value(c->target->model, model, sizeof(model));
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
                                             &completion, NULL, NULL, errstr, sizeof(errstr));
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
        probe_done(c, pq_err_is_retryable(err), "token exchange failed");
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
    if (pq_prov_uses_tokens(pv)) {
        c->probe_tw.cb = on_probe_token;
        c->probe_tw.opaque = c;
        switch (pq_prov_token(pv, key, &c->probe_tw, &token, &err)) {
        case 0:
            probe_send(c, token);
            break;
        case 1:
            break;
        default:
            probe_done(c, 1, "token unavailable");
            break;
        }
        return;
    }
    probe_send(c, pq_prov_key(pv, key));
}

/* ---- status pages, availability, health ---- */

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
