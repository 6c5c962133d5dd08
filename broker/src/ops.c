/* Operator endpoints (DESIGN.md §5): GET /v1/health and GET /v1/parked aggregate the workers'
 * health keys (promptq:health:{instance}, written every 5 s with a 15 s TTL): SCAN for the keys
 * (at most OPS_WORKERS_MAX), then one MGET, all on the loop's Redis connection. Replay now and
 * drop are requests the workers read from Redis (below); DLQ redrive is redrive.c. */
#include "broker.h"
#include "api.h"
#include "bspool.h"
#include "http.h"
#include "ops.h"
#include "redrive.h"
#include "slot.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>
#include <hiredis/hiredis.h>
#include <jansson.h>

#include "promptq/keys.h"
#include "promptq/log.h"
#include "promptq/util.h"

#define OPS_WORKERS_MAX    1000
#define OPS_SCAN_COUNT     "1000"
#define OPS_SCAN_ROUNDS    64 /* a keyspace this large to walk is answered with what was found */
#define OPS_PATTERN_MAX    600
#define OPS_HEALTH_KEY_MAX 512

typedef struct {
    int parked; /* 0: /v1/health, 1: /v1/parked */
    char route[PQ_BROKER_ROUTE_MAX + 1];
    char pattern[OPS_PATTERN_MAX];
    char cursor[32];
    int rounds;
    int truncated;
    int redis_down; /* the health keys could not be read */
    char **keys;
    size_t nkeys;
} ops_ctx_t;

static void ops_ctx_free(void *p)
{
    ops_ctx_t *c = p;

    if (!c)
        return;
    for (size_t i = 0; i < c->nkeys; i++)
        free(c->keys[i]);
    free(c->keys);
    free(c);
}

static void answer(pq_slot_t *s, const redisReply *mget);

static void ops_redis_failed(pq_slot_t *s);

static void ops_unavailable(pq_slot_t *s)
{
    if (s->path == PQ_PATH_HEALTH) {
        ops_redis_failed(s);
        return;
    }
    evhttp_add_header(evhttp_request_get_output_headers(s->req), "Retry-After", "1");
    pq_http_error(s->t, s->req, s->path, 503, "unavailable", "redis unavailable");
    pq_slot_release(s);
}

/* The health keys of a /v1/health slot could not be read: answers the broker's own state with
 * redis "down" and status "down" (releases the slot). */
static void ops_redis_failed(pq_slot_t *s)
{
    ops_ctx_t *c = s->ctx;

    /* the broker's own state is still worth answering: Redis down, no worker known */
    c->redis_down = 1;
    c->nkeys = 0;
    answer(s, NULL);
}

/* ---- aggregation (pure: workers' health documents in, answers out) ---- */

static int circuit_rank(const char *c)
{
    if (!c)
        return -1;
    if (!strcmp(c, "open"))
        return 2;
    if (!strcmp(c, "half_open"))
        return 1;
    if (!strcmp(c, "closed"))
        return 0;
    return -1;
}

static int page_rank(const char *p)
{
    static const char *const order[] = {"none", "minor", "major", "critical"};

    for (int i = 0; p && i < 4; i++)
        if (!strcmp(p, order[i]))
            return i;
    return -1;
}

static void agg_provider(json_t *providers, json_t *c)
{
    const char *prov = json_string_value(json_object_get(c, "provider"));
    const char *model = json_string_value(json_object_get(c, "model"));
    const char *circ = json_string_value(json_object_get(c, "circuit"));
    json_t *probe = json_object_get(c, "last_probe");
    const char *page = json_string_value(json_object_get(c, "status_page"));
    char key[600];
    json_t *e;

    if (!prov || !model || circuit_rank(circ) < 0)
        return;
    snprintf(key, sizeof(key), "%s\n%s", prov, model);
    e = json_object_get(providers, key);
    if (!e) {
        e = json_pack("{s:s,s:s,s:s,s:O?,s:s?,s:i}", "provider", prov, "model", model, "circuit",
                      circ, "last_probe", json_is_object(probe) ? probe : NULL, "status_page", page,
                      "workers", 1);
        if (e)
            json_object_set_new(providers, key, e);
        return;
    }
    json_object_set_new(e, "workers",
                        json_integer(json_integer_value(json_object_get(e, "workers")) + 1));
    if (circuit_rank(circ) > circuit_rank(json_string_value(json_object_get(e, "circuit"))))
        json_object_set_new(e, "circuit", json_string(circ));
    if (json_is_object(probe)) {
        json_t *old = json_object_get(e, "last_probe");

        if (!json_is_object(old) || json_integer_value(json_object_get(probe, "at")) >
                                        json_integer_value(json_object_get(old, "at")))
            json_object_set(e, "last_probe", probe);
    }
    if (page_rank(page) > page_rank(json_string_value(json_object_get(e, "status_page"))))
        json_object_set_new(e, "status_page", json_string(page));
}

