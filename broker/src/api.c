/* What the OpenAI-shaped endpoints share (files, batches, job lists, ops, redrive): the
 * request's tenant, 503s, and slots that wait for one Redis reply at a time (PQ_SLOT_API), the
 * reply going to the step handler the request named. */
#include "broker.h"
#include "api.h"
#include "http.h"
#include "rconn.h"
#include "slot.h"

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

/* Lists a sorted set of ids newest first with fields of each id's hash. KEYS[1] set; ARGV[1]
 * max ("+" or "(after"), ARGV[2] count, ARGV[3] hash key prefix, ARGV[4..] fields (none:
 * HGETALL). Returns {id, {values...}} pairs flattened. */
static const char list_script[] =
    "local ids = redis.call('ZREVRANGEBYLEX', KEYS[1], ARGV[1], '-', 'LIMIT', 0, ARGV[2])\n"
    "local out = {}\n"
    "for _, id in ipairs(ids) do\n"
    "  local v\n"
    "  if #ARGV > 3 then v = redis.call('HMGET', ARGV[3] .. id, unpack(ARGV, 4))\n"
    "  else v = redis.call('HGETALL', ARGV[3] .. id) end\n"
    "  out[#out + 1] = id\n"
    "  out[#out + 1] = v\n"
    "end\n"
    "return out\n";

int pq_api_tenant(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, char *out,
                  size_t size)
{
    const char *key_tenant, *q;
    struct evkeyvalq params;

    if (pq_http_auth(t, req, path, &key_tenant))
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
            pq_http_error(t, req, path, 400, "invalid_request",
                          "tenant: must match [A-Za-z0-9._-]{1,%d}", PQ_TENANT_MAX);
            return -1;
        }
        if (v)
            pq_strlcpy(out, v, size);
        evhttp_clear_headers(&params);
    }
    return 0;
}

void pq_api_unavailable(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path)
{
    evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", "1");
    pq_http_error(t, req, path, 503, "unavailable", "store (Redis) unavailable");
}

void pq_api_timeout(pq_slot_t *s)
{
    pq_counter_add(s->t->b->m_redis_errors, 1);
    pq_api_unavailable(s->t, s->req, s->path);
    pq_slot_release(s);
}

static void api_slot_timeout(pq_slot_t *s)
{
    if (s->state == PQ_SLOT_API)
        pq_api_timeout(s);
}

const pq_slot_ops_t pq_api_ops = {api_slot_timeout, NULL, NULL};

static void api_cb(redisAsyncContext *ac, void *r, void *handle)
{
    pq_bthread_t *t = pq_rconn_replied(ac, r);
    pq_slot_t *s = pq_slot_from_handle(t, handle);
    const redisReply *reply = r;

    if (!s || s->state != PQ_SLOT_API || !s->api.fn)
        return;
    event_del(&s->timer);
    if (!reply || reply->type == REDIS_REPLY_ERROR) {
        s->ops->timeout(s);
        return;
    }
    s->api.fn(s, reply);
}

int pq_api_send(pq_slot_t *s, void (*fn)(pq_slot_t *, const void *), int argc, const char **argv,
                const size_t *argvlen)
{
    pq_bthread_t *t = s->t;

    if (pq_rconn_send(t, api_cb, pq_slot_handle(s), argc, argv, argvlen))
        return -1;
    s->state = PQ_SLOT_API;
    s->api.fn = fn;
    event_del(&s->timer);
    event_add(&s->timer, t->tv_redis);
    return 0;
}

int pq_api_sendv(pq_slot_t *s, void (*fn)(pq_slot_t *, const void *), int argc, const char **argv)
{
    size_t lens[16];

    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    return pq_api_send(s, fn, argc, argv, lens);
}

long pq_api_query_limit(struct evhttp_request *req, char *after, size_t after_size, long dflt,
                        long max, int (*after_ok)(const char *))
{
    const char *q = evhttp_uri_get_query(evhttp_request_get_evhttp_uri(req));
    struct evkeyvalq params;
    long limit = dflt;

    after[0] = '\0';
    if (q && evhttp_parse_query_str(q, &params) == 0) {
        const char *v = evhttp_find_header(&params, "limit");
        const char *a = evhttp_find_header(&params, "after");

        if (v) {
            limit = strtol(v, NULL, 10);
            if (limit < 1 || limit > max)
                limit = -1;
        }
        if (a && after_ok(a))
            pq_strlcpy(after, a, after_size);
        evhttp_clear_headers(&params);
    }
    return limit;
}

/* Sends the list script for pq_api_list. Returns 0 or -1 (not sent). */
static int list_send(pq_slot_t *s, void (*fn)(pq_slot_t *, const void *), const char *skey,
                     const char *pfx, const char *after, long limit, int nfields,
                     const char **fields)
{
    char max[160], count[24];
    const char *argv[16];
    int n = 0;

    if (after[0])
        snprintf(max, sizeof(max), "(%s", after);
    else
        pq_strlcpy(max, "+", sizeof(max));
    snprintf(count, sizeof(count), "%ld", limit + 1);
    argv[n++] = "EVAL";
    argv[n++] = list_script;
    argv[n++] = "1";
    argv[n++] = skey;
    argv[n++] = max;
    argv[n++] = count;
    argv[n++] = pfx;
    for (int i = 0; i < nfields && n < 16; i++)
        argv[n++] = fields[i];
    s->ctx = (void *)(intptr_t)limit;
    return pq_api_sendv(s, fn, n, argv);
}

void pq_api_list(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                 void (*fn)(pq_slot_t *, const void *), const char *skey, const char *pfx,
                 const char *after, long limit, int nfields, const char **fields)
{
    pq_slot_t *s = pq_slot_get(t, path, req, &pq_api_ops);

    if (!s) {
        pq_api_unavailable(t, req, path);
        return;
    }
    if (list_send(s, fn, skey, pfx, after, limit, nfields, fields)) {
        s->ctx = NULL;
        pq_api_unavailable(t, req, path);
        pq_slot_release(s);
    }
}

int pq_api_path_id(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, const char *rest,
                   const char *sub, size_t max_len, int (*ok)(const char *), const char *object,
                   char *id)
{
    const char *slash;
    size_t len;

    rest++; /* skip '/' */
    slash = strchr(rest, '/');
    if (slash && strcmp(slash, sub) != 0) {
        pq_http_error(t, req, path, 404, "invalid_request_error", "no such path");
        return -1;
    }
    len = slash ? (size_t)(slash - rest) : strlen(rest);
    if (len > max_len) {
        pq_http_error(t, req, path, 404, "invalid_request_error", "No such %s object", object);
        return -1;
    }
    pq_strlcpy(id, rest, len + 1);
    if (!ok(id)) {
        pq_http_error(t, req, path, 404, "invalid_request_error", "No such %s object: %s", object,
                      id);
        return -1;
    }
    return slash != NULL;
}
