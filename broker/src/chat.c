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
 *              then "data: [DONE]" (when the worker relayed no chunks; see "live streams");
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
 * callback).
 *
 * "stream": true (kept in the job for the worker): the 200 and the event-stream headers go out
 * as soon as the job is durable, the worker's chunks are relayed live from the job's Redis
 * Stream (see "live streams" below), and every later answer above is an event on that reply:
 * errors as {"error":{...}} events (timeout too), always ending with "data: [DONE]". */
#include "api.h"
#include "broker.h"
#include "chat.h"
#include "http.h"
#include "idem.h"
#include "intake.h"
#include "ratelimit.h"
#include "rconn.h"
#include "slot.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/keyvalq_struct.h>
#include <hiredis/adapters/libevent.h>
#include <hiredis/hiredis.h>

#include "promptq/rasync.h"
#include "promptq/jscan.h"
#include "promptq/jwrite.h"
#include "promptq/keys.h"
#include "promptq/log.h"
#include "promptq/util.h"

/* Deepest result record whose response is passed on as it is (answer_spliced). */
#define RECORD_JSON_DEPTH 80
#define WAIT_BUCKETS_MIN  1024
#define REREAD_MS         200

/* ---- errors ---- */

/* The OpenAI error body; returns its length. */
static size_t error_body(char *body, size_t size, const char *type, const char *errcode,
                         const char *fmt, va_list ap)
{
    char msg[512], esc[1024];
    int n;

    vsnprintf(msg, sizeof(msg), fmt, ap);
    pq_http_json_escape(esc, sizeof(esc), msg);
    if (errcode)
        n = snprintf(body, size,
                     "{\"error\":{\"message\":\"%s\",\"type\":\"%s\",\"param\":null,"
                     "\"code\":\"%s\"}}",
                     esc, type, errcode);
    else
        n = snprintf(body, size,
                     "{\"error\":{\"message\":\"%s\",\"type\":\"%s\",\"param\":null,"
                     "\"code\":null}}",
                     esc, type);
    if (n < 0 || (size_t)n >= size)
        n = (int)strlen(body);
    return (size_t)n;
}

static void openai_error(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, int code,
                         const char *type, const char *errcode, const char *fmt, va_list ap)
{
    char body[1400];
    size_t n = error_body(body, sizeof(body), type, errcode, fmt, ap);

    pq_http_reply(t, req, path, code, body, n);
}

void pq_chat_error(pq_bthread_t *t, struct evhttp_request *req, int code, const char *type,
                   const char *errcode, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    openai_error(t, req, PQ_PATH_CHAT, code, type, errcode, fmt, ap);
    va_end(ap);
}

/* ---- live streams: the state of a stream: true waiter (s->ctx) ---- */

typedef struct {
    pq_bthread_t *t;
    redisAsyncContext *ac;   /* the reader's own connection (XREAD BLOCK only); NULL when down */
    struct event *keepalive; /* 10 s after the last write: a comment line; watches the reader */
    struct event *grace;     /* after a terminal record: how long a missing end is awaited */
    char key[512];           /* the job's Redis Stream */
    char last[64];           /* id of the last entry read ("0-0": none) */
    uint64_t chunks;         /* chunk entries relayed */
    int64_t xread_sent_ms;   /* monotonic, 0 when no XREAD is outstanding */
    unsigned started : 1;    /* headers sent: the rest goes out as chunks */
    unsigned ended : 1;      /* the stream said end before any chunk: the record answers */
    unsigned terminal : 1;   /* the record is terminal (status kept) */
    unsigned resumed : 1;    /* GET /v1/jobs/{id}/stream: the stream existed (or the job was not
                              * terminal) when it was opened: entries answer, not the record */
    char status[16];
} stream_t;

static void stream_free(void *ctx);

/* The live stream of s, or NULL. */
static stream_t *stream_of(const pq_slot_t *s)
{
    return s->chat.stream && s->ctx && s->ctx_free == stream_free ? s->ctx : NULL;
}

/* 1 if s's headers went out: its answers are events on the started reply. */
static int stream_started(const pq_slot_t *s)
{
    const stream_t *st = stream_of(s);

    return st && st->started;
}

static void stream_write(pq_slot_t *s, struct evbuffer *buf);

/* Writes buf and "data: [DONE]" and ends the reply (the caller releases the slot). */
static void stream_close(pq_slot_t *s, struct evbuffer *buf)
{
    stream_t *st = stream_of(s);

    evbuffer_add(buf, "data: [DONE]\n\n", 14);
    stream_write(s, buf);
    if (s->req)
        evhttp_send_reply_end(s->req);
    st->started = 0; /* nothing more goes out */
    s->req = NULL;
}