static void add_int(json_t *o, const char *k, json_int_t v)
{
    json_object_set_new(o, k, json_integer(json_integer_value(json_object_get(o, k)) + v));
}

static void agg_route(json_t *routes, const char *name, json_t *r)
{
    json_t *e = json_object_get(routes, name);
    json_t *rate = json_object_get(r, "replay_rate");
    int down = json_is_true(json_object_get(r, "down"));

    if (!json_is_object(r))
        return;
    if (!e) {
        e = json_object();
        if (!e)
            return;
        json_object_set_new(e, "retry_topic", json_string(""));
        json_object_set_new(e, "down", json_false());
        json_object_set_new(e, "parked", json_integer(0));
        json_object_set_new(e, "replay_rate", json_integer(0));
        json_object_set_new(e, "held_partitions", json_integer(0));
        json_object_set_new(e, "parked_total", json_integer(0));
        json_object_set_new(e, "reparked_total", json_integer(0));
        json_object_set_new(e, "replayed_total", json_integer(0));
        json_object_set_new(e, "workers", json_integer(0));
        json_object_set_new(routes, name, e);
    }
    if (json_is_string(json_object_get(r, "retry_topic")))
        json_object_set(e, "retry_topic", json_object_get(r, "retry_topic"));
    if (down)
        json_object_set_new(e, "down", json_true());
    add_int(e, "parked", json_integer_value(json_object_get(r, "parked")));
    add_int(e, "held_partitions", json_integer_value(json_object_get(r, "held_partitions")));
    add_int(e, "parked_total", json_integer_value(json_object_get(r, "parked_total")));
    add_int(e, "reparked_total", json_integer_value(json_object_get(r, "reparked_total")));
    add_int(e, "replayed_total", json_integer_value(json_object_get(r, "replayed_total")));
    add_int(e, "workers", 1);
    /* the route's replay rate across workers: 0 while any worker sees it down, null
     * (unlimited) when any worker replays unlimited, else the sum */
    {
        json_t *cur = json_object_get(e, "replay_rate");

        if (json_is_true(json_object_get(e, "down")))
            json_object_set_new(e, "replay_rate", json_integer(0));
        else if (json_is_null(rate) || json_is_null(cur))
            json_object_set_new(e, "replay_rate", json_null());
        else if (json_is_integer(rate) && json_is_integer(cur))
            json_object_set_new(e, "replay_rate",
                                json_integer(json_integer_value(cur) + json_integer_value(rate)));
        else if (json_is_number(rate))
            json_object_set_new(e, "replay_rate",
                                json_real(json_number_value(cur) + json_number_value(rate)));
    }
}

typedef struct {
    json_t *workers;   /* array */
    json_t *providers; /* "provider\nmodel" -> entry */
    json_t *routes;    /* route -> entry */
} ops_agg_t;

static void agg_worker(ops_agg_t *a, const char *text, size_t len)
{
    json_error_t jerr;
    json_t *doc = json_loadb(text, len, 0, &jerr), *v, *w;
    const char *instance, *rname;
    size_t i;

    if (!json_is_object(doc))
        goto out;
    instance = json_string_value(json_object_get(doc, "instance"));
    if (!instance)
        goto out;
    w = json_pack("{s:s,s:I,s:I,s:I,s:b}", "instance", instance, "updated_at",
                  (json_int_t)json_integer_value(json_object_get(doc, "updated_at")), "inflight",
                  (json_int_t)json_integer_value(json_object_get(doc, "inflight")),
                  "replay_inflight",
                  (json_int_t)json_integer_value(json_object_get(doc, "replay_inflight")), "paused",
                  json_is_true(json_object_get(doc, "paused")));
    if (w)
        json_array_append_new(a->workers, w);
    json_array_foreach(json_object_get(doc, "circuits"), i, v) agg_provider(a->providers, v);
    json_object_foreach(json_object_get(doc, "routes"), rname, v) agg_route(a->routes, rname, v);
out:
    json_decref(doc);
}

