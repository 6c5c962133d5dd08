/* The worker's provider policy (worker/src/prov.c) on a real libevent loop: key rotation and
 * rest, call slots (max_concurrency, FIFO with priority, cancel), rpm and tpm buckets, circuit
 * breakers (consecutive failures, failure ratio over a sliding window, half-open probe,
 * re-open, close), the status page signal, pq_provs_health, the attempts counter, and the
 * watsonx IAM token cache (one exchange in flight per key, reuse, invalidate, errors).
 *
 * Probes, IAM exchanges and status polls go over loopback HTTP to a small evhttp server that
 * runs on the same event base (127.0.0.1, ephemeral port). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <cmocka.h>

#include <curl/curl.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>

#include "http.h"
#include "prov.h"
#include "rate_hints.h"
#include "promptq/conf.h"
#include "promptq/log.h"
#include "promptq/metrics.h"
#include "promptq/util.h"

/* ---- loopback server: /v1/chat/completions (probes), /identity/token (IAM), /status.json ---- */

enum { PROBE_HOLD = 0 }; /* probe_status 0: keep the request unanswered until srv_release */

typedef struct srv_s {
    struct evhttp *http;
    int port;
    int probe_count, iam_count, status_count;
    int probe_status; /* 200, 500, ... or PROBE_HOLD */
    int iam_status;   /* 200 answers a token tok<N>; anything else an IAM error */
    struct evhttp_request *held;
    char probe_path[128];
    char probe_auth[128];
    char iam_body[512];
    char indicator[16];
    int64_t probe_at[16]; /* monotonic arrival times of the first probes */
} srv_t;

static void srv_reply(struct evhttp_request *req, int code, const char *body)
{
    struct evbuffer *b = evbuffer_new();

    evbuffer_add(b, body, strlen(body));
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "application/json");
    evhttp_send_reply(req, code, code == 200 ? "OK" : "Error", b);
    evbuffer_free(b);
}

static void srv_probe_reply(struct evhttp_request *req, int status)
{
    if (status == 200)
        srv_reply(req, 200,
                  "{\"id\":\"c1\",\"object\":\"chat.completion\",\"created\":1,\"model\":\"m1\","
                  "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":"
                  "\"pong\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":1,"
                  "\"completion_tokens\":1,\"total_tokens\":2}}");
    else
        srv_reply(req, status, "{\"error\":{\"type\":\"server_error\",\"message\":\"down\"}}");
}

static void srv_on_request(struct evhttp_request *req, void *arg)
{
    srv_t *s = arg;
    const char *uri = evhttp_request_get_uri(req);
    struct evbuffer *in = evhttp_request_get_input_buffer(req);

    if (strncmp(uri, "/v1/chat/completions", 20) == 0) {
        const char *auth =
            evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
        if (s->probe_count < 16)
            s->probe_at[s->probe_count] = pq_mono_ms();
        s->probe_count++;
        snprintf(s->probe_path, sizeof(s->probe_path), "%s", uri);
        snprintf(s->probe_auth, sizeof(s->probe_auth), "%s", auth ? auth : "");
        if (s->probe_status == PROBE_HOLD && !s->held)
            s->held = req;
        else
            srv_probe_reply(req, s->probe_status ? s->probe_status : 200);
    } else if (strcmp(uri, "/identity/token") == 0) {
        char body[256];
        size_t n = evbuffer_get_length(in);

        if (n >= sizeof(s->iam_body))
            n = sizeof(s->iam_body) - 1;
        evbuffer_copyout(in, s->iam_body, n);
        s->iam_body[n] = '\0';
        s->iam_count++;
        if (s->iam_status == 200) {
            snprintf(body, sizeof(body),
                     "{\"access_token\":\"tok%d\",\"refresh_token\":\"not_supported\","
                     "\"token_type\":\"Bearer\",\"expires_in\":3600,\"scope\":\"ibm openid\"}",
                     s->iam_count);
            srv_reply(req, 200, body);
        } else {
            srv_reply(req, s->iam_status,
                      "{\"errorCode\":\"BXNIM0415E\",\"errorMessage\":\"Provided API key could "
                      "not be found.\"}");
        }
    } else if (strcmp(uri, "/status.json") == 0) {
        char body[128];

        s->status_count++;
        snprintf(body, sizeof(body), "{\"status\":{\"indicator\":\"%s\",\"description\":\"x\"}}",
                 s->indicator);
        srv_reply(req, 200, body);
    } else {
        srv_reply(req, 404, "{}");
    }
}

/* Answers the held probe request. */
static void srv_release(srv_t *s, int status)
{
    assert_non_null(s->held);
    srv_probe_reply(s->held, status);
    s->held = NULL;
}

/* ---- fixture ---- */

typedef struct fx_s fx_t;

typedef struct waiter_s {
    pq_slot_wait_t w;
    fx_t *f;
    int called;
    int order; /* 1-based grant order among callbacks */
    int key;
    pq_err_t err;
    int64_t wake, at;
} waiter_t;

typedef struct twaiter_s {
    pq_token_wait_t w;
    fx_t *f;
    int called;
    char token[64];
    int has_token;
    pq_err_t err;
    /* known-bug test: retry once from the callback on failure */
    int retry;
    struct twaiter_s *retry_w;
} twaiter_t;

struct fx_s {
    struct event_base *base;
    struct event *tick;
    srv_t srv;
    pq_http_t *http;
    pq_metrics_t *metrics;
    pq_conf_t *conf;
    pq_provs_t *ps;
    int ncalls; /* slot callbacks so far */
    int opened, closed;
    char listener_model[64];
    const char *listener_provider;
};

/* Providers:
 *   a    openai, 2 keys, max_concurrency 2, opens on 3 consecutive failures, 50 ms cooldown
 *   r    openai, 1 key, ratio 0.5 over a window of 10 (consecutive failures never open it)
 *   rpm  openai, 1 key, 600 rpm (a burst of 10, then one per 100 ms), no concurrency cap
 *   tpm  openai, 1 key, 6000 tpm (a burst of 100 tokens, 0.1 per ms)
 *   wx   watsonx, 2 keys, IAM at the loopback server
 *   loc  openai without a key
 *   hc   openai, 1 key, opens on the first failure, 50 ms cooldown, half_open "call" */
static const char *CONF_MAIN =
    "{\"providers\":{"
    "\"a\":{\"type\":\"openai\",\"base_url\":\"http://127.0.0.1:%d/v1\","
    "\"api_keys\":[\"ka0\",\"ka1\"],\"timeout_ms\":2000,\"max_concurrency\":2,"
    "\"circuit_failures\":3,\"circuit_ratio\":1.0,\"circuit_window\":20,"
    "\"circuit_cooldown_ms\":50,\"probe_interval_ms\":100},"
    "\"r\":{\"type\":\"openai\",\"base_url\":\"http://127.0.0.1:%d/v1\",\"api_key\":\"kr\","
    "\"circuit_failures\":1000,\"circuit_ratio\":0.5,\"circuit_window\":10,"
    "\"circuit_cooldown_ms\":600000},"
    "\"rpm\":{\"type\":\"openai\",\"base_url\":\"http://127.0.0.1:%d/v1\",\"api_key\":\"kp\","
    "\"rpm\":600,\"max_concurrency\":0},"
    "\"tpm\":{\"type\":\"openai\",\"base_url\":\"http://127.0.0.1:%d/v1\",\"api_key\":\"kt\","
    "\"tpm\":6000},"
    "\"wx\":{\"type\":\"watsonx\",\"base_url\":\"http://127.0.0.1:%d\","
    "\"api_keys\":[\"wk0\",\"wk1\"],\"project_id\":\"p1\","
    "\"iam_url\":\"http://127.0.0.1:%d/identity/token\",\"timeout_ms\":2000},"
    "\"loc\":{\"type\":\"openai\",\"base_url\":\"http://127.0.0.1:%d/v1\"},"
    "\"hc\":{\"type\":\"openai\",\"base_url\":\"http://127.0.0.1:%d/v1\",\"api_key\":\"kh\","
    "\"circuit_failures\":1,\"circuit_cooldown_ms\":50,\"probe_interval_ms\":100,"
    "\"half_open\":\"call\"}},"
    "\"routes\":{"
    "\"ra\":[{\"provider\":\"a\",\"model\":\"m1\"},{\"provider\":\"a\",\"model\":\"m2\"}],"
    "\"rr\":[{\"provider\":\"r\",\"model\":\"m1\"},{\"provider\":\"r\",\"model\":\"m2\"},"
    "{\"provider\":\"r\",\"model\":\"m3\"}],"
    "\"rp\":[{\"provider\":\"rpm\",\"model\":\"m\"}],"
    "\"rt\":[{\"provider\":\"tpm\",\"model\":\"m\"}],"
    "\"rw\":[{\"provider\":\"wx\",\"model\":\"granite\"}],"
    "\"rl\":[{\"provider\":\"loc\",\"model\":\"m\"}],"
    "\"rh\":[{\"provider\":\"hc\",\"model\":\"m\"}]}}";

