/* GET /v1/jobs/{id}: the tenant's job record from Redis. A terminal job answers its stored
 * result record verbatim; otherwise a status summary.
 *
 * A job with a callback_url carries its state in headers (x-promptq-callback: pending, delivered,
 * failed or refused; x-promptq-callback-attempts; x-promptq-callback-error).
 *
 * DELETE /v1/jobs/{id}: cancels a job that has not run yet. The record is read (404 if absent:
 * unknown or another tenant's), a cancelled result record is built (the worker's shape:
 * provider and model null, error {"type":"cancelled"}, source null since the broker does not
 * know where the job sits in Kafka), and a Lua compare-and-set moves queued|parked to
 * cancelled with that result. The winner produces the result to promptq.results (a worker
 * that meets the job later finds it terminal and re-publishes the same result: at-least-once)
 * and answers 200 with it; running or terminal jobs are 409.
 *
 * GET /v1/jobs?status=&after=&limit=: the tenant's jobs, newest first, in the OpenAI list shape
 * {"object":"list","data":[...],"first_id","last_id","has_more"}. The index is the sorted set
 * <prefix>jobs:<tenant> (pq_key_jobs: job id scored by created_at ms), filled where a record is
 * created: pq_script_job_create (POST /v1/jobs, chat completions) and pq_script_job_begin (jobs
 * produced straight into Kafka). Batch lines are not indexed: they are listed through their
 * batch. The index keeps what was created within redis.result_ttl_s (older entries are trimmed
 * on each add; a record refreshed later stays readable by id). One Lua script
 * (pq_bscript_jobs_list) walks it from the cursor, reads each record, drops entries whose
 * record expired, applies the status filter, and stops after limit + 1 matches or after
 * scanning JOBS_LIST_SCAN_FACTOR * limit entries: then has_more is true and last_id is the last
 * entry scanned (possibly not in data, data possibly empty), so a client that pages with
 * after=last_id until has_more is false sees every match. An after that is not in the index
 * (unknown, or expired since) is a 400 naming it: an empty page would read as "no more". */
#include "broker.h"
#include "api.h"
#include "http.h"
#include "jobs.h"
#include "ratelimit.h"
#include "rconn.h"
#include "slot.h"

#include <ctype.h>
#include <stdint.h>
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

/* 503 with Retry-After: 1 for a job request: the job store or a request slot is missing only
 * for a moment, so the client may retry soon. */
static void job_unavailable(pq_bthread_t *t, struct evhttp_request *req, const char *why)
{
    evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", "1");
    pq_http_error(t, req, PQ_PATH_JOB, 503, "unavailable", "%s", why);
}

/* The shared start of GET and DELETE /v1/jobs/{id}: checks the id, builds the job's Redis key
 * into key, and takes a request slot holding id and tenant. Returns the slot (the caller sends
 * its command and owns the slot), or NULL after answering the request (404 or 503). */
static void jobs_slot_timeout(pq_slot_t *s)
{
    if (s->state == PQ_SLOT_GET)
        pq_jobs_timeout(s);
    else if (s->state == PQ_SLOT_CANCEL_READ || s->state == PQ_SLOT_CANCEL_CAS ||
             s->state == PQ_SLOT_CANCEL_PUB)
        pq_jobs_cancel_timeout(s);
}

static void jobs_slot_stop(pq_slot_t *s)
{
    if (s->state == PQ_SLOT_GET)
        pq_jobs_timeout(s);
}

static const pq_slot_ops_t jobs_ops = {jobs_slot_timeout, jobs_slot_stop, NULL};

static pq_slot_t *job_slot_open(pq_bthread_t *t, struct evhttp_request *req, const char *id,
                                const char *tenant, char *key, size_t key_size)
{
    pq_slot_t *s;

    if (!pq_id_valid(id)) {
        pq_http_error(t, req, PQ_PATH_JOB, 404, "not_found", "no such job");
        return NULL;
    }
    if (!pq_rconn_usable(t) ||
        pq_key_job(key, key_size, t->bc->conf->redis_prefix, tenant, id) < 0) {
        job_unavailable(t, req, "job store (Redis) unavailable");
        return NULL;
    }
    s = pq_slot_get(t, PQ_PATH_JOB, req, &jobs_ops);
    if (!s) {
        job_unavailable(t, req, "too many requests in flight");
        return NULL;
    }
    pq_strlcpy(s->id, id, sizeof(s->id));
    pq_strlcpy(s->tenant, tenant, sizeof(s->tenant));
    return s;
}