/* ---- answers ---- */

static void answer_health(pq_slot_t *s, ops_agg_t *a)
{
    pq_bthread_t *t = s->t;
    pq_broker_t *b = t->b;
    int kafka = pq_bspool_kafka_up(b), full = pq_bspool_full(b);
    uint64_t records = 0, bytes = 0;
    int any_open = 0, nroutes = 0, ndown = 0;
    const char *status, *key;
    json_t *doc = NULL, *providers = json_array(), *v;
    const ops_ctx_t *c = s->ctx;

    if (b->spool)
        pq_spool_pending(b->spool, &records, &bytes);
    json_object_foreach(a->providers, key, v)
    {
        if (!strcmp(json_string_value(json_object_get(v, "circuit")), "open"))
            any_open = 1;
        json_array_append(providers, v);
    }
    json_object_foreach(a->routes, key, v)
    {
        nroutes++;
        if (json_is_true(json_object_get(v, "down")))
            ndown++;
    }
    if (c->redis_down || json_array_size(a->workers) == 0 || (nroutes > 0 && ndown == nroutes))
        status = "down";
    else if (any_open || ndown > 0 || !kafka)
        status = "degraded";
    else
        status = "ok";
    doc = json_pack("{s:s,s:{s:s,s:s,s:{s:I,s:I,s:b}},s:O,s:o,s:O,s:b}", "status", status, "broker",
                    "kafka", kafka ? "up" : "down", "redis", c->redis_down ? "down" : "up", "spool",
                    "pending_records", (json_int_t)records, "pending_bytes", (json_int_t)bytes,
                    "full", full, "workers", a->workers, "providers", providers, "routes",
                    a->routes, "workers_truncated", ((ops_ctx_t *)s->ctx)->truncated);
    providers = NULL;
    if (!doc) {
        pq_http_error(t, s->req, s->path, 500, "internal", "out of memory");
        pq_slot_release(s);
        return;
    }
    pq_http_reply_json(s, strcmp(status, "ok") ? 503 : 200, doc);
    pq_slot_release(s);
}

static void answer_parked(pq_slot_t *s, ops_agg_t *a)
{
    ops_ctx_t *c = s->ctx;
    const pq_conf_t *conf = s->t->bc->conf;
    json_t *list = json_array(), *doc, *v;
    const char *name;

    /* every configured route, reported or not, then routes only workers know */
    for (size_t i = 0; i < conf->nroutes; i++) {
        name = conf->routes[i].name;
        if (!json_object_get(a->routes, name)) {
            char topic[512];

            snprintf(topic, sizeof(topic), "%sretry.%s", conf->topic_prefix,
                     conf->routes[i].topic_name);
            v = json_pack("{s:s,s:b,s:i,s:n,s:i}", "retry_topic", topic, "down", 0, "parked", 0,
                          "replay_rate", "workers", 0);
            if (v)
                json_object_set_new(a->routes, name, v);
        }
    }
    if (c->route[0] && !json_object_get(a->routes, c->route)) {
        json_decref(list);
        pq_http_error(s->t, s->req, s->path, 404, "not_found", "no such route: %s", c->route);
        pq_slot_release(s);
        return;
    }
    json_object_foreach(a->routes, name, v)
    {
        if (c->route[0] && strcmp(name, c->route))
            continue;
        json_array_append_new(list, json_pack("{s:s,s:O,s:O,s:O,s:O,s:O}", "route", name,
                                              "retry_topic", json_object_get(v, "retry_topic"),
                                              "parked", json_object_get(v, "parked"), "down",
                                              json_object_get(v, "down"), "replay_rate",
                                              json_object_get(v, "replay_rate"), "workers",
                                              json_object_get(v, "workers")));
    }
    doc =
        json_pack("{s:o,s:I}", "routes", list, "workers", (json_int_t)json_array_size(a->workers));
    if (!doc) {
        pq_http_error(s->t, s->req, s->path, 500, "internal", "out of memory");
        pq_slot_release(s);
        return;
    }
    pq_http_reply_json(s, 200, doc);
    pq_slot_release(s);
}

