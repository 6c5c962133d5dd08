/* POST /v1/chat/completions: OpenAI-compatible and durable (DESIGN.md §5, §9).
 *
 * The body is queued on the interactive lane exactly like a job (same intake: job_create,
 * produce, or spool; id job_+ULID; tenant from the API key) with reply_to set to this process's
 * channel. Once the job is durable the request becomes a waiter: it is linked into the loop's
 * waiter table under (tenant, id) and, if the loop's subscription is confirmed, reads the job
 * record once (it may be terminal already). A message "<tenant>:<id>" on the channel makes the
 * waiters of that job read the record again; a confirmed (re)subscription makes every waiter
 * read it again. Reads are therefore proportional to jobs and notifications, never to the time
 * waited (no polling). A read that fails is retried by a short timer that runs only while some
 * waiter needs it.
 *
 * Answers, all with x-promptq-job-id:
 *   succeeded  200, the stored chat.completion with "id" set to the job id (so the id a client
 *              sees is the one GET /v1/jobs/{id} knows; the provider's id is not kept), or for
 *              "stream": true server-sent events of that result: per choice a role chunk, a
 *              content chunk (content, refusal, tool_calls) and a finish chunk, then a usage
 *              chunk with empty choices if stream_options.include_usage (as OpenAI sends it),
 *              then "data: [DONE]";
 *   failed     400 invalid_request_error (the provider refused the request; code
 *              content_filter and context_length_exceeded carry the provider's reason, which
 *              the worker sanitised), 502 upstream_error (provider failures), 409 (id
 *              conflict), 500 server_error (internal), with the worker's error type as "code"
 *              and never a provider's raw error text;
 *   expired    504 code "expired", x-should-retry: false;
 *   cancelled  409 code "cancelled", x-should-retry: false;
 *   wait timeout (broker.sync_timeout_ms) 504 code "timeout", x-should-retry: false; the job
 *              still completes (GET /v1/jobs/{id});
 *   not durable 503 + Retry-After (intake).
 * A client that disconnects while waiting frees its waiter at once (connection close
 * callback). */
#include "broker.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/keyvalq_struct.h>
#include <hiredis/hiredis.h>

#include "promptq/keys.h"
#include "promptq/log.h"
#include "promptq/util.h"

#define WAIT_BUCKETS_MIN 1024
#define REREAD_MS        200

/* ---- errors ---- */

static void openai_error(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, int code,
                         const char *type, const char *errcode, const char *fmt, va_list ap)
{
    char msg[512], esc[1024], body[1400];
    int n;

    vsnprintf(msg, sizeof(msg), fmt, ap);
    pq_http_json_escape(esc, sizeof(esc), msg);
    if (errcode)
        n = snprintf(body, sizeof(body),
                     "{\"error\":{\"message\":\"%s\",\"type\":\"%s\",\"param\":null,"
                     "\"code\":\"%s\"}}",
                     esc, type, errcode);
    else
        n = snprintf(body, sizeof(body),
                     "{\"error\":{\"message\":\"%s\",\"type\":\"%s\",\"param\":null,"
                     "\"code\":null}}",
                     esc, type);
    if (n < 0 || (size_t)n >= sizeof(body))
        n = (int)strlen(body);
    pq_http_reply(t, req, path, code, body, (size_t)n);
}

void pq_chat_error(pq_bthread_t *t, struct evhttp_request *req, int code, const char *type,
                   const char *errcode, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    openai_error(t, req, PQ_PATH_CHAT, code, type, errcode, fmt, ap);
    va_end(ap);
}

static void model_not_found(pq_bthread_t *t, struct evhttp_request *req, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void model_not_found(pq_bthread_t *t, struct evhttp_request *req, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    openai_error(t, req, PQ_PATH_MODEL, 404, "invalid_request_error", "model_not_found", fmt, ap);
    va_end(ap);
}

/* ---- waiter table ---- */

static pq_slot_t *slot_at(pq_bthread_t *t, uint32_t idx)
{
    uint32_t i = idx - 1;

    return &t->chunks[i / PQ_BROKER_SLOT_CHUNK][i % PQ_BROKER_SLOT_CHUNK];
}

static uint32_t wait_hash(const char *tenant, const char *id)
{
    uint32_t h = 2166136261u;

    for (const char *p = tenant; *p; p++)
        h = (h ^ (unsigned char)*p) * 16777619u;
    h = (h ^ (unsigned char)':') * 16777619u;
    for (const char *p = id; *p; p++)
        h = (h ^ (unsigned char)*p) * 16777619u;
    return h;
}

static uint32_t msg_hash(const char *msg, size_t len)
{
    uint32_t h = 2166136261u;

    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)msg[i]) * 16777619u;
    return h;
}