/* st: openai with a status page, opens on the first failure, 50 ms cooldown. */
static const char *CONF_STATUS =
    "{\"providers\":{"
    "\"st\":{\"type\":\"openai\",\"base_url\":\"http://127.0.0.1:%d/v1\",\"api_key\":\"ks\","
    "\"status_url\":\"http://127.0.0.1:%d/status.json\",\"timeout_ms\":2000,"
    "\"circuit_failures\":1,\"circuit_cooldown_ms\":50,\"probe_interval_ms\":100}},"
    "\"routes\":{\"rs\":[{\"provider\":\"st\",\"model\":\"m\"}]}}";

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
}

static void on_circuit_change(void *opaque, const pq_provider_conf_t *p, const char *model,
                              int available)
{
    fx_t *f = opaque;

    if (available)
        f->closed++;
    else
        f->opened++;
    snprintf(f->listener_model, sizeof(f->listener_model), "%s", model);
    f->listener_provider = p->name;
}

static fx_t *fx_new(const char *tmpl)
{
    fx_t *f = calloc(1, sizeof(*f));
    struct evhttp_bound_socket *bs;
    struct sockaddr_in sin;
    socklen_t slen = sizeof(sin);
    struct timeval tv = {0, 5000};
    char json[4096], err[512] = "";
    int p;

    assert_non_null(f);
    f->base = event_base_new();
    assert_non_null(f->base);
    /* EVLOOP_ONCE returns at least every 5 ms */
    f->tick = event_new(f->base, -1, EV_PERSIST, on_tick, NULL);
    assert_non_null(f->tick);
    event_add(f->tick, &tv);

    f->srv.http = evhttp_new(f->base);
    assert_non_null(f->srv.http);
    bs = evhttp_bind_socket_with_handle(f->srv.http, "127.0.0.1", 0);
    assert_non_null(bs);
    assert_int_equal(getsockname(evhttp_bound_socket_get_fd(bs), (struct sockaddr *)&sin, &slen),
                     0);
    f->srv.port = ntohs(sin.sin_port);
    f->srv.probe_status = 200;
    f->srv.iam_status = 200;
    snprintf(f->srv.indicator, sizeof(f->srv.indicator), "none");
    evhttp_set_gencb(f->srv.http, srv_on_request, &f->srv);

    p = f->srv.port;
    snprintf(json, sizeof(json), tmpl, p, p, p, p, p, p, p, p);
    f->conf = pq_conf_load_str(json, strlen(json), err, sizeof(err));
    if (!f->conf)
        print_error("config: %s\n", err);
    assert_non_null(f->conf);

    f->http = pq_http_new(f->base, 0, err, sizeof(err));
    assert_non_null(f->http);
    f->metrics = pq_metrics_new();
    assert_non_null(f->metrics);
    f->ps = pq_provs_new(f->base, f->conf, f->http, f->metrics, err, sizeof(err));
    assert_non_null(f->ps);
    pq_provs_set_listener(f->ps, on_circuit_change, f);
    return f;
}

static int setup_main(void **state)
{
    *state = fx_new(CONF_MAIN);
    return 0;
}

static int setup_status(void **state)
{
    *state = fx_new(CONF_STATUS);
    return 0;
}

static int teardown(void **state)
{
    fx_t *f = *state;

    pq_provs_destroy(f->ps);
    pq_http_destroy(f->http);
    pq_metrics_destroy(f->metrics);
    pq_conf_destroy(f->conf);
    evhttp_free(f->srv.http);
    event_free(f->tick);
    event_base_free(f->base);
    free(f);
    return 0;
}

/* Runs the loop until cond holds or ms pass. */
#define RUN_UNTIL(f, cond, ms)                                                                     \
    do {                                                                                           \
        int64_t dl_ = pq_mono_ms() + (ms);                                                         \
        while (!(cond) && pq_mono_ms() < dl_)                                                      \
            event_base_loop((f)->base, EVLOOP_ONCE);                                               \
    } while (0)

static void run_for(fx_t *f, int64_t ms)
{
    int64_t dl = pq_mono_ms() + ms;

    while (pq_mono_ms() < dl)
        event_base_loop(f->base, EVLOOP_ONCE);
}

static pq_prov_t *prov(fx_t *f, const char *name)
{
    const pq_provider_conf_t *p = pq_conf_provider(f->conf, name);
    pq_prov_t *pv;

    assert_non_null(p);
    pv = pq_provs_get(f->ps, p);
    assert_non_null(pv);
    assert_ptr_equal(pq_prov_conf(pv), p);
    return pv;
}

static const pq_target_t *target(fx_t *f, const char *route, size_t i)
{
    const pq_route_t *r = pq_conf_route(f->conf, route);

    assert_non_null(r);
    assert_true(i < r->ntargets);
    return &r->targets[i];
}

static void on_slot(void *opaque, int key, pq_err_t err, int64_t wake_ms)
{
    waiter_t *w = opaque;

    assert_int_equal(w->w.queued, 0);
    w->called++;
    w->order = ++w->f->ncalls;
    w->key = key;
    w->err = err;
    w->wake = wake_ms;
    w->at = pq_mono_ms();
}

static void waiter_init(waiter_t *w, fx_t *f, double cost, int priority)
{
    memset(w, 0, sizeof(*w));
    w->f = f;
    w->key = -100;
    w->w.cost = cost;
    w->w.priority = priority;
    w->w.cb = on_slot;
    w->w.opaque = w;
}

/* Acquires a slot that must be granted now; returns the key. */
static int acquire_now(pq_prov_t *pv, fx_t *f, double cost)
{
    waiter_t w;
    int key = -100;
    pq_err_t err = PQ_OK;
    int64_t wake = 0;

    waiter_init(&w, f, cost, 0);
    assert_int_equal(pq_prov_acquire(pv, &w.w, &key, &err, &wake), 0);
    assert_true(key >= 0);
    assert_int_equal(w.w.queued, 0);
    return key;
}

/* Acquires a slot that must be queued. */
static void acquire_queued(pq_prov_t *pv, waiter_t *w)
{
    int key = -100;
    pq_err_t err = PQ_OK;
    int64_t wake = 0;

    assert_int_equal(pq_prov_acquire(pv, &w->w, &key, &err, &wake), 1);
    assert_int_equal(w->w.queued, 1);
    assert_int_equal(w->called, 0);
}

static void on_token(void *opaque, const char *token, pq_err_t err)
{
    twaiter_t *w = opaque;

    assert_int_equal(w->w.queued, 0);
    w->called++;
    w->err = err;
    w->has_token = token != NULL;
    snprintf(w->token, sizeof(w->token), "%s", token ? token : "");
    if (!token && w->retry && w->retry_w) {
        /* a caller that asks again right away from its callback */
        const char *t = NULL;
        pq_err_t e = PQ_OK;
        twaiter_t *r = w->retry_w;
        int rc;

        w->retry = 0;
        rc = pq_prov_token(prov(w->f, "wx"), r->w.key, &r->w, &t, &e);
        assert_int_equal(rc, 1);
    }
}