/* An error answer: the usual reply, or once the stream started an error event and [DONE]. */
static void chat_fail(pq_slot_t *s, int code, const char *type, const char *errcode,
                      const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static void chat_fail(pq_slot_t *s, int code, const char *type, const char *errcode,
                      const char *fmt, ...)
{
    va_list ap;
    char body[1400];
    size_t n;
    struct evbuffer *buf;

    va_start(ap, fmt);
    if (!stream_started(s)) {
        openai_error(s->t, s->req, s->path, code, type, errcode, fmt, ap);
        va_end(ap);
        return;
    }
    n = error_body(body, sizeof(body), type, errcode, fmt, ap);
    va_end(ap);
    buf = evbuffer_new();
    if (!buf)
        return; /* the slot's release ends nothing: the client times out */
    evbuffer_add(buf, "data: ", 6);
    evbuffer_add(buf, body, n);
    evbuffer_add(buf, "\n\n", 2);
    stream_close(s, buf);
    evbuffer_free(buf);
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
            uint32_t next = s->chat.wait_next;

            s->chat.wait_next = b[s->chat.wait_hash & (n - 1)];
            b[s->chat.wait_hash & (n - 1)] = idx;
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

    if (s->chat.in_table)
        return 0;
    if ((t->nwaiters + 1 > t->nwbuckets * 2 || !t->nwbuckets) && table_grow(t) && !t->nwbuckets)
        return -1;
    s->chat.wait_hash = wait_hash(s->tenant, s->id);
    head = &t->wbuckets[s->chat.wait_hash & (t->nwbuckets - 1)];
    s->chat.wait_next = *head;
    *head = s->idx;
    s->chat.in_table = 1;
    t->nwaiters++;
    pq_gauge_add(t->b->m_chat_waiting, 1);
    return 0;
}

void pq_chat_unlink(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;
    uint32_t *p;

    if (!s->chat.in_table)
        return;
    for (p = &t->wbuckets[s->chat.wait_hash & (t->nwbuckets - 1)]; *p;
         p = &slot_at(t, *p)->chat.wait_next) {
        if (*p == s->idx) {
            *p = s->chat.wait_next;
            break;
        }
    }
    s->chat.wait_next = 0;
    s->chat.in_table = 0;
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

static void read_cb(redisAsyncContext *ac, void *reply, void *handle)
{
    pq_slot_t *s = pq_slot_replied(ac, reply, handle);

    if (s && s->state == PQ_SLOT_WAIT)
        pq_chat_redis_reply(s, reply);
}

static void read_record(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;
    char key[512];

    if (pq_key_job(key, sizeof(key), t->bc->conf->redis_prefix, s->tenant, s->id) < 0 ||
        pq_rconn_sendf(t, read_cb, pq_slot_handle(s), "HMGET %s status result", key)) {
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
        for (uint32_t idx = t->wbuckets[b]; idx; idx = slot_at(t, idx)->chat.wait_next) {
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
        for (uint32_t idx = t->wbuckets[b]; idx; idx = slot_at(t, idx)->chat.wait_next)
            read_record(slot_at(t, idx));
}

void pq_chat_notify(pq_bthread_t *t, const char *msg, size_t len)
{
    uint32_t h;

    if (!t->nwaiters)
        return;
    h = msg_hash(msg, len);
    for (uint32_t idx = t->wbuckets[h & (t->nwbuckets - 1)]; idx;
         idx = slot_at(t, idx)->chat.wait_next) {
        pq_slot_t *s = slot_at(t, idx);

        if (s->chat.wait_hash == h && wait_match(s, msg, len)) {
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

    if (!t || !(s = pq_slot_from_handle(t, handle)) || (s->path != PQ_PATH_CHAT && !stream_of(s)) ||
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
    pq_http_reply(s->t, s->req, s->path, code, text, strlen(text));
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

/* Server-sent events of a finished chat.completion (see the file comment) into out, without
 * the final [DONE]. */
static int sse_answer(pq_slot_t *s, json_t *resp, struct evbuffer *out)
{
    json_t *choices = json_object_get(resp, "choices");
    int u = s->chat.include_usage;
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
    return 0;
}

/* Answers with the events of a finished chat.completion: a whole reply, or onto the started
 * one. */
static int reply_stream(pq_slot_t *s, json_t *resp)
{
    struct evbuffer *out;
    struct evkeyvalq *h;

    if (stream_started(s)) {
        if (!(out = evbuffer_new()))
            return -1;
        if (sse_answer(s, resp, out)) {
            evbuffer_free(out);
            return -1;
        }
        stream_close(s, out);
        evbuffer_free(out);
        return 0;
    }
    out = evhttp_request_get_output_buffer(s->req);
    h = evhttp_request_get_output_headers(s->req);
    if (sse_answer(s, resp, out) || evbuffer_add(out, "data: [DONE]\n\n", 14))
        return -1;
    evhttp_add_header(h, "Content-Type", "text/event-stream");
    evhttp_add_header(h, "Cache-Control", "no-cache");
    pq_http_reply(s->t, s->req, s->path, 200, NULL, 0);
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
        chat_fail(s, 400, "invalid_request_error", type, "%s%s; job %s failed",
                  reason && *reason ? reason
                  : !strcmp(type, "content_filter")
                      ? "the provider's content policy refused the request"
                      : "the prompt is longer than the model's context window",
                  detail, s->id);
    } else if (!strcmp(type, "invalid_request") || !strcmp(type, "refused") ||
               !strcmp(type, "unsupported") || !strcmp(type, "not_found")) {
        no_retry(s);
        chat_fail(s, 400, "invalid_request_error", type,
                  "the provider refused the request%s%s%s; job %s failed", detail,
                  reason && *reason ? ": " : "", reason && *reason ? reason : "", s->id);
    } else if (!strcmp(type, "id_conflict")) {
        no_retry(s);
        chat_fail(s, 409, "invalid_request_error", type, "job id %s was used with another request",
                  s->id);
    } else if (!strcmp(type, "connect") || !strcmp(type, "timeout") ||
               !strcmp(type, "rate_limited") || !strcmp(type, "server_error") ||
               !strcmp(type, "overloaded") || !strcmp(type, "malformed") ||
               !strcmp(type, "unavailable") || !strcmp(type, "circuit_open") ||
               !strcmp(type, "authentication") || !strcmp(type, "too_large")) {
        chat_fail(s, 502, "upstream_error", type, "the model provider failed (%s)%s; job %s failed",
                  type, detail, s->id);
    } else {
        chat_fail(s, 500, "server_error", type, "job %s failed (%s)", s->id, type);
    }
}

/* The answer of a succeeded job straight from its record's text: the stored response's bytes
 * with its "id" made the job's, nothing parsed into a tree or serialised again. Only for a
 * strict text whose record and response name each member once (so the response and its id
 * are what every reader finds). Returns 0 when it answered, -1 when answer() must read the
 * record the long way (which also tells what is wrong with it). */
static int answer_spliced(pq_slot_t *s, const char *result, size_t len)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(s->req);
    pq_js_t root, resp, k, v, id = {0};
    pq_js_iter_t it;
    pq_jw_t w;
    size_t idlen, members = 0;
    char *idjson;

    if (pq_js_check(result, len, RECORD_JSON_DEPTH, &root, NULL) != 0 ||
        !pq_js_unique_names(&root, 64) || !pq_js_get(&root, "response", &resp) ||
        !pq_js_unique_names(&resp, 256))
        return -1;
    pq_js_iter(&resp, &it);
    while (pq_js_next_member(&it, &k, &v)) {
        members++;
        if (pq_js_str_is(&k, "id"))
            id = v;
    }
    pq_jw_init(&w, 64);
    pq_jw_str(&w, s->id);
    if (!(idjson = pq_jw_finish(&w, &idlen)))
        return -1;
    if (id.p) { /* {... "id": <the job's> ...} */
        evbuffer_add(out, resp.p, (size_t)(id.p - resp.p));
        evbuffer_add(out, idjson, idlen);
        evbuffer_add(out, id.p + id.n, (size_t)(resp.p + resp.n - (id.p + id.n)));
    } else { /* {"id": <the job's>, ...} */
        evbuffer_add(out, "{\"id\":", 6);
        evbuffer_add(out, idjson, idlen);
        if (members)
            evbuffer_add(out, ",", 1);
        evbuffer_add(out, resp.p + 1, resp.n - 1);
    }
    free(idjson);
    pq_http_reply(s->t, s->req, s->path, 200, NULL, 0);
    return 0;
}

/* Answers from a terminal record's result JSON. */
static void answer(pq_slot_t *s, const char *status, const char *result, size_t len)
{
    json_error_t jerr;
    /* JSON_ALLOW_NUL: a provider's content may hold "\u0000", stored escaped */
    json_t *doc, *resp;

    if (!strcmp(status, "succeeded") && !s->chat.stream && answer_spliced(s, result, len) == 0) {
        pq_slot_release(s);
        return;
    }
    doc = json_loadb(result, len, JSON_ALLOW_NUL, &jerr);
    if (!json_is_object(doc)) {
        /* jansson's text quotes the record's bytes (a prompt's answer): name the error only */
        PQ_WARN("job %s/%s: result record unreadable: %s", s->tenant, s->id,
                pq_json_error_what(&jerr));
        chat_fail(s, 500, "server_error", "internal", "result of job %s unreadable", s->id);
        goto out;
    }
    if (!strcmp(status, "succeeded")) {
        resp = json_object_get(doc, "response");
        if (!json_is_object(resp)) {
            chat_fail(s, 500, "server_error", "internal", "job %s succeeded without a response",
                      s->id);
            goto out;
        }
        json_object_set_new(resp, "id", json_string(s->id));
        if (s->chat.stream) {
            if (reply_stream(s, resp)) {
                if (!stream_started(s))
                    evbuffer_drain(evhttp_request_get_output_buffer(s->req),
                                   evbuffer_get_length(evhttp_request_get_output_buffer(s->req)));
                chat_fail(s, 500, "server_error", "internal", "out of memory");
            }
        } else {
            reply_json(s, 200, resp);
        }
    } else if (!strcmp(status, "failed")) {
        reply_failed(s, json_object_get(doc, "error"));
    } else if (!strcmp(status, "expired")) {
        no_retry(s);
        chat_fail(s, 504, "timeout", "expired",
                  "job %s expired (its deadline or park TTL passed) before a provider "
                  "answered",
                  s->id);
    } else {
        no_retry(s);
        chat_fail(s, 409, "invalid_request_error", "cancelled", "job %s was cancelled", s->id);
    }
out:
    json_decref(doc);
    pq_slot_release(s);
}

/* ---- live streams ----
 *
 * A stream: true chat gets its headers once its job is durable; from then on each loop-side
 * event goes out as a chunk of the started reply. The worker XADDs the job's events to its
 * Redis Stream (pq_key_stream): "chunk" (a chat.completion.chunk, relayed verbatim),
 * "restart" (the attempt failed after chunks went out: an error event, then [DONE]) and "end"
 * ([DONE]). Each stream has its own Redis connection that does nothing but XREAD BLOCK on that
 * one key (a blocked connection serves nothing else; one per stream keeps a new stream from
 * having to interrupt others with CLIENT UNBLOCK, and a slow client only ever stalls its own
 * reader); PQ_BROKER_MAX_STREAMS caps them. No polling: the block ends on an entry, after
 * STREAM_BLOCK_MS (the keep-alive timer writes a comment line), or when the stream is done.
 * The job's terminal record (reply_to message, as for every waiter) still decides when a
 * stream without chunks answers: its result is replayed as events (cache hit, a worker that
 * does not stream, an "end" without chunks). A record that is terminal while chunks went out
 * but no "end" came (the worker died) ends the stream with an error event after
 * STREAM_GRACE_MS. */

#define STREAM_BLOCK_MS     10000
#define STREAM_KEEPALIVE_MS 10000
#define STREAM_STALL_MS     (STREAM_BLOCK_MS + 5000)
#define STREAM_GRACE_MS     1000
#define STREAM_READ_COUNT   256
#define STREAM_BACKLOG_MAX  (8u << 20)

static void reader_open(pq_slot_t *s);

/* An SSE event id as the worker's XADD makes them: <ms>-<seq>. */
static int entry_id_valid(const char *v)
{
    const char *dash = strchr(v, '-');
    size_t n = strlen(v);

    if (!dash || n >= sizeof(((stream_t *)0)->last) || dash == v || !dash[1])
        return 0;
    for (const char *p = v; *p; p++)
        if (p != dash && (*p < '0' || *p > '9'))
            return 0;
    return 1;
}

static void arm(struct event *ev, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};

    if (ev)
        evtimer_add(ev, &tv);
}

/* Sends what buf holds (emptied) on the started reply; the keep-alive restarts. */
static void stream_write(pq_slot_t *s, struct evbuffer *buf)
{
    stream_t *st = stream_of(s);

    if (!st || !st->started || !s->req || !evbuffer_get_length(buf))
        return;
    evhttp_send_reply_chunk(s->req, buf);
    arm(st->keepalive, STREAM_KEEPALIVE_MS);
}

/* Bytes written to the client's connection and not yet sent. */
static size_t stream_backlog(pq_slot_t *s)
{
    struct evhttp_connection *evcon = evhttp_request_get_connection(s->req);
    struct bufferevent *bev = evcon ? evhttp_connection_get_bufferevent(evcon) : NULL;

    return bev ? evbuffer_get_length(bufferevent_get_output(bev)) : 0;
}

static void reader_drop(stream_t *st)
{
    redisAsyncContext *ac = st->ac;

    st->ac = NULL;
    st->xread_sent_ms = 0;
    if (ac)
        redisAsyncFree(ac); /* its callbacks see st->ac != ac and do nothing */
}

static void stream_free(void *ctx)
{
    stream_t *st = ctx;

    if (!st)
        return;
    reader_drop(st);
    if (st->keepalive)
        event_free(st->keepalive);
    if (st->grace)
        event_free(st->grace);
    atomic_fetch_sub(&st->t->b->nstreams, 1);
    free(st);
}

/* The slot whose reader is ac (handle in ac->data), or NULL. */
static pq_slot_t *reader_slot(const redisAsyncContext *ac, stream_t **stp)
{
    pq_bthread_t *t = pq_bthread_current;
    pq_slot_t *s = t ? pq_slot_from_handle(t, ac->data) : NULL;
    stream_t *st = s ? stream_of(s) : NULL;

    if (!st || st->ac != ac || s->state != PQ_SLOT_WAIT)
        return NULL;
    *stp = st;
    return s;
}

static void reader_connected(const redisAsyncContext *ac, int status)
{
    stream_t *st;

    if (status != REDIS_OK && reader_slot(ac, &st)) {
        PQ_WARN("stream reader: connect failed: %s", ac->errstr);
        st->ac = NULL; /* hiredis frees it; the keep-alive tick tries again */
        st->xread_sent_ms = 0;
    }
}

static void reader_disconnected(const redisAsyncContext *ac, int status)
{
    stream_t *st;

    if (reader_slot(ac, &st)) {
        st->ac = NULL;
        st->xread_sent_ms = 0;
    }
}

static void reader_setup_reply(redisAsyncContext *ac, void *r, void *priv)
{
    const redisReply *reply = r;

    if (reply && reply->type == REDIS_REPLY_ERROR)
        PQ_WARN("stream reader: %s failed: %s", (const char *)priv, reply->str);
}

static void reader_reply(redisAsyncContext *ac, void *r, void *handle);

static void reader_xread(pq_slot_t *s)
{
    stream_t *st = stream_of(s);
    char block[16], count[16];
    const char *argv[8];

    if (!st->ac || st->xread_sent_ms || st->ended)
        return;
    snprintf(block, sizeof(block), "%d", STREAM_BLOCK_MS);
    snprintf(count, sizeof(count), "%d", STREAM_READ_COUNT);
    argv[0] = "XREAD";
    argv[1] = "COUNT";
    argv[2] = count;
    argv[3] = "BLOCK";
    argv[4] = block;
    argv[5] = "STREAMS";
    argv[6] = st->key;
    argv[7] = st->last;
    if (redisAsyncCommandArgv(st->ac, reader_reply, pq_slot_handle(s), 8, argv, NULL) != REDIS_OK) {
        reader_drop(st);
        return;
    }
    st->xread_sent_ms = pq_mono_ms();
}

/* A field of a stream entry's [f1, v1, f2, v2, ...]. */
static const redisReply *entry_field(const redisReply *fields, const char *name)
{
    if (fields->type != REDIS_REPLY_ARRAY)
        return NULL;
    for (size_t i = 0; i + 1 < fields->elements; i += 2) {
        const redisReply *f = fields->element[i];

        if (f->type == REDIS_REPLY_STRING && !strcmp(f->str, name) &&
            fields->element[i + 1]->type == REDIS_REPLY_STRING)
            return fields->element[i + 1];
    }
    return NULL;
}

/* Relays the entries of an XREAD reply into buf. Returns 1 when the stream is done (an end or
 * restart went into buf), else 0. */
static int relay_entries(pq_slot_t *s, stream_t *st, const redisReply *reply, struct evbuffer *buf)
{
    const redisReply *entries;

    if (reply->type != REDIS_REPLY_ARRAY || reply->elements < 1 ||
        reply->element[0]->type != REDIS_REPLY_ARRAY || reply->element[0]->elements != 2)
        return 0;
    entries = reply->element[0]->element[1];
    if (entries->type != REDIS_REPLY_ARRAY)
        return 0;
    for (size_t i = 0; i < entries->elements; i++) {
        const redisReply *e = entries->element[i], *id, *ty, *d;

        if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
            e->element[0]->type != REDIS_REPLY_STRING)
            continue;
        id = e->element[0];
        if (id->len < sizeof(st->last))
            memcpy(st->last, id->str, id->len + 1);
        ty = entry_field(e->element[1], "t");
        d = entry_field(e->element[1], "d");
        if (!ty)
            continue;
        if (!strcmp(ty->str, "chunk") && d && d->len) {
            evbuffer_add_printf(buf, "id: %s\ndata: ", id->str);
            evbuffer_add(buf, d->str, d->len);
            evbuffer_add(buf, "\n\n", 2);
            st->chunks++;
        } else if (!strcmp(ty->str, "restart") && st->chunks) {
            json_t *doc = d ? json_loadb(d->str, d->len, 0, NULL) : NULL;
            const char *why = json_string_value(json_object_get(doc, "reason"));
            json_t *ev =
                json_pack("{s:{s:s+, s:s, s:n, s:s}}", "error", "message",
                          "the attempt failed after its stream began (", why ? why : "unknown",
                          "type", "server_error", "param", "code", "stream_restarted");
            char *text = ev ? json_dumps(ev, JSON_COMPACT) : NULL;

            if (text) {
                /* the job is retried and completes: its final answer is GET /v1/jobs/{id} */
                evbuffer_add_printf(buf, "id: %s\ndata: %s\n\n", id->str, text);
                free(text);
            }
            json_decref(ev);
            json_decref(doc);
            return 1;
        } else if (!strcmp(ty->str, "end")) {
            if (st->chunks)
                return 1; /* a plain "data: [DONE]", as OpenAI ends a stream */
            /* nothing relayed: the terminal record answers: the reply_to message reads it, and
             * a resumed stream (whose broker may get no message) reads it now */
            st->ended = 1;
            if (st->resumed) {
                st->terminal = 0;
                evtimer_del(st->grace);
                read_record(s);
            }
            return 0;
        }
    }
    return 0;
}

static void reader_reply(redisAsyncContext *ac, void *r, void *handle)
{
    const redisReply *reply = r;
    stream_t *st;
    pq_slot_t *s = reader_slot(ac, &st);
    struct evbuffer *buf;
    int done = 0;

    (void)handle;
    if (!s)
        return;
    st->xread_sent_ms = 0;
    if (!reply) {
        st->ac = NULL; /* going away; hiredis frees it */
        return;
    }
    if (reply->type == REDIS_REPLY_ERROR) {
        PQ_WARN("job %s/%s: stream read failed: %s", s->tenant, s->id, reply->str);
        reader_drop(st);
        return;
    }
    if (reply->type == REDIS_REPLY_NIL && st->resumed && !st->terminal)
        read_record(s); /* a block with no entry: cheap insurance, once per STREAM_BLOCK_MS */
    if (reply->type == REDIS_REPLY_ARRAY && (buf = evbuffer_new())) {
        done = relay_entries(s, st, reply, buf);
        if (done) {
            stream_close(s, buf);
            evbuffer_free(buf);
            pq_slot_release(s);
            return;
        }
        stream_write(s, buf);
        evbuffer_free(buf);
        if (s->req && stream_backlog(s) > STREAM_BACKLOG_MAX) {
            /* the client reads slower than the model writes: it is dropped, not buffered */
            PQ_WARN("job %s/%s: stream client too slow (%zu bytes unsent): dropped", s->tenant,
                    s->id, stream_backlog(s));
            drop_waiter(s);
            return;
        }
    }
    reader_xread(s);
}

static void keepalive_cb(evutil_socket_t fd, short what, void *handle)
{
    pq_bthread_t *t = pq_bthread_current;
    pq_slot_t *s = t ? pq_slot_from_handle(t, handle) : NULL;
    stream_t *st = s ? stream_of(s) : NULL;
    struct evbuffer *buf;

    if (!st || !st->started || s->state != PQ_SLOT_WAIT)
        return;
    if ((buf = evbuffer_new())) {
        evbuffer_add(buf, ": keep-alive\n\n", 14);
        stream_write(s, buf);
        evbuffer_free(buf);
    }
    arm(st->keepalive, STREAM_KEEPALIVE_MS);
    /* hiredis 0.14 has no timeouts: a block that outlived itself is a stalled connection */
    if (st->xread_sent_ms && pq_mono_ms() - st->xread_sent_ms > STREAM_STALL_MS) {
        PQ_WARN("job %s/%s: stream reader stalled: reconnecting", s->tenant, s->id);
        reader_drop(st);
    }
    if (!st->ac && !st->ended)
        reader_open(s);
}

/* Chunks went out, the record is terminal and no end came within the grace: the worker that
 * streamed is gone (its retry's result is on the record). */
static void grace_cb(evutil_socket_t fd, short what, void *handle)
{
    pq_bthread_t *t = pq_bthread_current;
    pq_slot_t *s = t ? pq_slot_from_handle(t, handle) : NULL;
    stream_t *st = s ? stream_of(s) : NULL;

    if (!st || !st->started || s->state != PQ_SLOT_WAIT)
        return;
    chat_fail(s, 502, "server_error", "stream_restarted",
              "the stream broke off before its end; job %s is %s: GET /v1/jobs/%s", s->id,
              st->status, s->id);
    pq_slot_release(s);
}

static void reader_open(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;
    const pq_conf_t *conf = t->bc->conf;
    stream_t *st = stream_of(s);
    redisAsyncContext *ac;
    pq_rasync_opts_t o = {.base = t->base,
                          .port = conf->redis_port,
                          .password = conf->redis_password,
                          .db = conf->redis_db,
                          .data = pq_slot_handle(s),
                          .on_connect = reader_connected,
                          .on_disconnect = reader_disconnected,
                          .on_setup = reader_setup_reply,
                          .priority = -1};
    char err[128];

    /* the address the loop's own connection reached (resolved already, never blocking) */
    if (st->ac || !t->rc || !t->redis_connected || !t->rc->c.tcp.host)
        return;
    o.addr = t->rc->c.tcp.host;
    if (!(ac = pq_rasync_open(&o, NULL, err, sizeof(err)))) {
        PQ_WARN("job %s/%s: stream reader: %s", s->tenant, s->id, err);
        return;
    }
    st->ac = ac;
    reader_xread(s);
}

/* A resumed stream's job is terminal and nothing was relayed yet: entries to come (a stream
 * was written before the terminal record) or none (a job that did not stream: its record). */
static void resumed_exists_cb(redisAsyncContext *ac, void *reply, void *handle)
{
    pq_slot_t *s = pq_slot_replied(ac, reply, handle);
    const redisReply *r = reply;
    stream_t *st = s ? stream_of(s) : NULL;

    if (!st || s->state != PQ_SLOT_WAIT || st->chunks || st->ended)
        return;
    if (r && r->type == REDIS_REPLY_INTEGER && r->integer == 0) {
        st->ended = 1;
        st->terminal = 0;
        evtimer_del(st->grace);
        read_record(s);
    }
}

/* The record of a started stream is terminal. */
static void stream_terminal(pq_slot_t *s, const char *status, const char *result, size_t len)
{
    stream_t *st = stream_of(s);

    if (st->terminal)
        return;
    if (st->resumed && !st->chunks && !st->ended)
        pq_rconn_sendf(s->t, resumed_exists_cb, pq_slot_handle(s), "EXISTS %s", st->key);
    if (!st->chunks && (!st->resumed || st->ended)) {
        /* nothing relayed: the whole answer from the record (cache hit, a worker that does
         * not stream, a replay) */
        answer(s, status, result, len);
        return;
    }
    st->terminal = 1;
    snprintf(st->status, sizeof(st->status), "%s", status);
    /* a resumed stream of a finished job reads entries that are all there already: its
     * grace is only for a slow reader connection */
    arm(st->grace, st->resumed ? 5 * STREAM_GRACE_MS : STREAM_GRACE_MS);
}

/* The stream's job is durable: headers out, reader started. Returns 0, or -1 (the slot then
 * waits as a plain stream waiter, answered from the record). */
static int stream_begin(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;
    stream_t *st = stream_of(s);
    struct evhttp_connection *evcon = evhttp_request_get_connection(s->req);
    struct bufferevent *bev = evcon ? evhttp_connection_get_bufferevent(evcon) : NULL;
    struct evkeyvalq *h = evhttp_request_get_output_headers(s->req);

    if (!st || st->started)
        return st ? 0 : -1;
    if (pq_key_stream(st->key, sizeof(st->key), t->bc->conf->redis_prefix, s->tenant, s->id) < 0 ||
        !(st->keepalive = evtimer_new(t->base, keepalive_cb, pq_slot_handle(s))) ||
        !(st->grace = evtimer_new(t->base, grace_cb, pq_slot_handle(s))))
        return -1;
    if (!st->last[0])
        strcpy(st->last, "0-0"); /* a resumed stream starts after its Last-Event-ID */
    evhttp_add_header(h, "Content-Type", "text/event-stream");
    evhttp_add_header(h, "Cache-Control", "no-cache");
    pq_http_reply_start(t, s->req, s->path, 200);
    st->started = 1;
    /* evhttp now owns the connection's callbacks; reading stays on to see a close, and the
     * idle timeouts go: the slot's deadline (sync_timeout_ms) bounds the stream */
    if (bev) {
        bufferevent_set_timeouts(bev, NULL, NULL);
        bufferevent_enable(bev, EV_READ);
    }
    arm(st->keepalive, STREAM_KEEPALIVE_MS);
    reader_open(s);
    return 0;
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
    if (stream_started(s) && res->type == REDIS_REPLY_STRING && res->len) {
        stream_terminal(s, st->str, res->str, res->len);
        return;
    }
    if (res->type != REDIS_REPLY_STRING || res->len == 0) {
        chat_fail(s, 500, "server_error", "internal", "job %s is %s without a result record", s->id,
                  st->str);
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
    chat_fail(s, 504, "timeout", "timeout",
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
    int64_t left = s->chat.deadline_ms - pq_mono_ms();
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
    if (s->chat.stream && stream_begin(s)) /* then answered from the record as before */
        PQ_WARN("job %s/%s: cannot start the live stream", s->tenant, s->id);
    /* Subscribed first, then read: a result written before we were linked is seen by the
     * read, one written after by the message. Not subscribed yet: the confirmation reads. */
    if (t->sub_ready)
        read_record(s);
}

/* ---- POST /v1/chat/completions ---- */

/* A chat request is a job request (pq_intake_ops) until it waits for its result. */
static void chat_slot_timeout(pq_slot_t *s)
{
    if (s->state == PQ_SLOT_WAIT)
        pq_chat_timeout(s);
    else
        pq_intake_ops.timeout(s);
}

static void chat_slot_stop(pq_slot_t *s)
{
    if (s->state == PQ_SLOT_WAIT)
        pq_chat_timeout(s);
    else
        pq_intake_ops.stop(s);
}

static void chat_slot_release(pq_slot_t *s)
{
    pq_chat_unlink(s);
    pq_intake_ops.release(s);
}

/* The chat job is durable: wait for its result. */
static void chat_durable(pq_slot_t *s, int spooled)
{
    (void)spooled;
    free(s->payload);
    s->payload = NULL;
    pq_chat_wait(s);
}

/* An idempotent repeat: wait for the first request's job (its id answers the header). A
 * stream repeated with Last-Event-ID resumes after that event, as GET /v1/jobs/{id}/stream. */
static void chat_repeat(pq_slot_t *s, int spooled)
{
    struct evkeyvalq *h = evhttp_request_get_output_headers(s->req);
    const char *last =
        s->req ? evhttp_find_header(evhttp_request_get_input_headers(s->req), "Last-Event-ID")
               : NULL;
    stream_t *st = stream_of(s);

    (void)spooled;
    if (st && last && entry_id_valid(last)) {
        pq_strlcpy(st->last, last, sizeof(st->last));
        st->chunks = 1;
        st->resumed = 1;
    }
    evhttp_remove_header(h, "x-promptq-job-id");
    evhttp_add_header(h, "x-promptq-job-id", s->id);
    pq_chat_wait(s);
}

static const pq_slot_ops_t chat_ops = {chat_slot_timeout, chat_slot_stop, chat_slot_release};

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
    {
        const char *last =
            evhttp_find_header(evhttp_request_get_input_headers(req), "Last-Event-ID");

        if (last && *last && !entry_id_valid(last)) {
            pq_chat_error(t, req, 400, "invalid_request_error", "invalid_request",
                          "Last-Event-ID: expected the id of an event of this stream "
                          "(<ms>-<seq>)");
            return;
        }
    }
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
    /* stream and stream_options stay in the job: the worker streams upstream and relays the
     * chunks through the job's Redis Stream (a worker that cannot still answers whole). */
    if (stream && atomic_load(&t->b->nstreams) >= PQ_BROKER_MAX_STREAMS) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", "1");
        pq_chat_error(t, req, 429, "rate_limit_exceeded", "too_many_streams",
                      "%d streams are open on this broker; retry shortly", PQ_BROKER_MAX_STREAMS);
        goto out;
    }
    pq_id_generate(idbuf);
    if (pq_request_hash(env.request, env.request_hash) || pq_envelope_set_tenant(&env, tenant) ||
        pq_envelope_set_id(&env, idbuf) || pq_envelope_set_reply_to(&env, t->b->reply_channel)) {
        pq_chat_error(t, req, 500, "server_error", "internal", "cannot build the job");
        goto out;
    }

    s = pq_intake_slot_get(t, req, PQ_PATH_CHAT, &env, tenant, &chat_ops);
    if (!s)
        goto out;
    s->chat.stream = (unsigned)stream;
    s->chat.include_usage = (unsigned)include_usage;
    if (stream) {
        stream_t *st = calloc(1, sizeof(*st));

        if (!st) {
            pq_chat_error(t, req, 500, "server_error", "internal", "out of memory");
            pq_slot_release(s);
            goto out;
        }
        st->t = t;
        atomic_fetch_add(&t->b->nstreams, 1);
        s->ctx = st;
        s->ctx_free = stream_free;
    }
    s->chat.deadline_ms = pq_mono_ms() + bc->conf->sync_timeout_ms;
    evhttp_add_header(evhttp_request_get_output_headers(req), "x-promptq-job-id", s->id);
    evhttp_connection_set_closecb(evhttp_request_get_connection(req), on_close, pq_slot_handle(s));
    s->payload = pq_envelope_dump(&env, &s->payload_len);
    pq_envelope_clear(&env);
    if (!s->payload) {
        pq_chat_error(t, req, 500, "server_error", "internal", "cannot serialise the job");
        pq_slot_release(s);
        return;
    }
    pq_intake_start(s, idem, body, len, chat_durable, chat_repeat);
    return;
out:
    pq_envelope_clear(&env);
}

/* ---- GET /v1/jobs/{id}/stream: a job's live stream, joined or resumed ----
 *
 * Any job whose request has "stream": true (a chat call or a POST /v1/jobs job) can be followed
 * here, on any broker: the job's record is looked up (404 if absent), then the slot waits as a
 * stream waiter does. Last-Event-ID (an entry id the client saw) resumes after that entry;
 * without it the stream is read from its start. While the job's Redis Stream exists (or the job
 * is not finished yet) its entries answer: chunks, then [DONE] on its end, an error event on a
 * restart after something was relayed. A finished job whose stream has expired (TTL 10 min) is
 * answered whole from its record, as events without ids. This broker may get no reply_to
 * message for the job: the stream's end entry, or a block with no entry, reads the record. */

static void resume_timeout(pq_slot_t *s)
{
    if (s->state == PQ_SLOT_WAIT) {
        pq_chat_timeout(s);
    } else {
        pq_http_error(s->t, s->req, PQ_PATH_JOB, 503, "unavailable",
                      "job store (Redis) did not answer");
        pq_slot_release(s);
    }
}

static const pq_slot_ops_t resume_ops = {resume_timeout, resume_timeout, pq_chat_unlink};

/* HGET status: what the EXISTS reply that follows it needs. */
static void resume_status_cb(redisAsyncContext *ac, void *reply, void *handle)
{
    pq_slot_t *s = pq_slot_replied(ac, reply, handle);
    const redisReply *r = reply;
    stream_t *st = s ? stream_of(s) : NULL;

    if (!st || s->state != PQ_SLOT_GET)
        return;
    if (r && r->type == REDIS_REPLY_STRING)
        pq_strlcpy(st->status, r->str, sizeof(st->status));
    else if (r && r->type == REDIS_REPLY_NIL)
        strcpy(st->status, "-"); /* no such job */
}

static void resume_exists_cb(redisAsyncContext *ac, void *reply, void *handle)
{
    pq_slot_t *s = pq_slot_replied(ac, reply, handle);
    const redisReply *r = reply;
    stream_t *st = s ? stream_of(s) : NULL;

    if (!st || s->state != PQ_SLOT_GET)
        return;
    if (!r || r->type != REDIS_REPLY_INTEGER || !st->status[0]) {
        evhttp_add_header(evhttp_request_get_output_headers(s->req), "Retry-After", "1");
        pq_http_error(s->t, s->req, PQ_PATH_JOB, 503, "unavailable",
                      "job store (Redis) unavailable");
        pq_slot_release(s);
        return;
    }
    if (!strcmp(st->status, "-")) {
        pq_http_error(s->t, s->req, PQ_PATH_JOB, 404, "not_found", "no such job");
        pq_slot_release(s);
        return;
    }
    st->resumed = r->integer > 0 || !is_terminal(st->status);
    if (!st->resumed)
        st->chunks = 0; /* the entries expired: the whole answer from the record */
    st->status[0] = '\0';
    s->chat.deadline_ms = pq_mono_ms() + s->t->bc->conf->sync_timeout_ms;
    evhttp_add_header(evhttp_request_get_output_headers(s->req), "x-promptq-job-id", s->id);
    evhttp_connection_set_closecb(evhttp_request_get_connection(s->req), on_close,
                                  pq_slot_handle(s));
    pq_chat_wait(s);
}

void pq_chat_resume(pq_bthread_t *t, struct evhttp_request *req, const char *id)
{
    const char *last = evhttp_find_header(evhttp_request_get_input_headers(req), "Last-Event-ID");
    char tenant[PQ_TENANT_MAX + 1], jkey[512];
    stream_t *st;
    pq_slot_t *s;

    if (pq_api_tenant(t, req, PQ_PATH_JOB, tenant, sizeof(tenant)) ||
        pq_http_ratelimit(t, req, PQ_PATH_JOB, tenant))
        return;
    if (!pq_id_valid(id)) {
        pq_http_error(t, req, PQ_PATH_JOB, 404, "not_found", "no such job");
        return;
    }
    if (last && *last && !entry_id_valid(last)) {
        pq_http_error(t, req, PQ_PATH_JOB, 400, "invalid_request",
                      "Last-Event-ID: expected the id of an event of this stream (<ms>-<seq>)");
        return;
    }
    if (atomic_load(&t->b->nstreams) >= PQ_BROKER_MAX_STREAMS) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", "1");
        pq_http_error(t, req, PQ_PATH_JOB, 429, "too_many_streams",
                      "%d streams are open on this broker; retry shortly", PQ_BROKER_MAX_STREAMS);
        return;
    }
    if (!pq_rconn_usable(t) ||
        pq_key_job(jkey, sizeof(jkey), t->bc->conf->redis_prefix, tenant, id) < 0) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", "1");
        pq_http_error(t, req, PQ_PATH_JOB, 503, "unavailable", "job store (Redis) unavailable");
        return;
    }
    if (!(st = calloc(1, sizeof(*st))) || !(s = pq_slot_get(t, PQ_PATH_JOB, req, &resume_ops))) {
        free(st);
        pq_http_error(t, req, PQ_PATH_JOB, 503, "unavailable", "too many requests in flight");
        return;
    }
    st->t = t;
    atomic_fetch_add(&t->b->nstreams, 1);
    s->ctx = st;
    s->ctx_free = stream_free;
    s->chat.stream = 1;
    pq_strlcpy(s->id, id, sizeof(s->id));
    pq_strlcpy(s->tenant, tenant, sizeof(s->tenant));
    if (last && *last) {
        pq_strlcpy(st->last, last, sizeof(st->last));
        st->chunks = 1; /* the client has events of this stream: a restart is news to it */
    }
    if (pq_key_stream(st->key, sizeof(st->key), t->bc->conf->redis_prefix, tenant, id) < 0) {
        pq_http_error(t, req, PQ_PATH_JOB, 404, "not_found", "no such job");
        pq_slot_release(s);
        return;
    }
    s->state = PQ_SLOT_GET;
    event_add(&s->timer, t->tv_redis);
    if (pq_rconn_sendf(t, resume_status_cb, pq_slot_handle(s), "HGET %s status", jkey) ||
        pq_rconn_sendf(t, resume_exists_cb, pq_slot_handle(s), "EXISTS %s", st->key)) {
        /* the first may be on its way: its answer finds the slot gone */
        evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", "1");
        pq_http_error(t, req, PQ_PATH_JOB, 503, "unavailable", "job store (Redis) unavailable");
        pq_slot_release(s);
    }
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