/* 1 if "<tenant>:<id>" equals msg. */
static int wait_match(const pq_slot_t *s, const char *msg, size_t len)
{
    size_t tl = strlen(s->tenant), il = strlen(s->id);

    return tl + 1 + il == len && !memcmp(msg, s->tenant, tl) && msg[tl] == ':' &&
           !memcmp(msg + tl + 1, s->id, il);
}

static int table_grow(pq_bthread_t *t)
{
    uint32_t n = t->nwbuckets ? t->nwbuckets * 2 : WAIT_BUCKETS_MIN;
    uint32_t *b = calloc(n, sizeof(*b));

    if (!b)
        return -1;
    for (uint32_t i = 0; i < t->nwbuckets; i++) {
        uint32_t idx = t->wbuckets[i];

        while (idx) {
            pq_slot_t *s = slot_at(t, idx);
            uint32_t next = s->wait_next;

            s->wait_next = b[s->wait_hash & (n - 1)];
            b[s->wait_hash & (n - 1)] = idx;
            idx = next;
        }
    }
    free(t->wbuckets);
    t->wbuckets = b;
    t->nwbuckets = n;
    return 0;
}

static int table_link(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;
    uint32_t *head;

    if (s->in_table)
        return 0;
    if ((t->nwaiters + 1 > t->nwbuckets * 2 || !t->nwbuckets) && table_grow(t) && !t->nwbuckets)
        return -1;
    s->wait_hash = wait_hash(s->tenant, s->id);
    head = &t->wbuckets[s->wait_hash & (t->nwbuckets - 1)];
    s->wait_next = *head;
    *head = s->idx;
    s->in_table = 1;
    t->nwaiters++;
    pq_gauge_add(t->b->m_chat_waiting, 1);
    return 0;
}

void pq_chat_unlink(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;
    uint32_t *p;

    if (!s->in_table)
        return;
    for (p = &t->wbuckets[s->wait_hash & (t->nwbuckets - 1)]; *p; p = &slot_at(t, *p)->wait_next) {
        if (*p == s->idx) {
            *p = s->wait_next;
            break;
        }
    }
    s->wait_next = 0;
    s->in_table = 0;
    s->need_read = 0;
    t->nwaiters--;
    pq_gauge_add(t->b->m_chat_waiting, -1);
}

/* ---- reading the record ---- */

static void arm_reread(pq_bthread_t *t)
{
    struct timeval tv = {0, REREAD_MS * 1000};

    if (t->reread_ev && !evtimer_pending(t->reread_ev, NULL))
        evtimer_add(t->reread_ev, &tv);
}

static void read_record(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;
    char key[512];

    if (pq_key_job(key, sizeof(key), t->bc->conf->redis_prefix, s->tenant, s->id) < 0 ||
        pq_rconn_command(t, pq_slot_handle(s), "HMGET %s status result", key)) {
        s->need_read = 1;
        arm_reread(t);
        return;
    }
    s->need_read = 0;
}

static void reread_cb(evutil_socket_t fd, short what, void *arg)
{
    pq_bthread_t *t = arg;
    int again = 0;

    if (!t->sub_ready)
        return; /* the subscription's confirmation reads every waiter */
    for (uint32_t b = 0; b < t->nwbuckets; b++) {
        for (uint32_t idx = t->wbuckets[b]; idx; idx = slot_at(t, idx)->wait_next) {
            pq_slot_t *s = slot_at(t, idx);

            if (s->need_read) {
                read_record(s);
                again |= s->need_read;
            }
        }
    }
    if (again)
        arm_reread(t);
}

void pq_chat_subscribed(pq_bthread_t *t)
{
    for (uint32_t b = 0; b < t->nwbuckets; b++)
        for (uint32_t idx = t->wbuckets[b]; idx; idx = slot_at(t, idx)->wait_next)
            read_record(slot_at(t, idx));
}