static void twaiter_init(twaiter_t *w, fx_t *f, int key)
{
    memset(w, 0, sizeof(*w));
    w->f = f;
    w->w.key = key;
    w->w.cb = on_token;
    w->w.opaque = w;
}

/* pq_prov_token that must queue (the exchange is in flight or starts now). */
static void token_queued(pq_prov_t *pv, twaiter_t *w, int key)
{
    const char *tok = NULL;
    pq_err_t err = PQ_OK;

    twaiter_init(w, w->f, key);
    assert_int_equal(pq_prov_token(pv, key, &w->w, &tok, &err), 1);
    assert_int_equal(w->w.queued, 1);
}

static json_t *health_entry(json_t *health, const char *provider, const char *model)
{
    size_t i;
    json_t *e;

    json_array_foreach(health, i, e)
    {
        if (strcmp(json_string_value(json_object_get(e, "provider")), provider) == 0 &&
            strcmp(json_string_value(json_object_get(e, "model")), model) == 0)
            return e;
    }
    return NULL;
}

/* 1 when the health of (provider, model) shows the status page indicator want. */
static int status_is(fx_t *f, const char *provider, const char *model, const char *want)
{
    json_t *h = pq_provs_health(f->ps);
    const char *s =
        json_string_value(json_object_get(health_entry(h, provider, model), "status_page"));
    int ok = s && strcmp(s, want) == 0;

    json_decref(h);
    return ok;
}

static void open_by_failures(pq_circuit_t *c, int n)
{
    for (int i = 0; i < n; i++)
        pq_circuit_record(c, 1, 0);
    assert_string_equal(pq_circuit_state(c), "open");
}

/* ---- keys ---- */

static void test_key_rotation(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "a"), *loc = prov(f, "loc");

    assert_string_equal(pq_prov_key(pv, 0), "ka0");
    assert_string_equal(pq_prov_key(pv, 1), "ka1");
    assert_null(pq_prov_key(pv, 2));
    assert_null(pq_prov_key(pv, -1));
    assert_null(pq_provs_get(f->ps, NULL));

    /* round robin: 0, 1, 0, 1 */
    for (int i = 0; i < 4; i++) {
        int key = acquire_now(pv, f, 1);
        assert_int_equal(key, i % 2);
        pq_prov_release(pv, key, 1, -1, 0);
    }

    /* a provider without keys has the one virtual key 0 */
    assert_null(pq_prov_key(loc, 0));
    for (int i = 0; i < 3; i++) {
        assert_int_equal(acquire_now(loc, f, 1), 0);
        pq_prov_release(loc, 0, 1, -1, 0);
    }
}

static void test_key_rest(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "a");
    waiter_t w;
    int key;
    pq_err_t err;
    int64_t wake, now;

    /* key 0 rests (429): acquire picks key 1, twice in a row */
    pq_prov_key_rest(pv, 0, 300, 0);
    for (int i = 0; i < 2; i++) {
        key = acquire_now(pv, f, 1);
        assert_int_equal(key, 1);
        pq_prov_release(pv, key, 1, -1, 0);
    }
    /* a rest of 0 ms (or less) changes nothing */
    pq_prov_key_rest(pv, 1, 0, 0);
    pq_prov_key_rest(pv, 1, -5, 1);
    key = acquire_now(pv, f, 1);
    assert_int_equal(key, 1);
    pq_prov_release(pv, key, 1, -1, 0);

    /* both rest: -1, rate limited, wake = when the first one (key 1, 100 ms) wakes */
    now = pq_mono_ms();
    pq_prov_key_rest(pv, 1, 100, 0);
    waiter_init(&w, f, 1, 0);
    key = -100;
    err = PQ_OK;
    wake = 0;
    assert_int_equal(pq_prov_acquire(pv, &w.w, &key, &err, &wake), -1);
    assert_int_equal(err, PQ_ERR_RATE_LIMITED);
    assert_true(wake >= now + 100 && wake <= now + 150);
    assert_int_equal(w.w.queued, 0);
    assert_int_equal(w.called, 0);

    /* a shorter 429 rest does not shorten a longer one */
    pq_prov_key_rest(pv, 0, 10, 0);
    run_for(f, 130);
    key = acquire_now(pv, f, 1);
    assert_int_equal(key, 1); /* key 0 still rests (300 ms) */
    pq_prov_release(pv, key, 1, -1, 0);
    run_for(f, 200);
    key = acquire_now(pv, f, 1);
    pq_prov_release(pv, key, 1, -1, 0);
    assert_int_equal(acquire_now(pv, f, 1), 1 - key); /* both usable again: rotation */
    pq_prov_release(pv, 1 - key, 1, -1, 0);

    /* refused keys (401): PQ_ERR_AUTH and no wake time, even after a shorter rate rest; each
     * refusal is counted per key index (an operator rotates the key) */
    pq_prov_key_rest(pv, 0, 100, 1);
    pq_prov_key_rest(pv, 1, 100, 1);
    assert_int_equal(
        pq_counter_get(pq_metrics_counter(f->metrics, "promptq_worker_key_refused_total",
                                          "provider keys refused (401/403) by provider and key "
                                          "index: rotate the key",
                                          "provider=\"a\",key=\"1\"")),
        1);
    err = PQ_OK;
    wake = -1;
    assert_int_equal(pq_prov_acquire(pv, &w.w, &key, &err, &wake), -1);
    assert_int_equal(err, PQ_ERR_AUTH);
    assert_int_equal(wake, 0);
    /* one refused, one rate limited: the rate limit decides (it ends) */
    pq_prov_key_rest(pv, 1, 200, 0);
    assert_int_equal(pq_prov_acquire(pv, &w.w, &key, &err, &wake), -1);
    assert_int_equal(err, PQ_ERR_RATE_LIMITED);
    assert_true(wake > pq_mono_ms());
    run_for(f, 220);

    /* excluded keys: a waiter that key 0 refused only gets key 1; with both excluded, AUTH */
    w.w.excluded = 1;
    for (int i = 0; i < 3; i++) {
        assert_int_equal(pq_prov_acquire(pv, &w.w, &key, &err, &wake), 0);
        assert_int_equal(key, 1);
        pq_prov_release(pv, key, 1, -1, 0);
    }
    w.w.excluded = 3;
    err = PQ_OK;
    assert_int_equal(pq_prov_acquire(pv, &w.w, &key, &err, &wake), -1);
    assert_int_equal(err, PQ_ERR_AUTH);
    /* excluded key 1 and key 0 rate limited: RATE_LIMITED with key 0's wake */
    w.w.excluded = 2;
    now = pq_mono_ms();
    pq_prov_key_rest(pv, 0, 80, 0);
    assert_int_equal(pq_prov_acquire(pv, &w.w, &key, &err, &wake), -1);
    assert_int_equal(err, PQ_ERR_RATE_LIMITED);
    assert_true(wake >= now + 80 && wake <= now + 130);
}

/* A 429 rests that key for that model only: the same key serves the route's other model, the
 * other key serves the limited model; a Retry-After is capped at max_rest_ms; without one the
 * rest backs off (1 s doubling, upper half jittered) and a success starts it over; a target
 * whose keys all rest for its model is not available (its route is not up for it). */