static void get_cb(redisAsyncContext *ac, void *reply, void *handle)
{
    pq_slot_t *s = pq_slot_replied(ac, reply, handle);

    if (s && s->state == PQ_SLOT_GET)
        pq_jobs_redis_reply(s, reply);
}

static void cancel_cb(redisAsyncContext *ac, void *reply, void *handle)
{
    pq_slot_t *s = pq_slot_replied(ac, reply, handle);

    if (s && (s->state == PQ_SLOT_CANCEL_READ || s->state == PQ_SLOT_CANCEL_CAS))
        pq_jobs_cancel_reply(s, reply);
}

void pq_jobs_get(pq_bthread_t *t, struct evhttp_request *req, const char *id)
{
    char tenant[PQ_TENANT_MAX + 1], key[512];
    pq_slot_t *s;

    if (pq_api_tenant(t, req, PQ_PATH_JOB, tenant, sizeof(tenant)))
        return;
    s = job_slot_open(t, req, id, tenant, key, sizeof(key));
    if (!s)
        return;
    if (pq_rconn_sendf(t, get_cb, pq_slot_handle(s), "HGETALL %s", key)) {
        job_unavailable(t, req, "job store (Redis) unavailable");
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
    job_unavailable(t, s->req, "job store (Redis) did not answer");
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
    const char *cb = NULL, *cb_attempts = NULL, *cb_error = NULL;
    size_t result_len = 0;
    json_t *doc;

    if (!reply || reply->type != REDIS_REPLY_ARRAY) {
        pq_counter_add(t->b->m_redis_errors, 1);
        job_unavailable(t, s->req, "job store (Redis) failed");
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
        else if (!strcmp(k->str, "callback"))
            cb = v->str;
        else if (!strcmp(k->str, "callback_attempts"))
            cb_attempts = v->str;
        else if (!strcmp(k->str, "callback_error"))
            cb_error = v->str;
    }
    if (!status) {
        pq_http_error(t, s->req, PQ_PATH_JOB, 404, "not_found", "no such job");
        goto out;
    }
    if (cb) {
        /* the callback's state rides in headers: the body stays the record, verbatim */
        struct evkeyvalq *h = evhttp_request_get_output_headers(s->req);

        evhttp_add_header(h, "x-promptq-callback", cb);
        if (cb_attempts)
            evhttp_add_header(h, "x-promptq-callback-attempts", cb_attempts);
        if (cb_error && *cb_error && !strpbrk(cb_error, "\r\n"))
            evhttp_add_header(h, "x-promptq-callback-error", cb_error);
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
    pq_http_reply_json(s, 200, doc);
out:
    pq_slot_release(s);
}

/* ---- DELETE /v1/jobs/{id} ---- */

void pq_jobs_delete(pq_bthread_t *t, struct evhttp_request *req, const char *id)
{
    char tenant[PQ_TENANT_MAX + 1], key[512];
    pq_slot_t *s;

    if (pq_api_tenant(t, req, PQ_PATH_JOB, tenant, sizeof(tenant)))
        return;
    if (pq_http_ratelimit(t, req, PQ_PATH_JOB, tenant))
        return;
    s = job_slot_open(t, req, id, tenant, key, sizeof(key));
    if (!s)
        return;
    if (pq_rconn_sendf(t, cancel_cb, pq_slot_handle(s), "HMGET %s status route created_at attempts",
                       key)) {
        job_unavailable(t, req, "job store (Redis) unavailable");
        pq_slot_release(s);
        return;
    }
    s->state = PQ_SLOT_CANCEL_READ;
    event_add(&s->timer, t->tv_redis);
}

static const char *str_el(const redisReply *r, size_t i)
{
    return i < r->elements && r->element[i]->type == REDIS_REPLY_STRING ? r->element[i]->str : NULL;
}

static void not_cancellable(pq_slot_t *s, const char *status)
{
    pq_http_error(s->t, s->req, PQ_PATH_JOB, 409, "not_cancellable",
                  "job %s is %s: only queued or parked jobs can be cancelled", s->id, status);
    pq_slot_release(s);
}

/* The result record of a cancelled job (same fields as the worker's). */
static char *cancel_result(pq_slot_t *s, const char *route, const char *created,
                           const char *attempts, size_t *len)
{
    int64_t now = pq_now_ms(), c = created ? strtoll(created, NULL, 10) : now;
    char created_s[40], completed_s[40];
    json_t *o;
    char *text;

    pq_time_format(c, created_s, sizeof(created_s));
    pq_time_format(now, completed_s, sizeof(completed_s));
    o = json_pack("{s:s, s:s, s:s, s:o, s:n, s:n, s:I, s:{s:s, s:s, s:n, s:n}, s:n, s:I, s:s, "
                  "s:s, s:n}",
                  "id", s->id, "tenant", s->tenant, "status", "cancelled", "route",
                  route ? json_string(route) : json_null(), "provider", "model", "attempts",
                  (json_int_t)(attempts ? strtoll(attempts, NULL, 10) : 0), "error", "type",
                  "cancelled", "message", "cancelled by the client", "provider", "status",
                  "metadata", "latency_ms", (json_int_t)(now > c ? now - c : 0), "created_at",
                  created_s, "completed_at", completed_s, "source");
    text = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    *len = text ? strlen(text) : 0;
    return text;
}

static void cancel_answer(pq_slot_t *s)
{
    pq_http_reply(s->t, s->req, PQ_PATH_JOB, 200, s->payload, s->payload_len);
    pq_slot_release(s);
}

static void cancel_publish(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;
    rd_kafka_resp_err_t err;

    pq_counter_add(t->b->m_cancelled, 1);
    if (!t->rk || !t->rkt_results || t->kafka_fatal) {
        /* a worker that meets the job re-publishes the stored result */
        cancel_answer(s);
        return;
    }
    err = rd_kafka_producev(
        t->rk, RD_KAFKA_V_RKT(t->rkt_results), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
        RD_KAFKA_V_VALUE(s->payload, s->payload_len), RD_KAFKA_V_KEY(s->id, strlen(s->id)),
        RD_KAFKA_V_OPAQUE(pq_slot_handle(s)), RD_KAFKA_V_END);
    if (err) {
        PQ_WARN("job %s/%s cancelled; result not produced now (%s): a worker re-publishes it",
                s->tenant, s->id, rd_kafka_err2str(err));
        cancel_answer(s);
        return;
    }
    s->state = PQ_SLOT_CANCEL_PUB;
    event_del(&s->timer);
    event_add(&s->timer, t->tv_ack);
}

void pq_jobs_cancel_reply(pq_slot_t *s, const void *r)
{
    const redisReply *reply = r;
    pq_bthread_t *t = s->t;

    event_del(&s->timer);
    if (!reply || reply->type == REDIS_REPLY_ERROR ||
        (s->state == PQ_SLOT_CANCEL_READ && reply->type != REDIS_REPLY_ARRAY)) {
        pq_jobs_timeout(s);
        return;
    }
    if (s->state == PQ_SLOT_CANCEL_READ) {
        const char *status = str_el(reply, 0);
        const char *argv[8];
        size_t argvlen[8];
        char key[512], cbkey[256], now[24],
            err[] = "{\"type\":\"cancelled\",\"message\":\"cancelled by "
                    "the client\",\"provider\":null,\"status\":null}";

        if (!status) {
            pq_http_error(t, s->req, PQ_PATH_JOB, 404, "not_found", "no such job");
            pq_slot_release(s);
            return;
        }
        if (strcmp(status, "queued") != 0 && strcmp(status, "parked") != 0) {
            not_cancellable(s, status);
            return;
        }
        s->payload =
            cancel_result(s, str_el(reply, 1), str_el(reply, 2), str_el(reply, 3), &s->payload_len);
        if (!s->payload ||
            pq_key_job(key, sizeof(key), t->bc->conf->redis_prefix, s->tenant, s->id) < 0 ||
            pq_key_callbacks(cbkey, sizeof(cbkey), t->bc->conf->redis_prefix) < 0) {
            pq_http_error(t, s->req, PQ_PATH_JOB, 500, "internal", "out of memory");
            pq_slot_release(s);
            return;
        }
        snprintf(now, sizeof(now), "%lld", (long long)pq_now_ms());
        argv[0] = "EVALSHA";
        argv[1] = pq_rconn_sha(pq_bscript_cancel);
        argv[2] = "2";
        argv[3] = key;
        argv[4] = cbkey;
        argv[5] = s->payload;
        argv[6] = err;
        argv[7] = now;
        for (int i = 0; i < 8; i++)
            argvlen[i] = strlen(argv[i]);
        argvlen[5] = s->payload_len;
        if (pq_rconn_send(t, cancel_cb, pq_slot_handle(s), 8, argv, argvlen)) {
            pq_jobs_timeout(s);
            return;
        }
        s->state = PQ_SLOT_CANCEL_CAS;
        event_add(&s->timer, t->tv_redis);
        return;
    }
    /* CANCEL_CAS */
    if (reply->type == REDIS_REPLY_INTEGER && reply->integer == 1) {
        cancel_publish(s);
    } else if (reply->type == REDIS_REPLY_STRING && reply->len == 0) {
        pq_http_error(t, s->req, PQ_PATH_JOB, 404, "not_found", "no such job");
        pq_slot_release(s);
    } else if (reply->type == REDIS_REPLY_STRING) {
        not_cancellable(s, reply->str);
    } else {
        pq_jobs_timeout(s);
    }
}

void pq_jobs_cancel_delivered(pq_bthread_t *t, const rd_kafka_message_t *m)
{
    pq_slot_t *s = pq_slot_from_handle(t, m->_private);

    if (m->err)
        PQ_WARN("cancelled result not delivered to %s: %s (a worker re-publishes it)",
                rd_kafka_topic_name(m->rkt), rd_kafka_err2str(m->err));
    if (s && s->state == PQ_SLOT_CANCEL_PUB)
        cancel_answer(s);
}

void pq_jobs_cancel_timeout(pq_slot_t *s)
{
    if (s->state == PQ_SLOT_CANCEL_PUB) {
        /* the cancel is recorded; Kafka is slow: the worker re-publishes if this is lost */
        cancel_answer(s);
        return;
    }
    pq_jobs_timeout(s);
}

/* ---- GET /v1/jobs?status=&after=&limit= ---- */

#define JOBS_LIST_DEFAULT 20
#define JOBS_LIST_MAX     100
/* Index entries one page may scan, per entry asked for (a rare status, expired records). */
#define JOBS_LIST_SCAN_FACTOR 20
/* Values per job in the script's answer: id, status, route, created_at, updated_at, attempts,
 * provider, model. */
#define JOBS_LIST_NVALUES 8

static const char *const job_statuses[] = {"queued", "running", "parked",   "succeeded",
                                           "failed", "expired", "cancelled"};

/* The listing's parameters from a query string (NULL: none). Pure. Returns 0, or -1 with a
 * message naming the bad parameter in why. *status is one of job_statuses or NULL. */
static int list_query(const char *q, long *limit, char *after, size_t after_size,
                      const char **status, char *why, size_t why_size)
{
    struct evkeyvalq params;
    const char *v;
    int rc = -1;

    *limit = JOBS_LIST_DEFAULT;
    *status = NULL;
    after[0] = '\0';
    if (!q)
        return 0;
    if (evhttp_parse_query_str(q, &params) != 0) {
        snprintf(why, why_size, "query string: malformed");
        return -1;
    }
    v = evhttp_find_header(&params, "limit");
    if (v) {
        char *end;

        *limit = isdigit((unsigned char)v[0]) ? strtol(v, &end, 10) : -1;
        if (*limit < 1 || *limit > JOBS_LIST_MAX || *end) {
            snprintf(why, why_size, "limit: must be an integer from 1 to %d", JOBS_LIST_MAX);
            goto out;
        }
    }
    v = evhttp_find_header(&params, "status");
    if (v && *v) {
        for (size_t i = 0; i < sizeof(job_statuses) / sizeof(job_statuses[0]); i++)
            if (!strcmp(v, job_statuses[i]))
                *status = job_statuses[i];
        if (!*status) {
            snprintf(why, why_size,
                     "status: must be one of queued, running, parked, succeeded, failed, "
                     "expired, cancelled");
            goto out;
        }
    }
    v = evhttp_find_header(&params, "after");
    if (v && *v) {
        if (!pq_id_valid(v) || strlen(v) >= after_size) {
            snprintf(why, why_size, "after: not a job id");
            goto out;
        }
        pq_strlcpy(after, v, after_size);
    }
    rc = 0;
out:
    evhttp_clear_headers(&params);
    return rc;
}

static const char *list_str(const redisReply *r, size_t i)
{
    return i < r->elements && r->element[i]->type == REDIS_REPLY_STRING ? r->element[i]->str : NULL;
}

static json_t *opt_string(const char *v)
{
    return v && *v ? json_string(v) : json_null();
}

/* One data item: the fields GET /v1/jobs/{id} answers for a job in progress, plus provider and
 * model (the target that answered) once it is terminal. v: the script's 8 values. */
static json_t *list_item(const redisReply *r, size_t at)
{
    const char *id = list_str(r, at), *status = list_str(r, at + 1);
    const char *attempts = list_str(r, at + 5);
    json_t *o;

    if (!id || !status)
        return NULL;
    o = json_pack("{s:s, s:s, s:s, s:o, s:o, s:o, s:I}", "id", id, "object", "job", "status",
                  status, "route", opt_string(list_str(r, at + 2)), "created_at",
                  time_field(list_str(r, at + 3)), "updated_at", time_field(list_str(r, at + 4)),
                  "attempts", (json_int_t)(attempts ? strtoll(attempts, NULL, 10) : 0));
    if (o && is_terminal(status)) {
        json_object_set_new(o, "provider", opt_string(list_str(r, at + 6)));
        json_object_set_new(o, "model", opt_string(list_str(r, at + 7)));
    }
    return o;
}

static void list_reply(pq_slot_t *s, const void *r)
{
    const redisReply *reply = r;
    pq_bthread_t *t = s->t;
    const char *cursor;
    json_t *data, *o, *item;
    size_t k;

    if (reply->type != REDIS_REPLY_ARRAY || reply->elements < 1 ||
        reply->element[0]->type != REDIS_REPLY_INTEGER) {
        pq_api_timeout(s);
        return;
    }
    if (reply->element[0]->integer == 0) {
        pq_http_error(t, s->req, PQ_PATH_JOBS, 400, "invalid_request",
                      "after: job %s is not in the listing (unknown, or expired)", s->id);
        goto out;
    }
    if (reply->elements < 3 || reply->element[1]->type != REDIS_REPLY_INTEGER) {
        pq_api_timeout(s);
        return;
    }
    cursor = list_str(reply, 2);
    data = json_array();
    for (size_t i = 3; data && i + JOBS_LIST_NVALUES <= reply->elements; i += JOBS_LIST_NVALUES) {
        item = list_item(reply, i);
        if (item)
            json_array_append_new(data, item);
    }
    k = json_array_size(data);
    o = data ? json_pack("{s:s, s:o, s:b}", "object", "list", "data", data, "has_more",
                         reply->element[1]->integer != 0)
             : NULL;
    if (o) {
        json_object_set_new(o, "first_id",
                            k ? json_deep_copy(json_object_get(json_array_get(data, 0), "id"))
                              : json_null());
        json_object_set_new(
            o, "last_id",
            cursor && *cursor
                ? json_string(cursor)
                : (k ? json_deep_copy(json_object_get(json_array_get(data, k - 1), "id"))
                     : json_null()));
    }
    pq_http_reply_json(s, 200, o);
out:
    pq_slot_release(s);
}

void pq_jobs_list(pq_bthread_t *t, struct evhttp_request *req)
{
    const char *prefix = t->bc->conf->redis_prefix, *status, *argv[9];
    char tenant[PQ_TENANT_MAX + 1], after[PQ_ID_MAX + 1], why[160];
    char ikey[512], pfx[512], limit_s[24], cap_s[24];
    size_t lens[9];
    long limit;
    pq_slot_t *s;

    if (pq_api_tenant(t, req, PQ_PATH_JOBS, tenant, sizeof(tenant)))
        return;
    if (list_query(evhttp_uri_get_query(evhttp_request_get_evhttp_uri(req)), &limit, after,
                   sizeof(after), &status, why, sizeof(why))) {
        pq_http_error(t, req, PQ_PATH_JOBS, 400, "invalid_request", "%s", why);
        return;
    }
    if (!pq_rconn_usable(t) || pq_key_jobs(ikey, sizeof(ikey), prefix, tenant) < 0 ||
        pq_key_job(pfx, sizeof(pfx), prefix, tenant, "") < 0) {
        pq_api_unavailable(t, req, PQ_PATH_JOBS);
        return;
    }
    s = pq_slot_get(t, PQ_PATH_JOBS, req, &pq_api_ops);
    if (!s) {
        pq_api_unavailable(t, req, PQ_PATH_JOBS);
        return;
    }
    pq_strlcpy(s->id, after, sizeof(s->id));
    pq_strlcpy(s->tenant, tenant, sizeof(s->tenant));
    snprintf(limit_s, sizeof(limit_s), "%ld", limit);
    snprintf(cap_s, sizeof(cap_s), "%ld", limit * JOBS_LIST_SCAN_FACTOR);
    argv[0] = "EVALSHA";
    argv[1] = pq_rconn_sha(pq_bscript_jobs_list);
    argv[2] = "1";
    argv[3] = ikey;
    argv[4] = pfx;
    argv[5] = after;
    argv[6] = limit_s;
    argv[7] = status ? status : "";
    argv[8] = cap_s;
    for (int i = 0; i < 9; i++)
        lens[i] = strlen(argv[i]);
    if (pq_api_send(s, list_reply, 9, argv, lens)) {
        pq_api_unavailable(t, req, PQ_PATH_JOBS);
        pq_slot_release(s);
    }
}