static void answer(pq_slot_t *s, const redisReply *mget)
{
    ops_ctx_t *c = s->ctx;
    ops_agg_t a = {json_array(), json_object(), json_object()};

    if (!a.workers || !a.providers || !a.routes) {
        pq_http_error(s->t, s->req, s->path, 500, "internal", "out of memory");
        pq_slot_release(s);
        goto out;
    }
    for (size_t i = 0; mget && i < mget->elements; i++) {
        const redisReply *e = mget->element[i];

        if (e && e->type == REDIS_REPLY_STRING)
            agg_worker(&a, e->str, (size_t)e->len);
    }
    if (c->parked)
        answer_parked(s, &a);
    else
        answer_health(s, &a);
out:
    json_decref(a.workers);
    json_decref(a.providers);
    json_decref(a.routes);
}

/* ---- Redis steps: SCAN ... then MGET ---- */

static void step_scan(pq_slot_t *s);

static void on_mget(pq_slot_t *s, const void *r)
{
    const redisReply *reply = r;

    if (reply->type != REDIS_REPLY_ARRAY) {
        ops_unavailable(s);
        return;
    }
    answer(s, reply);
}

static void step_mget(pq_slot_t *s)
{
    ops_ctx_t *c = s->ctx;
    const char **argv = malloc((c->nkeys + 1) * sizeof(*argv));
    size_t *lens = malloc((c->nkeys + 1) * sizeof(*lens));
    int rc;

    if (!argv || !lens) {
        free(argv);
        free(lens);
        pq_http_error(s->t, s->req, s->path, 500, "internal", "out of memory");
        pq_slot_release(s);
        return;
    }
    argv[0] = "MGET";
    lens[0] = 4;
    for (size_t i = 0; i < c->nkeys; i++) {
        argv[i + 1] = c->keys[i];
        lens[i + 1] = strlen(c->keys[i]);
    }
    rc = pq_api_send(s, on_mget, (int)c->nkeys + 1, argv, lens);
    free(argv);
    free(lens);
    if (rc)
        ops_unavailable(s);
}

static void on_scan(pq_slot_t *s, const void *r)
{
    const redisReply *reply = r, *cur, *keys;
    ops_ctx_t *c = s->ctx;

    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2 ||
        (cur = reply->element[0])->type != REDIS_REPLY_STRING ||
        (keys = reply->element[1])->type != REDIS_REPLY_ARRAY || (size_t)cur->len >= 32) {
        ops_unavailable(s);
        return;
    }
    memcpy(c->cursor, cur->str, (size_t)cur->len);
    c->cursor[cur->len] = '\0';
    for (size_t i = 0; i < keys->elements; i++) {
        const redisReply *k = keys->element[i];
        int dup = 0;

        if (k->type != REDIS_REPLY_STRING || (size_t)k->len >= OPS_HEALTH_KEY_MAX)
            continue;
        if (c->nkeys >= OPS_WORKERS_MAX) {
            c->truncated = 1;
            break;
        }
        /* SCAN may return a key twice */
        for (size_t j = 0; j < c->nkeys && !dup; j++)
            dup = !strcmp(c->keys[j], k->str);
        if (dup)
            continue;
        if (!(c->keys[c->nkeys] = strndup(k->str, (size_t)k->len))) {
            pq_http_error(s->t, s->req, s->path, 500, "internal", "out of memory");
            pq_slot_release(s);
            return;
        }
        c->nkeys++;
    }
    if (!strcmp(c->cursor, "0") || c->truncated || ++c->rounds >= OPS_SCAN_ROUNDS) {
        if (strcmp(c->cursor, "0"))
            c->truncated = 1;
        if (c->nkeys == 0)
            answer(s, NULL);
        else
            step_mget(s);
        return;
    }
    step_scan(s);
}

static void step_scan(pq_slot_t *s)
{
    ops_ctx_t *c = s->ctx;
    const char *argv[] = {"SCAN", c->cursor, "MATCH", c->pattern, "COUNT", OPS_SCAN_COUNT};
    size_t lens[6];

    for (int i = 0; i < 6; i++)
        lens[i] = strlen(argv[i]);
    if (pq_api_send(s, on_scan, 6, argv, lens))
        ops_unavailable(s);
}

/* The MATCH pattern for prefix + "health:*", with the prefix's glob characters escaped. */
static int health_pattern(char *out, size_t size, const char *prefix)
{
    size_t o = 0;

    for (; *prefix; prefix++) {
        if (o + 3 >= size)
            return -1;
        if (strchr("*?[]\\", *prefix))
            out[o++] = '\\';
        out[o++] = *prefix;
    }
    if (o + sizeof("health:*") > size)
        return -1;
    memcpy(out + o, "health:*", sizeof("health:*"));
    return 0;
}