static void test_rest_per_model(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "a");
    const pq_target_t *t1 = target(f, "ra", 0), *t2 = target(f, "ra", 1);
    pq_circuit_t *c1 = pq_prov_circuit(pv, t1), *c2 = pq_prov_circuit(pv, t2);
    waiter_t w1, w2;
    int key;
    pq_err_t err;
    int64_t wake, now, ms;

    waiter_init(&w1, f, 1, 0);
    waiter_init(&w2, f, 1, 0);
    w1.w.circ = c1;
    w2.w.circ = c2;
    /* key 0 rests for m1: m1 gets key 1 every time, m2 still gets key 0 in its turn */
    assert_int_equal(pq_circuit_rate_limited(c1, 0, 300), 300);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(pq_prov_acquire(pv, &w1.w, &key, &err, &wake), 0);
        assert_int_equal(key, 1);
        pq_prov_release(pv, key, 1, -1, 0);
    }
    assert_int_equal(pq_prov_acquire(pv, &w2.w, &key, &err, &wake), 0);
    assert_int_equal(key, 0);
    pq_prov_release(pv, key, 1, -1, 0);
    /* a call without a circuit (a probe, say) is not held by model rests */
    assert_int_equal(acquire_now(pv, f, 1) >= 0, 1);
    pq_prov_release(pv, 0, 1, -1, 0);

    /* both keys rest for m1: rate limited with the first wake; m2 unaffected */
    now = pq_mono_ms();
    assert_int_equal(pq_circuit_rate_limited(c1, 1, 100), 100);
    err = PQ_OK;
    assert_int_equal(pq_prov_acquire(pv, &w1.w, &key, &err, &wake), -1);
    assert_int_equal(err, PQ_ERR_RATE_LIMITED);
    assert_true(wake >= now + 100 && wake <= now + 150);
    assert_int_equal(pq_circuit_keys_ready(c1, &wake), 0);
    assert_int_equal(pq_circuit_keys_ready(c2, NULL), 1);
    assert_int_equal(pq_provs_target_available(f->ps, t1), 0);
    assert_int_equal(pq_provs_target_available(f->ps, t2), 1);
    assert_int_equal(pq_prov_acquire(pv, &w2.w, &key, &err, &wake), 0);
    pq_prov_release(pv, key, 1, -1, 0);
    run_for(f, 130);
    assert_int_equal(pq_provs_target_available(f->ps, t1), 1); /* key 1 woke */
    run_for(f, 200);

    /* Retry-After far in the future (115 days): capped at max_rest_ms (default 60 s) */
    assert_int_equal(pq_circuit_rate_limited(c2, 0, 9999999000LL), 60000);
    /* without Retry-After: [0.5, 1] s, then [1, 2] s, then [2, 4] s; a success starts over */
    ms = pq_circuit_rate_limited(c2, 1, -1);
    assert_true(ms >= 500 && ms <= 1000);
    ms = pq_circuit_rate_limited(c2, 1, -1);
    assert_true(ms >= 1000 && ms <= 2000);
    ms = pq_circuit_rate_limited(c2, 1, -1);
    assert_true(ms >= 2000 && ms <= 4000);
    pq_circuit_key_ok(c2, 1);
    ms = pq_circuit_rate_limited(c2, 1, -1);
    assert_true(ms >= 500 && ms <= 1000);
    /* both keys rest for m2 now, m1 is free again */
    assert_int_equal(pq_provs_target_available(f->ps, t2), 0);
    assert_int_equal(pq_provs_target_available(f->ps, t1), 1);
    /* a key-wide rest (401 or a quota for the whole key) holds every model */
    pq_prov_key_rest(pv, 0, 200, 1);
    pq_prov_key_rest(pv, 1, 200, 1);
    assert_int_equal(pq_provs_target_available(f->ps, t1), 0);
}

/* A queued waiter is told when every key rests by the time its turn comes. */
static void test_key_rest_queued(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "a");
    waiter_t w;
    int k0, k1;
    int64_t now;

    k0 = acquire_now(pv, f, 1);
    k1 = acquire_now(pv, f, 1);
    waiter_init(&w, f, 1, 0);
    acquire_queued(pv, &w);
    now = pq_mono_ms();
    pq_prov_key_rest(pv, 0, 300, 0);
    pq_prov_key_rest(pv, 1, 200, 0);
    pq_prov_release(pv, k0, 1, -1, 0);
    RUN_UNTIL(f, w.called, 1000);
    assert_int_equal(w.called, 1);
    assert_int_equal(w.key, -1);
    assert_int_equal(w.err, PQ_ERR_RATE_LIMITED);
    assert_true(w.wake >= now + 200 && w.wake <= now + 260);
    pq_prov_release(pv, k1, 1, -1, 0);
    run_for(f, 20);
    assert_int_equal(w.called, 1);
}

/* ---- rate-limit header hints (pure) ---- */

static int64_t hints_of(const char *const *lines, int64_t now_ms)
{
    pq_rate_hints_t h;

    pq_rate_hints_init(&h);
    for (; *lines; lines++)
        pq_rate_hints_header(&h, *lines, strlen(*lines), now_ms);
    return pq_rate_hints_wait_ms(&h);
}

static void test_rate_hints(void **state)
{
    /* 2026-12-04T00:00:00Z */
    const int64_t now = 1796342400000LL;
    int64_t ms;
    (void)state;

    {
        const char *l[] = {"Content-Type: application/json\r\n", NULL};
        assert_int_equal(hints_of(l, now), -1);
    }
    {
        const char *l[] = {"Retry-After: 2\r\n", NULL};
        assert_int_equal(hints_of(l, now), 2000);
    }
    {
        /* retry-after-ms wins, in either order */
        const char *a[] = {"retry-after-ms: 150\r\n", "Retry-After: 2\r\n", NULL};
        const char *b[] = {"Retry-After: 2\r\n", "retry-after-ms: 150\r\n", NULL};
        assert_int_equal(hints_of(a, now), 150);
        assert_int_equal(hints_of(b, now), 150);
    }
    {
        const char *l[] = {"Retry-After: Fri, 04 Dec 2026 00:00:30 GMT\r\n", NULL};
        assert_int_equal(hints_of(l, now), 30000);
    }
    {
        /* huge, negative, inf, nan, junk: clamped or ignored, never undefined */
        const char *big[] = {"Retry-After: 9999999\r\n", NULL};
        const char *ms15[] = {"retry-after-ms: 9e15\r\n", NULL};
        const char *inf[] = {"retry-after-ms: inf\r\n", NULL};
        const char *nan[] = {"retry-after-ms: nan\r\n", NULL};
        const char *neg[] = {"Retry-After: -5\r\n", NULL};
        const char *junk[] = {"Retry-After: soon\r\n", NULL};
        const char *far[] = {"Retry-After: Sat, 01 Jan 9999 00:00:00 GMT\r\n", NULL};
        assert_int_equal(hints_of(big, now), 9999999000LL);
        assert_int_equal(hints_of(ms15, now), PQ_RATE_HINT_MAX_MS);
        assert_int_equal(hints_of(inf, now), -1);
        assert_int_equal(hints_of(nan, now), -1);
        assert_int_equal(hints_of(neg, now), -1);
        assert_int_equal(hints_of(junk, now), -1);
        ms = hints_of(far, now);
        assert_true(ms == -1 || (ms > 0 && ms <= PQ_RATE_HINT_MAX_MS));
    }
    {
        /* OpenAI: the exhausted limit's reset */
        const char *tok[] = {
            "x-ratelimit-remaining-requests: 59\r\n", "x-ratelimit-remaining-tokens: 0\r\n",
            "x-ratelimit-reset-requests: 6m0s\r\n", "x-ratelimit-reset-tokens: 20ms\r\n", NULL};
        const char *req[] = {
            "x-ratelimit-remaining-requests: 0\r\n", "x-ratelimit-remaining-tokens: 1000\r\n",
            "x-ratelimit-reset-requests: 1h2m3.5s\r\n", "x-ratelimit-reset-tokens: 20ms\r\n", NULL};
        const char *unknown[] = {"x-ratelimit-reset-requests: 1s\r\n",
                                 "x-ratelimit-reset-tokens: 2.5s\r\n", NULL};
        assert_int_equal(hints_of(tok, now), 20);
        assert_int_equal(hints_of(req, now), 3723500);
        assert_int_equal(hints_of(unknown, now), 2500);
    }
    {
        /* Anthropic: RFC 3339 resets */
        const char *l[] = {"anthropic-ratelimit-requests-remaining: 0\r\n",
                           "anthropic-ratelimit-requests-reset: 2026-12-04T00:00:05Z\r\n",
                           "anthropic-ratelimit-tokens-reset: 2026-12-04T00:00:01.5+00:00\r\n",
                           NULL};
        const char *bad[] = {"anthropic-ratelimit-tokens-reset: 2026-12-04 00:00:05\r\n", NULL};
        assert_int_equal(hints_of(l, now), 5000);
        assert_int_equal(hints_of(bad, now), -1);
    }
    /* durations */
    assert_int_equal(pq_rate_hints_duration("6m0s", 4, &ms), 0);
    assert_int_equal(ms, 360000);
    assert_int_equal(pq_rate_hints_duration("0.5s", 4, &ms), 0);
    assert_int_equal(ms, 500);
    assert_int_equal(pq_rate_hints_duration("", 0, &ms), -1);
    assert_int_equal(pq_rate_hints_duration("5", 1, &ms), -1);
    assert_int_equal(pq_rate_hints_duration("5x", 2, &ms), -1);
    assert_int_equal(pq_rate_hints_duration("s", 1, &ms), -1);
    assert_int_equal(pq_rate_hints_duration("99999999999999999h", 18, &ms), -1);
}