void pq_chat_notify(pq_bthread_t *t, const char *msg, size_t len)
{
    uint32_t h;

    if (!t->nwaiters)
        return;
    h = msg_hash(msg, len);
    for (uint32_t idx = t->wbuckets[h & (t->nwbuckets - 1)]; idx;
         idx = slot_at(t, idx)->wait_next) {
        pq_slot_t *s = slot_at(t, idx);

        if (s->wait_hash == h && wait_match(s, msg, len)) {
            pq_counter_add(t->b->m_chat_notified, 1);
            read_record(s);
        }
    }
}

/* ---- client disconnect ----
 *
 * evhttp stops reading a connection once it has dispatched a request, so it would notice a
 * client that hung up only when the answer is written. While a request waits, the broker
 * watches the connection's bufferevent itself: EOF or an error frees the waiter and the
 * connection at once. Writing the answer (evhttp_send_reply) installs evhttp's own callbacks
 * again. Bytes a client pipelines meanwhile stay in the input buffer for evhttp (reading
 * stops). */

static void drop_waiter(pq_slot_t *s)
{
    struct evhttp_connection *evcon = evhttp_request_get_connection(s->req);

    pq_counter_add(s->t->b->m_chat_abandoned, 1);
    PQ_DBG("job %s/%s: client went away while waiting", s->tenant, s->id);
    if (!evcon) {
        evhttp_request_free(s->req); /* detached by evhttp: nobody else frees it */
        s->req = NULL;
        pq_slot_release(s);
        return;
    }
    s->req = NULL; /* evhttp_connection_free frees it with the connection */
    pq_slot_release(s);
    evhttp_connection_free(evcon);
}

static void watch_read(struct bufferevent *bev, void *handle)
{
    bufferevent_disable(bev, EV_READ);
}

static void watch_event(struct bufferevent *bev, short what, void *handle)
{
    pq_bthread_t *t = pq_bthread_current;
    pq_slot_t *s;

    if (!(what & (BEV_EVENT_EOF | BEV_EVENT_ERROR))) {
        if (what & BEV_EVENT_TIMEOUT)
            bufferevent_enable(bev, EV_READ);
        return;
    }
    bufferevent_disable(bev, EV_READ);
    if (t && (s = pq_slot_from_handle(t, handle)) && s->state == PQ_SLOT_WAIT && s->req)
        drop_waiter(s);
}

static void watch_client(pq_slot_t *s)
{
    struct evhttp_connection *evcon = evhttp_request_get_connection(s->req);
    struct bufferevent *bev = evcon ? evhttp_connection_get_bufferevent(evcon) : NULL;

    if (!bev)
        return;
    bufferevent_setcb(bev, watch_read, NULL, watch_event, pq_slot_handle(s));
    bufferevent_enable(bev, EV_READ);
}

/* Connection closed by evhttp itself (e.g. a detached request): drop the waiter. */
static void on_close(struct evhttp_connection *evcon, void *handle)
{
    pq_bthread_t *t = pq_bthread_current;
    pq_slot_t *s;

    if (!t || !(s = pq_slot_from_handle(t, handle)) || s->path != PQ_PATH_CHAT ||
        s->state != PQ_SLOT_WAIT || !s->req || evhttp_request_get_connection(s->req))
        return;
    pq_counter_add(t->b->m_chat_abandoned, 1);
    evhttp_request_free(s->req);
    s->req = NULL;
    pq_slot_release(s);
}

/* ---- answers ---- */

static void reply_json(pq_slot_t *s, int code, json_t *doc)
{
    char *text = json_dumps(doc, JSON_COMPACT);

    if (!text) {
        pq_chat_error(s->t, s->req, 500, "server_error", "internal", "out of memory");
        return;
    }
    pq_http_reply(s->t, s->req, PQ_PATH_CHAT, code, text, strlen(text));
    free(text);
}

static int sse_chunk(struct evbuffer *out, json_t *chunk)
{
    char *text = chunk ? json_dumps(chunk, JSON_COMPACT) : NULL;
    int rc = -1;

    if (text) {
        rc = evbuffer_add_printf(out, "data: %s\n\n", text) < 0 ? -1 : 0;
        free(text);
    }
    json_decref(chunk);
    return rc;
}