/* As pq_api_ops, but /v1/health answers what the broker knows when Redis fails. */
static void ops_slot_timeout(pq_slot_t *s)
{
    if (s->state != PQ_SLOT_API)
        return;
    if (s->path != PQ_PATH_HEALTH) {
        pq_api_timeout(s);
        return;
    }
    pq_counter_add(s->t->b->m_redis_errors, 1);
    ops_redis_failed(s);
}

static const pq_slot_ops_t ops_slot_ops = {ops_slot_timeout, NULL, NULL};

static void ops_start(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, int parked)
{
    const char *tenant;
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *query = uri ? evhttp_uri_get_query(uri) : NULL;
    ops_ctx_t *c = NULL;
    pq_slot_t *s;

    if (pq_http_auth(t, req, path, &tenant))
        return;
    if (!(c = calloc(1, sizeof(*c))) || !(c->keys = calloc(OPS_WORKERS_MAX, sizeof(char *)))) {
        ops_ctx_free(c);
        pq_http_error(t, req, path, 500, "internal", "out of memory");
        return;
    }
    c->parked = parked;
    strcpy(c->cursor, "0");
    if (health_pattern(c->pattern, sizeof(c->pattern), t->bc->conf->redis_prefix)) {
        ops_ctx_free(c);
        pq_http_error(t, req, path, 500, "internal", "redis prefix too long");
        return;
    }
    if (parked && query) {
        struct evkeyvalq q;
        const char *route;

        memset(&q, 0, sizeof(q)); /* evhttp_parse_query_str initialises it */
        if (evhttp_parse_query_str(query, &q) == 0 && (route = evhttp_find_header(&q, "route")) &&
            route[0]) {
            if (strlen(route) > PQ_BROKER_ROUTE_MAX) {
                evhttp_clear_headers(&q);
                ops_ctx_free(c);
                pq_http_error(t, req, path, 400, "invalid_request", "route too long");
                return;
            }
            strcpy(c->route, route);
        }
        evhttp_clear_headers(&q);
    }
    s = pq_slot_get(t, path, req, &ops_slot_ops);
    if (!s) {
        ops_ctx_free(c);
        pq_http_error(t, req, path, 503, "unavailable", "too many requests in flight");
        return;
    }
    s->ctx = c;
    s->ctx_free = ops_ctx_free;
    step_scan(s);
}

/* ---- POST /v1/parked/{route}/replay, DELETE /v1/parked/{route} ----
 *
 * Requests to the workers, through the route's ops hash (pq_key_route_ops), which every worker
 * reads each second. Replay: the route's circuits are closed by force and its parked jobs replay
 * (ramped) at once, whatever the probes say; if the providers are still down the jobs park again.
 * Drop: the caller's tenant's jobs parked on the route before now end as cancelled ("dropped")
 * when the workers read them, without a provider call. Both answer 202: the workers act within
 * about a second. */

typedef struct {
    int drop;
    int64_t at;
    char route[PQ_BROKER_ROUTE_MAX * 6 + 1]; /* JSON-escaped */
    char tenant[PQ_TENANT_MAX + 1];
} parked_op_t;

static void on_parked_op(pq_slot_t *s, const void *r)
{
    parked_op_t *op = s->ctx;
    char body[sizeof(op->route) + PQ_TENANT_MAX + 200];
    int n;

    (void)r;
    if (op->drop)
        n = snprintf(body, sizeof(body),
                     "{\"object\":\"parked.drop\",\"route\":\"%s\",\"tenant\":\"%s\","
                     "\"dropped_before\":%lld}",
                     op->route, op->tenant, (long long)op->at);
    else
        n = snprintf(body, sizeof(body),
                     "{\"object\":\"parked.replay\",\"route\":\"%s\",\"requested_at\":%lld}",
                     op->route, (long long)op->at);
    pq_http_reply(s->t, s->req, s->path, 202, body, (size_t)n);
    pq_slot_release(s);
}