/* ---- slots ---- */

static void test_max_concurrency(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "a");
    waiter_t w3, w4, w5, w6;
    int k1, k2;

    k1 = acquire_now(pv, f, 1);
    k2 = acquire_now(pv, f, 1);
    waiter_init(&w3, f, 1, 0);
    waiter_init(&w4, f, 1, 0);
    waiter_init(&w5, f, 1, 1);
    waiter_init(&w6, f, 1, 0);
    acquire_queued(pv, &w3);
    acquire_queued(pv, &w4);
    acquire_queued(pv, &w5); /* priority: ahead of w3 and w4 */
    acquire_queued(pv, &w6);
    run_for(f, 30);
    assert_int_equal(f->ncalls, 0);

    /* w4 leaves the queue: never called; cancelling again is a no-op */
    pq_prov_cancel(pv, &w4.w);
    assert_int_equal(w4.w.queued, 0);
    pq_prov_cancel(pv, &w4.w);

    pq_prov_release(pv, k1, 1, -1, 0);
    RUN_UNTIL(f, f->ncalls >= 1, 1000);
    run_for(f, 20);
    assert_int_equal(f->ncalls, 1);
    assert_int_equal(w5.called, 1);
    assert_int_equal(w5.err, PQ_OK);
    assert_true(w5.key >= 0);

    pq_prov_release(pv, k2, 1, -1, 0);
    RUN_UNTIL(f, f->ncalls >= 2, 1000);
    run_for(f, 20);
    assert_int_equal(f->ncalls, 2);
    assert_int_equal(w3.called, 1);
    assert_int_equal(w3.order, 2);
    assert_int_equal(w3.err, PQ_OK);

    pq_prov_release(pv, w5.key, 1, -1, 0);
    RUN_UNTIL(f, w6.called, 1000);
    assert_int_equal(w6.called, 1);
    assert_int_equal(w6.order, 3);
    assert_int_equal(w4.called, 0);
    pq_prov_release(pv, w3.key, 1, -1, 0);
    pq_prov_release(pv, w6.key, 1, -1, 0);

    /* the slots are all free again: two immediate grants */
    k1 = acquire_now(pv, f, 1);
    k2 = acquire_now(pv, f, 1);
    pq_prov_release(pv, k1, 1, -1, 0);
    pq_prov_release(pv, k2, 1, -1, 0);
    assert_int_equal(w4.called, 0);
}

/* ---- rate buckets ---- */

static void test_rpm(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "rpm");
    waiter_t w11, w12, w13;
    int64_t t0, t1;

    /* 600 rpm: a burst of 10 ... */
    for (int i = 0; i < 10; i++) {
        assert_int_equal(acquire_now(pv, f, 1), 0);
        pq_prov_release(pv, 0, 1, -1, 0);
    }
    /* ... then the 11th and 12th wait for the bucket, one per 100 ms */
    t0 = pq_mono_ms();
    waiter_init(&w11, f, 1, 0);
    waiter_init(&w12, f, 1, 0);
    acquire_queued(pv, &w11);
    acquire_queued(pv, &w12);
    RUN_UNTIL(f, w11.called, 2000);
    assert_int_equal(w11.called, 1);
    assert_int_equal(w11.key, 0);
    assert_int_equal(w11.err, PQ_OK);
    assert_true(w11.at - t0 >= 60);
    assert_true(w11.at - t0 <= 600);
    assert_int_equal(w12.called, 0);
    RUN_UNTIL(f, w12.called, 2000);
    assert_int_equal(w12.called, 1);
    assert_int_equal(w12.err, PQ_OK);
    assert_true(w12.at - w11.at >= 60);
    pq_prov_release(pv, 0, 1, -1, 0);

    /* a refunded call (never made) gives its request back: a waiter gets it at once */
    waiter_init(&w13, f, 1, 0);
    acquire_queued(pv, &w13);
    t1 = pq_mono_ms();
    pq_prov_release(pv, 0, 1, -1, 1);
    RUN_UNTIL(f, w13.called, 2000);
    assert_int_equal(w13.called, 1);
    assert_true(w13.at - t1 < 50);
    pq_prov_release(pv, 0, 1, -1, 0);
}

static void test_tpm(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "tpm");
    waiter_t w2, w3;
    int64_t t1;

    /* 6000 tpm = 100 tokens of burst: a 1000-token call passes (debt) ... */
    assert_int_equal(acquire_now(pv, f, 1000), 0);
    /* ... and the next one waits (9 s to pay the debt back) */
    waiter_init(&w2, f, 10, 0);
    acquire_queued(pv, &w2);
    run_for(f, 50);
    assert_int_equal(w2.called, 0);
    /* the provider reports 50 tokens used: the estimate is corrected, w2 goes */
    t1 = pq_mono_ms();
    pq_prov_release(pv, 0, 1000, 50, 0);
    RUN_UNTIL(f, w2.called, 2000);
    assert_int_equal(w2.called, 1);
    assert_int_equal(w2.err, PQ_OK);
    assert_true(w2.at - t1 < 1000); /* else 9 s */
    pq_prov_release(pv, 0, 10, 10, 0);

    /* debt again; unknown usage (-1) keeps the estimate, a refund gives it back */
    assert_int_equal(acquire_now(pv, f, 1000), 0);
    pq_prov_release(pv, 0, 1000, -1, 0);
    waiter_init(&w3, f, 10, 0);
    acquire_queued(pv, &w3);
    run_for(f, 50);
    assert_int_equal(w3.called, 0);
    assert_int_equal(acquire_now(prov(f, "a"), f, 1000), 0); /* other providers unaffected */
    pq_prov_release(prov(f, "a"), 0, 1000, -1, 0);
    /* a cancelled waiter is never called */
    pq_prov_cancel(pv, &w3.w);
    assert_int_equal(w3.w.queued, 0);
    run_for(f, 10);
    assert_int_equal(w3.called, 0);
}

static void test_tpm_refund(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "tpm");
    waiter_t w;
    int64_t t1;

    assert_int_equal(acquire_now(pv, f, 1000), 0);
    waiter_init(&w, f, 10, 0);
    acquire_queued(pv, &w);
    run_for(f, 30);
    assert_int_equal(w.called, 0);
    t1 = pq_mono_ms();
    pq_prov_release(pv, 0, 1000, -1, 1);
    RUN_UNTIL(f, w.called, 2000);
    assert_int_equal(w.called, 1);
    assert_true(w.at - t1 < 1000); /* else 9 s */
    pq_prov_release(pv, 0, 10, 10, 0);

    /* an underestimate: 10 tokens charged, 2000 reported; the debt makes the next call wait */
    run_for(f, 5);
    assert_int_equal(acquire_now(pv, f, 10), 0);
    pq_prov_release(pv, 0, 10, 2000, 0);
    waiter_init(&w, f, 10, 0);
    acquire_queued(pv, &w);
    run_for(f, 30);
    assert_int_equal(w.called, 0);
    pq_prov_cancel(pv, &w.w);
}