/* A chunk skeleton with the response's id, created, model (and system_fingerprint). */
static json_t *chunk_new(json_t *resp, const char *id, json_t *choices, int with_usage)
{
    json_t *c = json_object();
    json_t *v;

    if (!c) {
        json_decref(choices);
        return NULL;
    }
    json_object_set_new(c, "id", json_string(id));
    json_object_set_new(c, "object", json_string("chat.completion.chunk"));
    v = json_object_get(resp, "created");
    json_object_set_new(c, "created",
                        json_is_integer(v) ? json_copy(v) : json_integer(pq_now_ms() / 1000));
    v = json_object_get(resp, "model");
    json_object_set_new(c, "model", json_is_string(v) ? json_copy(v) : json_string(""));
    v = json_object_get(resp, "system_fingerprint");
    if (v)
        json_object_set(c, "system_fingerprint", v);
    json_object_set_new(c, "choices", choices);
    if (with_usage)
        json_object_set_new(c, "usage", json_null());
    return c;
}

static json_t *choice_delta(json_int_t index, json_t *delta, json_t *finish)
{
    return json_pack("[{s:I, s:o, s:n, s:o}]", "index", index, "delta", delta, "logprobs",
                     "finish_reason", finish ? finish : json_null());
}

/* Server-sent events of a finished chat.completion (see the file comment). */
static int reply_stream(pq_slot_t *s, json_t *resp)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(s->req);
    struct evkeyvalq *h = evhttp_request_get_output_headers(s->req);
    json_t *choices = json_object_get(resp, "choices");
    int u = s->include_usage;
    size_t i;
    json_t *c;

    json_array_foreach(choices, i, c)
    {
        json_t *msg = json_object_get(c, "message");
        json_t *idx = json_object_get(c, "index");
        json_int_t index = json_is_integer(idx) ? json_integer_value(idx) : (json_int_t)i;
        json_t *delta, *v, *fr;

        if (sse_chunk(out, chunk_new(resp, s->id,
                                     choice_delta(index,
                                                  json_pack("{s:s, s:s}", "role", "assistant",
                                                            "content", ""),
                                                  NULL),
                                     u)))
            return -1;
        delta = json_object();
        v = json_object_get(msg, "content");
        if (json_is_string(v))
            json_object_set(delta, "content", v);
        v = json_object_get(msg, "refusal");
        if (json_is_string(v))
            json_object_set(delta, "refusal", v);
        v = json_object_get(msg, "tool_calls");
        if (json_is_array(v)) {
            json_t *calls = json_deep_copy(v), *call;
            size_t k;

            json_array_foreach(calls, k, call)
            {
                if (json_is_object(call))
                    json_object_set_new(call, "index", json_integer((json_int_t)k));
            }
            json_object_set_new(delta, "tool_calls", calls);
        }
        if (json_object_size(delta) > 0) {
            if (sse_chunk(out, chunk_new(resp, s->id, choice_delta(index, delta, NULL), u)))
                return -1;
        } else {
            json_decref(delta);
        }
        fr = json_object_get(c, "finish_reason");
        if (sse_chunk(out, chunk_new(resp, s->id,
                                     choice_delta(index, json_object(),
                                                  json_is_string(fr) ? json_copy(fr)
                                                                     : json_string("stop")),
                                     u)))
            return -1;
    }
    if (u) {
        json_t *last = chunk_new(resp, s->id, json_array(), 0);
        json_t *usage = json_object_get(resp, "usage");

        if (last)
            json_object_set(last, "usage", usage ? usage : json_null());
        if (sse_chunk(out, last))
            return -1;
    }
    if (evbuffer_add(out, "data: [DONE]\n\n", 14))
        return -1;
    evhttp_add_header(h, "Content-Type", "text/event-stream");
    evhttp_add_header(h, "Cache-Control", "no-cache");
    pq_http_reply(s->t, s->req, PQ_PATH_CHAT, 200, NULL, 0);
    return 0;
}

static void no_retry(pq_slot_t *s)
{
    evhttp_add_header(evhttp_request_get_output_headers(s->req), "x-should-retry", "false");
}

