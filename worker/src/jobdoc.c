/* Job documents (jobdoc.h): pure builders of the records a job writes. */
#include "jobdoc.h"
#include <stdlib.h>
#include <string.h>
#include "promptq/jwrite.h"
#include "promptq/util.h"

static int set(const char *s)
{
    return s && s[0];
}

const char *pq_jobdoc_id(const pq_jobdoc_t *d)
{
    return d->env->id ? d->env->id : "-";
}

const char *pq_jobdoc_tenant(const pq_jobdoc_t *d)
{
    return d->env->tenant ? d->env->tenant : "default";
}

const char *pq_jobdoc_result_provider(const pq_jobdoc_t *d)
{
    if (d->cached)
        return "cache";
    return d->provider;
}

const char *pq_jobdoc_result_model(const pq_jobdoc_t *d)
{
    if (d->cached)
        return json_string_value(json_object_get(d->cached, "model"));
    return d->model;
}

char *pq_jobdoc_dump(const json_t *o, size_t *len)
{
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    *len = s ? strlen(s) : 0;
    return s;
}

json_t *pq_jobdoc_error(const pq_jobdoc_t *d)
{
    json_t *e = json_object();
    json_object_set_new(e, "type", json_string(pq_err_name(d->err)));
    json_object_set_new(e, "message", json_string(set(d->errmsg) ? d->errmsg : pq_err2str(d->err)));
    json_object_set_new(e, "provider", d->provider ? json_string(d->provider) : json_null());
    json_object_set_new(e, "status",
                        d->http_status > 0 ? json_integer(d->http_status) : json_null());
    if (set(d->fault_code))
        json_object_set_new(e, "code", json_string(d->fault_code));
    if (set(d->fault_reason))
        json_object_set_new(e, "reason", json_string(d->fault_reason));
    return e;
}

/* Written member by member (jwrite.h): no tree is built for the record, and the answer's text
 * goes in as it is. */
char *pq_jobdoc_result(const pq_jobdoc_t *d, size_t *len)
{
    const char *provider = pq_jobdoc_result_provider(d), *model = pq_jobdoc_result_model(d);
    char created[40], completed[40];
    pq_jw_t w;

    pq_time_format(d->created_ms, created, sizeof(created));
    pq_time_format(d->now_ms, completed, sizeof(completed));
    pq_jw_init(&w, 768 + d->response_len);
    pq_jw_raw(&w, "{", 1);
    pq_jw_key(&w, "id");
    pq_jw_str(&w, pq_jobdoc_id(d));
    pq_jw_key(&w, "tenant");
    pq_jw_str(&w, pq_jobdoc_tenant(d));
    pq_jw_key(&w, "status");
    pq_jw_str(&w, d->status);
    pq_jw_key(&w, "route");
    pq_jw_str(&w, d->env->model);
    pq_jw_key(&w, "provider");
    pq_jw_str(&w, provider);
    pq_jw_key(&w, "model");
    pq_jw_str(&w, model);
    pq_jw_key(&w, "attempts");
    pq_jw_int(&w, d->attempts);
    if (d->alog && !d->slim) {
        pq_jw_key(&w, "attempt_log");
        pq_jw_json(&w, d->alog);
    }
    if (d->cached) {
        pq_jw_key(&w, "cached_from");
        pq_jw_raw(&w, "{", 1);
        pq_jw_key(&w, "provider");
        pq_jw_json(&w, json_object_get(d->cached, "provider"));
        pq_jw_key(&w, "model");
        pq_jw_json(&w, json_object_get(d->cached, "model"));
        pq_jw_raw(&w, "}", 1);
    }
    if (d->response_text) {
        pq_jw_key(&w, "response");
        pq_jw_raw(&w, d->response_text, d->response_len);
    } else if (d->response) {
        pq_jw_key(&w, "response");
        pq_jw_json(&w, d->response);
    } else {
        json_t *e = pq_jobdoc_error(d);
        pq_jw_key(&w, "error");
        pq_jw_json(&w, e);
        json_decref(e);
    }
    pq_jw_key(&w, "metadata");
    pq_jw_json(&w, d->env->metadata && !d->slim ? d->env->metadata : NULL);
    pq_jw_key(&w, "latency_ms");
    pq_jw_int(&w, d->now_ms > d->created_ms ? d->now_ms - d->created_ms : 0);
    pq_jw_key(&w, "created_at");
    pq_jw_str(&w, created);
    pq_jw_key(&w, "completed_at");
    pq_jw_str(&w, completed);
    pq_jw_key(&w, "source");
    pq_jw_raw(&w, "{", 1);
    pq_jw_key(&w, "topic");
    pq_jw_str(&w, d->src_topic);
    pq_jw_key(&w, "partition");
    pq_jw_int(&w, d->partition);
    pq_jw_key(&w, "offset");
    pq_jw_int(&w, d->offset);
    pq_jw_raw(&w, "}}", 2);
    return pq_jw_finish(&w, len);
}