/* ---- circuits ---- */

static void test_circuit_consecutive(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "a");
    const pq_target_t *t1 = target(f, "ra", 0), *t2 = target(f, "ra", 1);
    pq_circuit_t *c1, *c2;
    json_t *h;

    /* a target without a circuit yet is available */
    assert_int_equal(pq_provs_target_available(f->ps, t1), 1);
    c1 = pq_prov_circuit(pv, t1);
    c2 = pq_prov_circuit(pv, t2);
    assert_non_null(c1);
    assert_non_null(c2);
    assert_ptr_not_equal(c1, c2);
    assert_ptr_equal(pq_prov_circuit(pv, t1), c1);
    assert_string_equal(pq_circuit_state(c1), "closed");
    assert_int_equal(pq_circuit_allow(c1), 1);
    assert_int_equal(pq_circuit_available(c1), 1);

    /* F F S F F: a success resets the count (3 needed) */
    pq_circuit_record(c1, 1, 0);
    pq_circuit_record(c1, 1, 0);
    pq_circuit_record(c1, 0, 0);
    pq_circuit_record(c1, 1, 0);
    pq_circuit_record(c1, 1, 0);
    assert_string_equal(pq_circuit_state(c1), "closed");
    assert_int_equal(f->opened, 0);
    assert_int_equal(pq_provs_open_circuits(f->ps), 0);
    /* the third consecutive failure opens it */
    pq_circuit_record(c1, 1, 0);
    assert_string_equal(pq_circuit_state(c1), "open");
    assert_int_equal(f->opened, 1);
    assert_string_equal(f->listener_model, "m1");
    assert_string_equal(f->listener_provider, "a");
    assert_int_equal(pq_circuit_allow(c1), 0);
    assert_int_equal(pq_circuit_available(c1), 0);
    assert_int_equal(pq_provs_target_available(f->ps, t1), 0);
    assert_int_equal(pq_provs_target_available(f->ps, t2), 1);
    assert_int_equal(pq_provs_open_circuits(f->ps), 1);
    /* late results of calls started before it opened change nothing */
    pq_circuit_record(c1, 1, 0);
    pq_circuit_record(c1, 0, 0);
    assert_string_equal(pq_circuit_state(c1), "open");
    assert_int_equal(f->opened, 1);
    assert_string_equal(pq_circuit_state(c2), "closed");

    h = pq_provs_health(f->ps);
    assert_true(json_is_array(h));
    assert_int_equal(json_array_size(h), 2);
    assert_string_equal(json_string_value(json_object_get(health_entry(h, "a", "m1"), "circuit")),
                        "open");
    assert_string_equal(json_string_value(json_object_get(health_entry(h, "a", "m2"), "circuit")),
                        "closed");
    assert_true(json_is_null(json_object_get(health_entry(h, "a", "m1"), "last_probe")));
    assert_true(json_is_null(json_object_get(health_entry(h, "a", "m1"), "status_page")));
    json_decref(h);

    /* attempts counter per (provider, model, outcome) */
    pq_circuit_count(c1, PQ_OK, 12);
    pq_circuit_count(c1, PQ_OK, -1);
    pq_circuit_count(c1, PQ_ERR_SERVER, 3);
    assert_int_equal(pq_counter_get(pq_metrics_counter(
                         f->metrics, "promptq_worker_attempts_total",
                         "provider attempts by provider, model and outcome (skips included)",
                         "provider=\"a\",model=\"m1\",outcome=\"ok\"")),
                     2);
    {
        char labels[128];
        snprintf(labels, sizeof(labels), "provider=\"a\",model=\"m1\",outcome=\"%s\"",
                 pq_err_name(PQ_ERR_SERVER));
        assert_int_equal(
            pq_counter_get(pq_metrics_counter(
                f->metrics, "promptq_worker_attempts_total",
                "provider attempts by provider, model and outcome (skips included)", labels)),
            1);
    }
}

static void test_circuit_ratio(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "r");
    pq_circuit_t *c1 = pq_prov_circuit(pv, target(f, "rr", 0));
    pq_circuit_t *c2 = pq_prov_circuit(pv, target(f, "rr", 1));
    pq_circuit_t *c3 = pq_prov_circuit(pv, target(f, "rr", 2));

    /* S F S F S F S F S: 4 of 9, under the 10 calls the ratio needs */
    for (int i = 0; i < 9; i++)
        pq_circuit_record(c1, i % 2, 0);
    assert_string_equal(pq_circuit_state(c1), "closed");
    /* the 10th call fails: 5 of 10 >= 0.5 */
    pq_circuit_record(c1, 1, 0);
    assert_string_equal(pq_circuit_state(c1), "open");
    assert_int_equal(f->opened, 1);

    /* the window slides: 10 successes, then failures; the old successes leave the window */
    for (int i = 0; i < 10; i++)
        pq_circuit_record(c2, 0, 0);
    for (int i = 0; i < 4; i++)
        pq_circuit_record(c2, 1, 0);
    assert_string_equal(pq_circuit_state(c2), "closed"); /* 4 of the last 10 */
    pq_circuit_record(c2, 1, 0);
    assert_string_equal(pq_circuit_state(c2), "open"); /* 5 of the last 10 (5 of 15 overall) */
    assert_int_equal(f->opened, 2);
    assert_int_equal(pq_provs_open_circuits(f->ps), 2);

    /* old failures leave the window too: F x4, S x10 (the 4 F are gone), F x4 is 4 of 10 */
    for (int i = 0; i < 4; i++)
        pq_circuit_record(c3, 1, 0);
    for (int i = 0; i < 10; i++)
        pq_circuit_record(c3, 0, 0);
    for (int i = 0; i < 4; i++)
        pq_circuit_record(c3, 1, 0);
    assert_string_equal(pq_circuit_state(c3), "closed");
    pq_circuit_record(c3, 1, 0);
    assert_string_equal(pq_circuit_state(c3), "open");
    assert_int_equal(pq_provs_open_circuits(f->ps), 3);
}

/* half_open "call": no probe of the worker's own; the next job's call is the probe. */
static void test_half_open_by_call(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "hc");
    pq_circuit_t *c = pq_prov_circuit(pv, target(f, "rh", 0));
    int probes = f->srv.probe_count;

    pq_circuit_record(c, 1, 0);
    assert_string_equal(pq_circuit_state(c), "open");
    assert_int_equal(pq_circuit_allow(c), 0);
    run_for(f, 300); /* past the cooldown and several probe intervals */
    assert_string_equal(pq_circuit_state(c), "half_open");
    assert_int_equal(f->srv.probe_count, probes); /* nothing probed it */
    assert_int_equal(pq_circuit_available(c), 1);
    assert_int_equal(pq_circuit_allow(c), 2); /* this call is the probe */
    assert_int_equal(pq_circuit_allow(c), 0); /* one at a time */
    pq_circuit_record(c, 0, 1);
    assert_string_equal(pq_circuit_state(c), "closed");
    assert_int_equal(f->closed, 1);
}