static void reply_failed(pq_slot_t *s, json_t *err)
{
    const char *type = json_string_value(json_object_get(err, "type"));
    const char *provider = json_string_value(json_object_get(err, "provider"));
    const char *reason = json_string_value(json_object_get(err, "reason"));
    json_t *st = json_object_get(err, "status");
    char detail[160] = "";

    if (!type)
        type = "internal";
    if (json_is_integer(st))
        snprintf(detail, sizeof(detail), " (provider %s answered HTTP %lld)",
                 provider ? provider : "?", (long long)json_integer_value(st));
    else if (provider)
        snprintf(detail, sizeof(detail), " (last provider %s)", provider);
    if (!strcmp(type, "content_filter") || !strcmp(type, "context_length_exceeded")) {
        /* the provider's reason (sanitised by the worker) is what the client needs to see */
        no_retry(s);
        pq_chat_error(s->t, s->req, 400, "invalid_request_error", type, "%s%s; job %s failed",
                      reason && *reason ? reason
                      : !strcmp(type, "content_filter")
                          ? "the provider's content policy refused the request"
                          : "the prompt is longer than the model's context window",
                      detail, s->id);
    } else if (!strcmp(type, "invalid_request") || !strcmp(type, "refused") ||
               !strcmp(type, "unsupported") || !strcmp(type, "not_found")) {
        no_retry(s);
        pq_chat_error(s->t, s->req, 400, "invalid_request_error", type,
                      "the provider refused the request%s%s%s; job %s failed", detail,
                      reason && *reason ? ": " : "", reason && *reason ? reason : "", s->id);
    } else if (!strcmp(type, "id_conflict")) {
        no_retry(s);
        pq_chat_error(s->t, s->req, 409, "invalid_request_error", type,
                      "job id %s was used with another request", s->id);
    } else if (!strcmp(type, "connect") || !strcmp(type, "timeout") ||
               !strcmp(type, "rate_limited") || !strcmp(type, "server_error") ||
               !strcmp(type, "overloaded") || !strcmp(type, "malformed") ||
               !strcmp(type, "unavailable") || !strcmp(type, "circuit_open") ||
               !strcmp(type, "authentication") || !strcmp(type, "too_large")) {
        pq_chat_error(s->t, s->req, 502, "upstream_error", type,
                      "the model provider failed (%s)%s; job %s failed", type, detail, s->id);
    } else {
        pq_chat_error(s->t, s->req, 500, "server_error", type, "job %s failed (%s)", s->id, type);
    }
}

/* Answers from a terminal record's result JSON. */
static void answer(pq_slot_t *s, const char *status, const char *result, size_t len)
{
    pq_bthread_t *t = s->t;
    json_error_t jerr;
    /* JSON_ALLOW_NUL: a provider's content may hold "\u0000", stored escaped */
    json_t *doc = json_loadb(result, len, JSON_ALLOW_NUL, &jerr), *resp;

    if (!json_is_object(doc)) {
        /* jansson's text quotes the record's bytes (a prompt's answer): name the error only */
        PQ_WARN("job %s/%s: result record unreadable: %s", s->tenant, s->id,
                pq_json_error_what(&jerr));
        pq_chat_error(t, s->req, 500, "server_error", "internal", "result of job %s unreadable",
                      s->id);
        goto out;
    }
    if (!strcmp(status, "succeeded")) {
        resp = json_object_get(doc, "response");
        if (!json_is_object(resp)) {
            pq_chat_error(t, s->req, 500, "server_error", "internal",
                          "job %s succeeded without a response", s->id);
            goto out;
        }
        json_object_set_new(resp, "id", json_string(s->id));
        if (s->stream) {
            if (reply_stream(s, resp)) {
                evbuffer_drain(evhttp_request_get_output_buffer(s->req),
                               evbuffer_get_length(evhttp_request_get_output_buffer(s->req)));
                pq_chat_error(t, s->req, 500, "server_error", "internal", "out of memory");
            }
        } else {
            reply_json(s, 200, resp);
        }
    } else if (!strcmp(status, "failed")) {
        reply_failed(s, json_object_get(doc, "error"));
    } else if (!strcmp(status, "expired")) {
        no_retry(s);
        pq_chat_error(t, s->req, 504, "timeout", "expired",
                      "job %s expired (its deadline or park TTL passed) before a provider "
                      "answered",
                      s->id);
    } else {
        no_retry(s);
        pq_chat_error(t, s->req, 409, "invalid_request_error", "cancelled", "job %s was cancelled",
                      s->id);
    }
out:
    json_decref(doc);
    pq_slot_release(s);
}