/* raw_route: the path segment(s) naming the route, percent-encoded (a route may hold "/"). */
static void parked_op(pq_bthread_t *t, struct evhttp_request *req, const char *raw_route,
                      size_t raw_len, int drop)
{
    const pq_conf_t *conf = t->bc->conf;
    char tenant[PQ_TENANT_MAX + 1], key[OPS_PATTERN_MAX], field[PQ_TENANT_MAX + 8], now[24];
    char raw[PQ_BROKER_ROUTE_MAX * 3 + 1];
    const char *argv[4];
    size_t lens[4], len = 0;
    char *route = NULL;
    parked_op_t *op;
    pq_slot_t *s;

    if (pq_api_tenant(t, req, PQ_PATH_PARKED, tenant, sizeof(tenant)))
        return;
    if (!drop && conf->napi_keys > 0) {
        /* a replay closes circuits shared by every tenant: admins only */
        size_t i = 0;

        while (i < conf->nadmin_tenants && strcmp(conf->admin_tenants[i], tenant) != 0)
            i++;
        if (i == conf->nadmin_tenants) {
            pq_http_error(t, req, PQ_PATH_PARKED, 403, "forbidden",
                          "a replay affects every tenant's jobs on the route: it needs the key "
                          "of a tenant listed in broker.admin_tenants");
            return;
        }
    }
    if (raw_len < sizeof(raw)) {
        memcpy(raw, raw_route, raw_len);
        raw[raw_len] = '\0';
        route = evhttp_uridecode(raw, 0, &len);
    }
    if (!route || len == 0 || strlen(route) != len || len > PQ_BROKER_ROUTE_MAX ||
        !pq_conf_route(conf, route)) {
        pq_http_error(t, req, PQ_PATH_PARKED, 404, "model_not_found",
                      "no route by that name is configured");
        free(route);
        return;
    }
    if (pq_key_route_ops(key, sizeof(key), conf->redis_prefix, route) < 0 ||
        !(op = calloc(1, sizeof(*op)))) {
        free(route);
        pq_http_error(t, req, PQ_PATH_PARKED, 500, "internal", "out of memory");
        return;
    }
    op->drop = drop;
    op->at = pq_now_ms();
    pq_http_json_escape(op->route, sizeof(op->route), route);
    pq_strlcpy(op->tenant, tenant, sizeof(op->tenant));
    free(route);
    s = pq_slot_get(t, PQ_PATH_PARKED, req, &pq_api_ops);
    if (!s) {
        free(op);
        pq_http_error(t, req, PQ_PATH_PARKED, 503, "unavailable", "too many requests in flight");
        return;
    }
    s->ctx = op;
    s->ctx_free = free;
    snprintf(now, sizeof(now), "%lld", (long long)op->at);
    snprintf(field, sizeof(field), "drop:%s", tenant);
    argv[0] = "HSET";
    argv[1] = key;
    argv[2] = drop ? field : "replay_at";
    argv[3] = now;
    for (int i = 0; i < 4; i++)
        lens[i] = strlen(argv[i]);
    if (pq_api_send(s, on_parked_op, 4, argv, lens))
        ops_unavailable(s);
}

void pq_ops_serve(pq_bthread_t *t, struct evhttp_request *req, const char *path)
{
    enum evhttp_cmd_type m = evhttp_request_get_command(req);
    int get = m == EVHTTP_REQ_GET || m == EVHTTP_REQ_HEAD;

    if (!strcmp(path, "/v1/health")) {
        if (get)
            ops_start(t, req, PQ_PATH_HEALTH, 0);
        else
            pq_http_method_not_allowed(t, req, PQ_PATH_HEALTH, "GET");
    } else if (!strcmp(path, "/v1/parked")) {
        if (get)
            ops_start(t, req, PQ_PATH_PARKED, 1);
        else
            pq_http_method_not_allowed(t, req, PQ_PATH_PARKED, "GET");
    } else if (!strncmp(path, "/v1/parked/", 11) && path[11]) {
        const char *rest = path + 11;
        size_t n = strlen(rest);

        if (n > 7 && !strcmp(rest + n - 7, "/replay")) {
            if (m == EVHTTP_REQ_POST)
                parked_op(t, req, rest, n - 7, 0);
            else
                pq_http_method_not_allowed(t, req, PQ_PATH_PARKED, "POST");
        } else if (m == EVHTTP_REQ_DELETE) {
            parked_op(t, req, rest, n, 1);
        } else {
            pq_http_method_not_allowed(t, req, PQ_PATH_PARKED, "DELETE");
        }
    } else if (!strcmp(path, "/v1/dlq/redrive")) {
        if (m == EVHTTP_REQ_POST)
            pq_redrive_serve(t, req);
        else
            pq_http_method_not_allowed(t, req, PQ_PATH_DLQ, "POST");
    } else {
        pq_http_error(t, req, PQ_PATH_OTHER, 404, "not_found", "no such path");
    }
}