static void test_half_open_probe_success(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "a");
    const pq_target_t *t = target(f, "ra", 0);
    pq_circuit_t *c = pq_prov_circuit(pv, t);
    json_t *h, *lp;
    int64_t opened_at;

    f->srv.probe_status = PROBE_HOLD;
    open_by_failures(c, 3);
    opened_at = pq_mono_ms();
    assert_int_equal(f->srv.probe_count, 0);

    /* after the 50 ms cooldown: half-open, ONE probe in flight, job calls are kept out */
    RUN_UNTIL(f, f->srv.probe_count >= 1, 2000);
    assert_int_equal(f->srv.probe_count, 1);
    assert_true(f->srv.probe_at[0] - opened_at >= 40);
    assert_string_equal(pq_circuit_state(c), "half_open");
    assert_int_equal(pq_circuit_allow(c), 0);
    assert_int_equal(pq_circuit_available(c), 0);
    assert_int_equal(pq_provs_target_available(f->ps, t), 0);
    assert_int_equal(pq_provs_open_circuits(f->ps), 1);
    assert_string_equal(f->srv.probe_path, "/v1/chat/completions");
    assert_true(strcmp(f->srv.probe_auth, "Bearer ka0") == 0 ||
                strcmp(f->srv.probe_auth, "Bearer ka1") == 0);
    /* a job's failure while half-open is not the probe's: ignored */
    pq_circuit_record(c, 1, 0);
    /* the job-side role give-back does not free the configured probe's role */
    pq_circuit_probe_abort(c);
    assert_int_equal(pq_circuit_allow(c), 0);
    run_for(f, 200);
    assert_int_equal(f->srv.probe_count, 1);
    assert_string_equal(pq_circuit_state(c), "half_open");

    /* the probe succeeds: closed, listener told, calls allowed */
    srv_release(&f->srv, 200);
    RUN_UNTIL(f, strcmp(pq_circuit_state(c), "closed") == 0, 2000);
    assert_string_equal(pq_circuit_state(c), "closed");
    assert_int_equal(f->closed, 1);
    assert_int_equal(f->opened, 1);
    assert_int_equal(pq_circuit_allow(c), 1);
    assert_int_equal(pq_provs_open_circuits(f->ps), 0);

    h = pq_provs_health(f->ps);
    lp = json_object_get(health_entry(h, "a", "m1"), "last_probe");
    assert_true(json_is_object(lp));
    assert_true(json_is_true(json_object_get(lp, "ok")));
    assert_true(json_integer_value(json_object_get(lp, "at")) > 1600000000000LL);
    assert_non_null(strstr(json_string_value(json_object_get(lp, "detail")), "ok (HTTP 200"));
    json_decref(h);
    assert_int_equal(pq_counter_get(pq_metrics_counter(
                         f->metrics, "promptq_worker_attempts_total",
                         "provider attempts by provider, model and outcome (skips included)",
                         "provider=\"a\",model=\"m1\",outcome=\"ok\"")),
                     1);

    /* closed again: no more probes, and the counts start over (3 failures to re-open) */
    run_for(f, 150);
    assert_int_equal(f->srv.probe_count, 1);
    pq_circuit_record(c, 1, 0);
    pq_circuit_record(c, 1, 0);
    assert_string_equal(pq_circuit_state(c), "closed");
    pq_circuit_record(c, 1, 0);
    assert_string_equal(pq_circuit_state(c), "open");
    assert_int_equal(f->opened, 2);
}

static void test_half_open_probe_failure(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "a");
    pq_circuit_t *c = pq_prov_circuit(pv, target(f, "ra", 1));
    json_t *h, *lp;
    int n;

    f->srv.probe_status = 500;
    open_by_failures(c, 3);
    assert_int_equal(f->opened, 1);

    /* the first probe fails: open again (not half-open), the failure is in the health */
    RUN_UNTIL(f, f->srv.probe_count >= 1 && strcmp(pq_circuit_state(c), "open") == 0, 2000);
    assert_true(f->srv.probe_count >= 1);
    assert_string_equal(pq_circuit_state(c), "open");
    h = pq_provs_health(f->ps);
    lp = json_object_get(health_entry(h, "a", "m2"), "last_probe");
    assert_true(json_is_object(lp));
    assert_true(json_is_false(json_object_get(lp, "ok")));
    assert_non_null(strstr(json_string_value(json_object_get(lp, "detail")), "HTTP 500"));
    json_decref(h);

    /* re-probed every min(cooldown 50, probe_interval 100) ms, one at a time */
    RUN_UNTIL(f, f->srv.probe_count >= 3, 2000);
    assert_true(f->srv.probe_count >= 3);
    assert_true(f->srv.probe_at[1] - f->srv.probe_at[0] >= 40);
    assert_true(f->srv.probe_at[2] - f->srv.probe_at[1] >= 40);
    n = f->srv.probe_count;
    run_for(f, 300);
    assert_true(f->srv.probe_count - n <= 8);
    assert_true(f->srv.probe_count - n >= 2);
    assert_int_equal(f->opened, 1); /* "stays open" is no new state change */
    assert_int_equal(f->closed, 0);
    assert_int_equal(pq_circuit_allow(c), 0);

    /* the provider recovers: the next probe closes it */
    f->srv.probe_status = 200;
    RUN_UNTIL(f, strcmp(pq_circuit_state(c), "closed") == 0, 2000);
    assert_string_equal(pq_circuit_state(c), "closed");
    assert_int_equal(f->closed, 1);
    assert_string_equal(f->listener_model, "m2");
    n = f->srv.probe_count;
    run_for(f, 150);
    assert_int_equal(f->srv.probe_count, n);
}

/* A probe that never answers ends with the provider timeout (2 s) and counts as a failure; the
 * next probe (answered: the server holds only the first) closes the circuit. */
static void test_probe_unanswered(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "a");
    pq_circuit_t *c = pq_prov_circuit(pv, target(f, "ra", 0));

    f->srv.probe_status = PROBE_HOLD;
    open_by_failures(c, 3);
    RUN_UNTIL(f, f->srv.probe_count >= 1, 2000);
    assert_int_equal(f->srv.probe_count, 1);
    assert_string_equal(pq_circuit_state(c), "half_open");
    RUN_UNTIL(f, f->srv.probe_count >= 2, 4000);
    assert_int_equal(f->srv.probe_count, 2);
    assert_true(f->srv.probe_at[1] - f->srv.probe_at[0] >= 1900);
    RUN_UNTIL(f, strcmp(pq_circuit_state(c), "closed") == 0, 2000);
    assert_string_equal(pq_circuit_state(c), "closed");
    assert_int_equal(f->opened, 1);
    assert_int_equal(f->closed, 1);
}

/* ---- status page ---- */

static void test_status_page(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "st");
    const pq_target_t *t = target(f, "rs", 0);
    pq_circuit_t *c = pq_prov_circuit(pv, t);
    json_t *h, *lp;

    /* polled at start; "major" shows in the health */
    snprintf(f->srv.indicator, sizeof(f->srv.indicator), "major");
    RUN_UNTIL(f, status_is(f, "st", "m", "major"), 2000);
    assert_true(status_is(f, "st", "m", "major"));
    assert_int_equal(f->srv.status_count, 1);

    /* during a major incident, an answering probe does not close the circuit */
    pq_circuit_record(c, 1, 0);
    assert_string_equal(pq_circuit_state(c), "open");
    RUN_UNTIL(f, f->srv.probe_count >= 2, 2000);
    assert_true(f->srv.probe_count >= 2);
    assert_string_not_equal(pq_circuit_state(c), "closed");
    RUN_UNTIL(f, strcmp(pq_circuit_state(c), "open") == 0, 2000);
    assert_string_equal(pq_circuit_state(c), "open");
    h = pq_provs_health(f->ps);
    lp = json_object_get(health_entry(h, "st", "m"), "last_probe");
    assert_true(json_is_false(json_object_get(lp, "ok")));
    assert_non_null(strstr(json_string_value(json_object_get(lp, "detail")), "status page major"));
    json_decref(h);
    assert_int_equal(f->closed, 0);
}

/* ---- watsonx IAM tokens ---- */