static int is_terminal(const char *status)
{
    return !strcmp(status, "succeeded") || !strcmp(status, "failed") ||
           !strcmp(status, "expired") || !strcmp(status, "cancelled");
}

void pq_chat_redis_reply(pq_slot_t *s, const void *r)
{
    const redisReply *reply = r;
    const redisReply *st, *res;

    if (!reply) {
        /* the command connection went away: read again once it is back */
        s->need_read = 1;
        arm_reread(s->t);
        return;
    }
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2)
        return; /* e.g. a late job_create answer */
    st = reply->element[0];
    res = reply->element[1];
    if (st->type != REDIS_REPLY_STRING || !is_terminal(st->str))
        return; /* not finished yet: the worker's message wakes us */
    if (res->type != REDIS_REPLY_STRING || res->len == 0) {
        pq_chat_error(s->t, s->req, 500, "server_error", "internal",
                      "job %s is %s without a result record", s->id, st->str);
        pq_slot_release(s);
        return;
    }
    answer(s, st->str, res->str, res->len);
}

void pq_chat_timeout(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;

    pq_counter_add(t->b->m_chat_timeouts, 1);
    no_retry(s);
    pq_chat_error(t, s->req, 504, "timeout", "timeout",
                  "job %s did not finish within %d ms; it still completes: GET /v1/jobs/%s", s->id,
                  t->bc->conf->sync_timeout_ms, s->id);
    pq_slot_release(s);
}

void pq_chat_stop_waiters(pq_bthread_t *t)
{
    for (uint32_t i = 1; i <= t->nslots; i++) {
        pq_slot_t *s = slot_at(t, i);

        if (s->state == PQ_SLOT_WAIT)
            pq_chat_timeout(s);
    }
}

void pq_chat_wait(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;
    int64_t left = s->deadline_ms - pq_mono_ms();
    struct timeval tv;

    s->state = PQ_SLOT_WAIT;
    event_del(&s->timer);
    if (left <= 0) {
        pq_chat_timeout(s);
        return;
    }
    if (table_link(s)) {
        pq_chat_error(t, s->req, 500, "server_error", "internal", "out of memory");
        pq_slot_release(s);
        return;
    }
    tv.tv_sec = left / 1000;
    tv.tv_usec = (left % 1000) * 1000;
    event_add(&s->timer, &tv);
    watch_client(s);
    /* Subscribed first, then read: a result written before we were linked is seen by the
     * read, one written after by the message. Not subscribed yet: the confirmation reads. */
    if (t->sub_ready)
        read_record(s);
}

/* ---- POST /v1/chat/completions ---- */

