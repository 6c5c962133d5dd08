/* GET /v1/jobs/{id}: the tenant's job record from Redis. A terminal job answers its stored
 * result record verbatim; otherwise a status summary. */
#include "broker.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>
#include <hiredis/hiredis.h>

#include "promptq/keys.h"
#include "promptq/log.h"
#include "promptq/util.h"

static int is_terminal(const char *status)
{
    return !strcmp(status, "succeeded") || !strcmp(status, "failed") ||
           !strcmp(status, "expired") || !strcmp(status, "cancelled");
}

/* Tenant of the request: the API key's, or in open mode ?tenant= (default "default"). Returns
 * 0, or -1 after answering. */
static int request_tenant(pq_bthread_t *t, struct evhttp_request *req, char *out, size_t size)
{
    const char *key_tenant, *q;
    struct evkeyvalq params;

    if (pq_http_auth(t, req, PQ_PATH_JOB, &key_tenant))
        return -1;
    if (key_tenant) {
        pq_strlcpy(out, key_tenant, size);
        return 0;
    }
    pq_strlcpy(out, "default", size);
    q = evhttp_uri_get_query(evhttp_request_get_evhttp_uri(req));
    if (q && evhttp_parse_query_str(q, &params) == 0) {
        const char *v = evhttp_find_header(&params, "tenant");

        if (v && !pq_tenant_valid(v)) {
            evhttp_clear_headers(&params);
            pq_http_error(t, req, PQ_PATH_JOB, 400, "invalid_request",
                          "tenant: must match [A-Za-z0-9._-]{1,%d}", PQ_TENANT_MAX);
            return -1;
        }
        if (v)
            pq_strlcpy(out, v, size);
        evhttp_clear_headers(&params);
    }
    return 0;
}

void pq_jobs_get(pq_bthread_t *t, struct evhttp_request *req, const char *id)
{
    char tenant[PQ_TENANT_MAX + 1], key[512];
    pq_slot_t *s;

    if (request_tenant(t, req, tenant, sizeof(tenant)))
        return;
    if (!pq_id_valid(id)) {
        pq_http_error(t, req, PQ_PATH_JOB, 404, "not_found", "no such job");
        return;
    }
    if (!pq_rconn_usable(t) ||
        pq_key_job(key, sizeof(key), t->bc->conf->redis_prefix, tenant, id) < 0) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", "1");
        pq_http_error(t, req, PQ_PATH_JOB, 503, "unavailable", "job store (Redis) unavailable");
        return;
    }
    s = pq_slot_get(t, PQ_PATH_JOB, req);
    if (!s) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", "1");
        pq_http_error(t, req, PQ_PATH_JOB, 503, "unavailable", "too many requests in flight");
        return;
    }
    pq_strlcpy(s->id, id, sizeof(s->id));
    pq_strlcpy(s->tenant, tenant, sizeof(s->tenant));
    if (pq_rconn_command(t, pq_slot_handle(s), "HGETALL %s", key)) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", "1");
        pq_http_error(t, req, PQ_PATH_JOB, 503, "unavailable", "job store (Redis) unavailable");
        pq_slot_release(s);
        return;
    }
    s->state = PQ_SLOT_GET;
    event_add(&s->timer, t->tv_redis);
}

void pq_jobs_timeout(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;

    pq_counter_add(t->b->m_redis_errors, 1);
    evhttp_add_header(evhttp_request_get_output_headers(s->req), "Retry-After", "1");
    pq_http_error(t, s->req, PQ_PATH_JOB, 503, "unavailable", "job store (Redis) did not answer");
    pq_slot_release(s);
}

static json_t *time_field(const char *ms)
{
    char buf[40];

    if (!ms || !*ms)
        return json_null();
    pq_time_format(strtoll(ms, NULL, 10), buf, sizeof(buf));
    return json_string(buf);
}

static json_t *int_field(const char *v)
{
    return json_integer(v ? strtoll(v, NULL, 10) : 0);
}

void pq_jobs_redis_reply(pq_slot_t *s, const void *r)
{
    const redisReply *reply = r;
    pq_bthread_t *t = s->t;
    const char *status = NULL, *route = NULL, *result = NULL, *attempts = NULL;
    const char *deliveries = NULL, *created = NULL, *updated = NULL;
    size_t result_len = 0;
    json_t *doc;
    char *text;

    if (!reply || reply->type != REDIS_REPLY_ARRAY) {
        pq_counter_add(t->b->m_redis_errors, 1);
        evhttp_add_header(evhttp_request_get_output_headers(s->req), "Retry-After", "1");
        pq_http_error(t, s->req, PQ_PATH_JOB, 503, "unavailable", "job store (Redis) failed");
        goto out;
    }
    for (size_t i = 0; i + 1 < reply->elements; i += 2) {
        const redisReply *k = reply->element[i], *v = reply->element[i + 1];

        if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
            continue;
        if (!strcmp(k->str, "status"))
            status = v->str;
        else if (!strcmp(k->str, "route"))
            route = v->str;
        else if (!strcmp(k->str, "result")) {
            result = v->str;
            result_len = v->len;
        } else if (!strcmp(k->str, "attempts"))
            attempts = v->str;
        else if (!strcmp(k->str, "deliveries"))
            deliveries = v->str;
        else if (!strcmp(k->str, "created_at"))
            created = v->str;
        else if (!strcmp(k->str, "updated_at"))
            updated = v->str;
    }
    if (!status) {
        pq_http_error(t, s->req, PQ_PATH_JOB, 404, "not_found", "no such job");
        goto out;
    }
    if (is_terminal(status) && result && result_len) {
        pq_http_reply(t, s->req, PQ_PATH_JOB, 200, result, result_len);
        goto out;
    }
    doc = json_object();
    if (doc) {
        json_object_set_new(doc, "id", json_string(s->id));
        json_object_set_new(doc, "tenant", json_string(s->tenant));
        json_object_set_new(doc, "status", json_string(status));
        json_object_set_new(doc, "route", route ? json_string(route) : json_null());
        json_object_set_new(doc, "attempts", int_field(attempts));
        json_object_set_new(doc, "deliveries", int_field(deliveries));
        json_object_set_new(doc, "created_at", time_field(created));
        json_object_set_new(doc, "updated_at", time_field(updated));
    }
    text = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
    json_decref(doc);
    if (!text) {
        pq_http_error(t, s->req, PQ_PATH_JOB, 500, "internal", "out of memory");
        goto out;
    }
    pq_http_reply(t, s->req, PQ_PATH_JOB, 200, text, strlen(text));
    free(text);
out:
    pq_slot_release(s);
}