static void test_token_cache(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "wx");
    twaiter_t w[3], w4, w5, w6;
    const char *tok = NULL;
    uint64_t gen;
    pq_err_t err = PQ_OK;

    /* three concurrent waiters: exactly one exchange */
    for (int i = 0; i < 3; i++) {
        w[i].f = f;
        token_queued(pv, &w[i], 0);
        assert_int_equal(pq_prov_token_fetches(pv), 1);
    }
    RUN_UNTIL(f, w[0].called && w[1].called && w[2].called, 3000);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(w[i].called, 1);
        assert_int_equal(w[i].err, PQ_OK);
        assert_string_equal(w[i].token, "tok1");
    }
    assert_int_equal(f->srv.iam_count, 1);
    assert_non_null(strstr(f->srv.iam_body, "grant_type=urn"));
    assert_non_null(strstr(f->srv.iam_body, "apikey=wk0"));

    /* cached: returned at once, no exchange */
    twaiter_init(&w4, f, 0);
    assert_int_equal(pq_prov_token(pv, 0, &w4.w, &tok, &err), 0);
    assert_string_equal(tok, "tok1");
    assert_int_equal(w4.w.queued, 0);
    assert_int_equal(pq_prov_token_fetches(pv), 1);

    /* key 1 has its own token */
    w5.f = f;
    token_queued(pv, &w5, 1);
    RUN_UNTIL(f, w5.called, 3000);
    assert_string_equal(w5.token, "tok2");
    assert_non_null(strstr(f->srv.iam_body, "apikey=wk1"));
    assert_int_equal(pq_prov_token_fetches(pv), 2);

    /* invalidating another token (an old one, key 1's, none, a key that is not there) keeps
     * the cached one */
    gen = pq_prov_token_gen(pv, 0);
    assert_true(gen != 0);
    assert_true(pq_prov_token_gen(pv, 1) != 0 && pq_prov_token_gen(pv, 1) != gen);
    assert_int_equal(pq_prov_token_gen(pv, 7), 0);
    pq_prov_token_invalidate(pv, 0, gen - 1);
    pq_prov_token_invalidate(pv, 0, pq_prov_token_gen(pv, 1));
    pq_prov_token_invalidate(pv, 0, 0);
    pq_prov_token_invalidate(pv, 7, gen);
    assert_int_equal(pq_prov_token(pv, 0, &w4.w, &tok, &err), 0);
    assert_string_equal(tok, "tok1");
    assert_true(pq_prov_token_gen(pv, 0) == gen);

    /* invalidating the cached one forces a new exchange, and the new token is another generation */
    pq_prov_token_invalidate(pv, 0, gen);
    assert_int_equal(pq_prov_token_gen(pv, 0), 0);
    w6.f = f;
    token_queued(pv, &w6, 0);
    assert_int_equal(pq_prov_token_fetches(pv), 3);
    RUN_UNTIL(f, w6.called, 3000);
    assert_string_equal(w6.token, "tok3");
    assert_true(pq_prov_token_gen(pv, 0) > gen);
    assert_int_equal(f->srv.iam_count, 3);
    assert_int_equal(pq_prov_token(pv, 0, &w4.w, &tok, &err), 0);
    assert_string_equal(tok, "tok3");
    /* key 1 still has its token */
    assert_int_equal(pq_prov_token(pv, 1, &w4.w, &tok, &err), 0);
    assert_string_equal(tok, "tok2");

    /* a key index out of range is a local failure */
    err = PQ_OK;
    assert_int_equal(pq_prov_token(pv, 2, &w4.w, &tok, &err), -1);
    assert_int_equal(err, PQ_ERR_CONFIG);
    assert_int_equal(pq_prov_token_fetches(pv), 3);
}

static void test_token_cancel_and_errors(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "wx");
    twaiter_t a, b, c, d;
    const char *tok = NULL;
    pq_err_t err = PQ_OK;

    /* a cancelled waiter is not called; the others are */
    a.f = f;
    b.f = f;
    token_queued(pv, &a, 0);
    token_queued(pv, &b, 0);
    pq_prov_token_cancel(pv, &a.w);
    assert_int_equal(a.w.queued, 0);
    pq_prov_token_cancel(pv, &a.w);
    RUN_UNTIL(f, b.called, 3000);
    assert_int_equal(b.called, 1);
    assert_string_equal(b.token, "tok1");
    run_for(f, 20);
    assert_int_equal(a.called, 0);

    /* IAM refuses the key (400): NULL token, PQ_ERR_AUTH, nothing cached */
    f->srv.iam_status = 400;
    c.f = f;
    token_queued(pv, &c, 1);
    RUN_UNTIL(f, c.called, 3000);
    assert_int_equal(c.called, 1);
    assert_int_equal(c.has_token, 0);
    assert_int_equal(c.err, PQ_ERR_AUTH);
    /* IAM down (503): a retryable error; again nothing cached, a new exchange each time */
    f->srv.iam_status = 503;
    d.f = f;
    token_queued(pv, &d, 1);
    assert_int_equal(pq_prov_token_fetches(pv), 3);
    RUN_UNTIL(f, d.called, 3000);
    assert_int_equal(d.has_token, 0);
    assert_int_equal(d.err, PQ_ERR_SERVER);
    f->srv.iam_status = 200;
    d.called = 0;
    token_queued(pv, &d, 1);
    RUN_UNTIL(f, d.called, 3000);
    assert_string_equal(d.token, "tok4");
    assert_int_equal(f->srv.iam_count, 4);
    assert_int_equal(pq_prov_token(pv, 1, &a.w, &tok, &err), 0);
    assert_string_equal(tok, "tok4");

    /* destroying the providers with an exchange in flight cancels it (no callback) */
    pq_prov_token_invalidate(pv, 1, pq_prov_token_gen(pv, 1));
    a.called = 0;
    token_queued(pv, &a, 1);
    pq_prov_token_cancel(pv, &a.w); /* waiters must be gone before destroy */
}

/* Known bug (prov.c on_token_done/tok_notify): a waiter that asks again from its failure callback
 * starts a new exchange but is handed the OLD failure at once. */
static void test_token_retry_from_callback(void **state)
{
    fx_t *f = *state;
    pq_prov_t *pv = prov(f, "wx");
    twaiter_t a, r;

    f->srv.iam_status = 503;
    a.f = f;
    token_queued(pv, &a, 0);
    twaiter_init(&r, f, 0);
    a.retry = 1;
    a.retry_w = &r;
    /* the answer to the first exchange is read; then IAM recovers for the second */
    RUN_UNTIL(f, f->srv.iam_count >= 1, 3000);
    f->srv.iam_status = 200;
    RUN_UNTIL(f, a.called && r.called, 3000);
    assert_int_equal(a.called, 1);
    assert_int_equal(a.err, PQ_ERR_SERVER);
    RUN_UNTIL(f, f->srv.iam_count >= 2, 3000);
    run_for(f, 50);
    /* the retry must get the second exchange's token, not the first one's failure */
    assert_int_equal(r.called, 1);
    assert_int_equal(r.err, PQ_OK);
    assert_string_equal(r.token, "tok2");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_key_rotation, setup_main, teardown),
        cmocka_unit_test_setup_teardown(test_key_rest, setup_main, teardown),
        cmocka_unit_test_setup_teardown(test_key_rest_queued, setup_main, teardown),
        cmocka_unit_test_setup_teardown(test_rest_per_model, setup_main, teardown),
        cmocka_unit_test(test_rate_hints),
        cmocka_unit_test_setup_teardown(test_max_concurrency, setup_main, teardown),
        cmocka_unit_test_setup_teardown(test_rpm, setup_main, teardown),
        cmocka_unit_test_setup_teardown(test_tpm, setup_main, teardown),
        cmocka_unit_test_setup_teardown(test_tpm_refund, setup_main, teardown),
        cmocka_unit_test_setup_teardown(test_circuit_consecutive, setup_main, teardown),
        cmocka_unit_test_setup_teardown(test_circuit_ratio, setup_main, teardown),
        cmocka_unit_test_setup_teardown(test_half_open_probe_success, setup_main, teardown),
        cmocka_unit_test_setup_teardown(test_half_open_by_call, setup_main, teardown),
        cmocka_unit_test_setup_teardown(test_half_open_probe_failure, setup_main, teardown),
        cmocka_unit_test_setup_teardown(test_probe_unanswered, setup_main, teardown),
        cmocka_unit_test_setup_teardown(test_status_page, setup_status, teardown),
        cmocka_unit_test_setup_teardown(test_token_cache, setup_main, teardown),
        cmocka_unit_test_setup_teardown(test_token_cancel_and_errors, setup_main, teardown),
        cmocka_unit_test_setup_teardown(test_token_retry_from_callback, setup_main, teardown),
    };
    int rc;

    pq_log_init("test_prov", PQ_LOG_ERROR, 0);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