char *pq_jobdoc_dlq_small(const pq_jobdoc_t *d, size_t *len)
{
    json_t *o = json_object(), *e = pq_jobdoc_error(d);
    char *s;

    if (d->env->id)
        json_object_set_new(o, "id", json_string(pq_jobdoc_id(d)));
    json_object_set_new(o, "tenant", json_string(pq_jobdoc_tenant(d)));
    if (d->env->model)
        json_object_set_new(o, "model", json_string(d->env->model));
    if (!d->env->root) {
        json_object_set_new(e, "type", json_string("invalid"));
        json_object_set_new(e, "message", json_string("invalid job too large to copy"));
    }
    json_object_set_new(o, "error", e);
    json_object_set_new(o, "truncated", json_true());
    json_object_set_new(o, "source",
                        json_pack("{s:s, s:i, s:I}", "topic", d->src_topic, "partition",
                                  (int)d->partition, "offset", (json_int_t)d->offset));
    s = pq_jobdoc_dump(o, len);
    json_decref(o);
    return s;
}

char *pq_jobdoc_dlq(const pq_jobdoc_t *d, json_t *error, size_t max_msg, int *small, size_t *len)
{
    json_t *o = json_copy(d->env->root); /* shallow */
    char *s;

    if (!o) {
        json_decref(error);
        *len = 0;
        return NULL;
    }
    json_object_set_new(o, "error", error);
    s = pq_jobdoc_dump(o, len);
    json_decref(o);
    if (s && *len > max_msg) {
        free(s);
        s = pq_jobdoc_dlq_small(d, len);
        *small = 1;
    }
    return s;
}

json_t *pq_jobdoc_raw_string(const char *buf, size_t len)
{
    json_t *s = json_stringn(buf, len);
    char *copy;

    if (s)
        return s;
    copy = malloc(len + 1);
    if (!copy)
        return json_string("");
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)buf[i];
        copy[i] = (c == 0 || c >= 0x80) ? '?' : (char)c;
    }
    s = json_stringn(copy, len);
    free(copy);
    return s ? s : json_string("");
}

char *pq_jobdoc_invalid(const char *buf, size_t len, const char *why, size_t *out_len)
{
    json_t *doc = json_loadb(buf, len, 0, NULL);
    json_t *e = json_object();
    char *s;

    json_object_set_new(e, "type", json_string("invalid"));
    json_object_set_new(e, "message", json_string(why));
    if (!json_is_object(doc)) {
        json_decref(doc);
        doc = json_object();
        json_object_set_new(doc, "raw", pq_jobdoc_raw_string(buf, len));
    }
    json_object_set_new(doc, "error", e);
    s = pq_jobdoc_dump(doc, out_len);
    json_decref(doc);
    return s;
}

char *pq_jobdoc_cache_entry(const char *provider, const char *model, const char *response,
                            size_t response_len, size_t *len)
{
    pq_jw_t w;

    pq_jw_init(&w, 64 + response_len);
    pq_jw_raw(&w, "{", 1);
    pq_jw_key(&w, "provider");
    pq_jw_str(&w, provider);
    pq_jw_key(&w, "model");
    pq_jw_str(&w, model);
    pq_jw_key(&w, "response");
    pq_jw_raw(&w, response, response_len);
    pq_jw_raw(&w, "}", 1);
    return pq_jw_finish(&w, len);
}

json_t *pq_jobdoc_cache_parse(const char *buf, size_t len)
{
    /* JSON_ALLOW_NUL: an answer may carry U+0000, which json_dumps stored as "\u0000" */
    json_t *doc = json_loadb(buf, len, JSON_ALLOW_NUL, NULL);

    if (json_is_object(json_object_get(doc, "response")) &&
        json_is_string(json_object_get(doc, "provider")) &&
        json_is_string(json_object_get(doc, "model")))
        return doc;
    json_decref(doc);
    return NULL;
}

int64_t pq_jobdoc_park_since(const json_t *park)
{
    const char *at = json_string_value(json_object_get(park, "parked_at"));
    int64_t ms = 0;

    if (!at || pq_time_parse(at, &ms) != 0)
        return 0;
    return ms;
}

int64_t pq_jobdoc_parked_expiry(const char *buf, size_t len, int64_t park_ttl_ms,
                                pq_jobdoc_dropped_fn *dropped_fn, void *opaque, int *dropped)
{
    json_t *doc = json_loadb(buf, len, 0, NULL);
    const char *dl = json_string_value(json_object_get(doc, "deadline"));
    const char *tenant = json_string_value(json_object_get(doc, "tenant"));
    int64_t at = pq_jobdoc_park_since(json_object_get(doc, "park")), exp = 0, d = 0;

    *dropped = 0;
    if (!json_is_object(doc)) {
        json_decref(doc);
        return 0;
    }
    exp = at > 0 ? at + park_ttl_ms : INT64_MAX;
    if (dl && pq_time_parse(dl, &d) == 0 && d < exp)
        exp = d;
    *dropped = dropped_fn && dropped_fn(tenant ? tenant : "default", at, opaque);
    json_decref(doc);
    return exp;
}