void pq_chat_post(pq_bthread_t *t, struct evhttp_request *req)
{
    const pq_bconf_t *bc = t->bc;
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    pq_envelope_t env;
    const char *key_tenant, *tenant, *idem = NULL, *body;
    char errstr[256], idbuf[PQ_JOB_ID_LEN + 1];
    json_t *so;
    pq_slot_t *s;
    pq_err_t err;
    int stream, include_usage;

    memset(&env, 0, sizeof(env));
    if (pq_http_auth(t, req, PQ_PATH_CHAT, &key_tenant))
        return;
    tenant = key_tenant ? key_tenant : "default";
    if (pq_http_ratelimit(t, req, PQ_PATH_CHAT, tenant))
        return;
    if (pq_idem_header(t, req, PQ_PATH_CHAT, &idem))
        return;
    if (len > bc->max_body) {
        pq_chat_error(t, req, 413, "invalid_request_error", "too_large",
                      "request body of %zu bytes exceeds the limit of %zu bytes", len,
                      bc->max_body);
        return;
    }
    body = len ? (const char *)evbuffer_pullup(in, -1) : "";
    err = pq_envelope_parse(body, len, &bc->limits, &env, errstr, sizeof(errstr));
    if (err == PQ_ERR_TOO_LARGE) {
        pq_chat_error(t, req, 413, "invalid_request_error", "too_large", "%s", errstr);
        return;
    }
    if (err != PQ_OK) {
        pq_chat_error(t, req, 400, "invalid_request_error", "invalid_request", "%s", errstr);
        return;
    }
    /* A chat body is wrapped as {"request": body}; anything else is a job envelope. */
    if (json_object_size(env.root) != 1) {
        pq_chat_error(t, req, 400, "invalid_request_error", "invalid_request",
                      "expected a chat completions body (model, messages, ...), not a job "
                      "envelope: use POST /v1/jobs");
        goto out;
    }
    if (!pq_conf_route(bc->conf, env.model) || strlen(env.model) > PQ_BROKER_ROUTE_MAX) {
        pq_chat_error(t, req, 404, "invalid_request_error", "model_not_found",
                      "The model `%s` does not exist or you do not have access to it.", env.model);
        goto out;
    }
    stream = json_is_true(json_object_get(env.request, "stream"));
    so = json_object_get(env.request, "stream_options");
    include_usage = stream && json_is_true(json_object_get(so, "include_usage"));
    /* The broker streams the final result itself: the job asks for a whole answer. */
    json_object_del(env.request, "stream");
    json_object_del(env.request, "stream_options");
    pq_id_generate(idbuf);
    if (pq_request_hash(env.request, env.request_hash) || pq_envelope_set_tenant(&env, tenant) ||
        pq_envelope_set_id(&env, idbuf) || pq_envelope_set_reply_to(&env, t->b->reply_channel)) {
        pq_chat_error(t, req, 500, "server_error", "internal", "cannot build the job");
        goto out;
    }

    s = pq_intake_slot_get(t, req, PQ_PATH_CHAT, &env, tenant);
    if (!s)
        goto out;
    s->stream = (unsigned)stream;
    s->include_usage = (unsigned)include_usage;
    s->deadline_ms = pq_mono_ms() + bc->conf->sync_timeout_ms;
    evhttp_add_header(evhttp_request_get_output_headers(req), "x-promptq-job-id", s->id);
    evhttp_connection_set_closecb(evhttp_request_get_connection(req), on_close, pq_slot_handle(s));
    s->payload = pq_envelope_dump(&env, &s->payload_len);
    pq_envelope_clear(&env);
    if (!s->payload) {
        pq_chat_error(t, req, 500, "server_error", "internal", "cannot serialise the job");
        pq_slot_release(s);
        return;
    }
    pq_intake_start(s, idem, body, len);
    return;
out:
    pq_envelope_clear(&env);
}

/* ---- GET /v1/models ---- */

static json_t *model_object(const pq_broker_t *b, const char *name)
{
    return json_pack("{s:s, s:s, s:I, s:s}", "id", name, "object", "model", "created",
                     (json_int_t)b->started_s, "owned_by", "promptq");
}

void pq_models_get(pq_bthread_t *t, struct evhttp_request *req, const char *id)
{
    const pq_conf_t *conf = t->bc->conf;
    pq_path_t path = id ? PQ_PATH_MODEL : PQ_PATH_MODELS;
    const char *key_tenant;
    json_t *doc;
    char *text;

    if (pq_http_auth(t, req, path, &key_tenant))
        return;
    if (id) {
        const pq_route_t *r = pq_conf_route(conf, id);

        if (!r) {
            model_not_found(t, req,
                            "The model `%s` does not exist or you do not have access to it.", id);
            return;
        }
        doc = model_object(t->b, r->name);
    } else {
        json_t *data = json_array();

        for (size_t i = 0; data && i < conf->nroutes; i++)
            json_array_append_new(data, model_object(t->b, conf->routes[i].name));
        doc = json_pack("{s:s, s:o}", "object", "list", "data", data);
    }
    text = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
    json_decref(doc);
    if (!text) {
        pq_http_error(t, req, path, 500, "internal", "out of memory");
        return;
    }
    pq_http_reply(t, req, path, 200, text, strlen(text));
    free(text);
}

/* ---- per-loop setup ---- */

int pq_chat_thread_init(pq_bthread_t *t)
{
    t->reread_ev = evtimer_new(t->base, reread_cb, t);
    return t->reread_ev ? 0 : -1;
}

void pq_chat_thread_free(pq_bthread_t *t)
{
    if (t->reread_ev)
        event_free(t->reread_ev);
    t->reread_ev = NULL;
    free(t->wbuckets);
    t->wbuckets = NULL;
    t->nwbuckets = 0;
}
