/* Job documents (worker/src/jobdoc.c): the result record, the error object, the dlq record and
 * its small stand-in, the invalid-job dlq record, cache entries and park times, built from plain
 * inputs (no worker, no I/O), and the expiry of a parked job read back. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "jobdoc.h"
#include "promptq/util.h"

#define ENV_JSON                                                                                   \
    "{\"id\":\"j1\",\"tenant\":\"acme\",\"metadata\":{\"k\":\"v\"},"                               \
    "\"request\":{\"model\":\"fast\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}}"

static pq_envelope_t env;

static int setup(void **state)
{
    char err[256];
    (void)state;
    return pq_envelope_parse(ENV_JSON, strlen(ENV_JSON), NULL, &env, err, sizeof(err)) == PQ_OK
               ? 0
               : -1;
}

static int teardown(void **state)
{
    (void)state;
    pq_envelope_clear(&env);
    return 0;
}

static void doc_init(pq_jobdoc_t *d)
{
    memset(d, 0, sizeof(*d));
    d->env = &env;
    d->status = "succeeded";
    d->provider = "openai";
    d->model = "gpt-x";
    d->attempts = 2;
    d->created_ms = 1700000000000;
    d->now_ms = 1700000000250;
    d->src_topic = "promptq.requests";
    d->partition = 3;
    d->offset = 42;
}

static json_t *load(const char *s, size_t len)
{
    json_t *o;
    assert_non_null(s);
    assert_int_equal(strlen(s), len);
    o = json_loadb(s, len, JSON_ALLOW_NUL, NULL);
    assert_non_null(o);
    return o;
}

static const char *str(const json_t *o, const char *key)
{
    return json_string_value(json_object_get(o, key));
}

static void test_result_succeeded(void **state)
{
    pq_jobdoc_t d;
    json_t *resp = json_pack("{s:s}", "id", "chatcmpl-1"), *alog = json_pack("[{s:s}]", "k", "v");
    json_t *o, *src;
    size_t len;
    char *s;
    (void)state;

    doc_init(&d);
    d.response = resp;
    d.alog = alog;
    s = pq_jobdoc_result(&d, &len);
    o = load(s, len);
    assert_string_equal(str(o, "id"), "j1");
    assert_string_equal(str(o, "tenant"), "acme");
    assert_string_equal(str(o, "status"), "succeeded");
    assert_string_equal(str(o, "route"), "fast");
    assert_string_equal(str(o, "provider"), "openai");
    assert_string_equal(str(o, "model"), "gpt-x");
    assert_int_equal(json_integer_value(json_object_get(o, "attempts")), 2);
    assert_int_equal(json_integer_value(json_object_get(o, "latency_ms")), 250);
    assert_true(json_equal(json_object_get(o, "response"), resp));
    assert_true(json_equal(json_object_get(o, "attempt_log"), alog));
    assert_null(json_object_get(o, "error"));
    assert_null(json_object_get(o, "cached_from"));
    assert_string_equal(str(json_object_get(o, "metadata"), "k"), "v");
    assert_non_null(str(o, "created_at"));
    assert_non_null(str(o, "completed_at"));
    src = json_object_get(o, "source");
    assert_string_equal(str(src, "topic"), "promptq.requests");
    assert_int_equal(json_integer_value(json_object_get(src, "partition")), 3);
    assert_int_equal(json_integer_value(json_object_get(src, "offset")), 42);
    /* slim: no attempt log, metadata null */
    free(s);
    json_decref(o);
    d.slim = 1;
    s = pq_jobdoc_result(&d, &len);
    o = load(s, len);
    assert_null(json_object_get(o, "attempt_log"));
    assert_true(json_is_null(json_object_get(o, "metadata")));
    free(s);
    json_decref(o);
    json_decref(resp);
    json_decref(alog);
}

static void test_result_failed_error(void **state)
{
    pq_jobdoc_t d;
    json_t *o, *e;
    size_t len;
    char *s;
    (void)state;

    doc_init(&d);
    d.status = "failed";
    d.err = PQ_ERR_RATE_LIMITED;
    d.errmsg = "too many";
    d.http_status = 429;
    d.fault_code = "rate_limit_exceeded";
    d.fault_reason = "";
    s = pq_jobdoc_result(&d, &len);
    o = load(s, len);
    assert_null(json_object_get(o, "response"));
    e = json_object_get(o, "error");
    assert_string_equal(str(e, "type"), pq_err_name(PQ_ERR_RATE_LIMITED));
    assert_string_equal(str(e, "message"), "too many");
    assert_string_equal(str(e, "provider"), "openai");
    assert_int_equal(json_integer_value(json_object_get(e, "status")), 429);
    assert_string_equal(str(e, "code"), "rate_limit_exceeded");
    assert_null(json_object_get(e, "reason"));
    free(s);
    json_decref(o);

    /* no message: the error's description; no target, no status: nulls */
    d.errmsg = "";
    d.provider = d.model = NULL;
    d.http_status = 0;
    d.fault_code = NULL;
    e = pq_jobdoc_error(&d);
    assert_string_equal(str(e, "message"), pq_err2str(PQ_ERR_RATE_LIMITED));
    assert_true(json_is_null(json_object_get(e, "provider")));
    assert_true(json_is_null(json_object_get(e, "status")));
    assert_null(json_object_get(e, "code"));
    json_decref(e);
}

static void test_result_cache_hit(void **state)
{
    pq_jobdoc_t d;
    const char *entry = "{\"provider\":\"anthropic\",\"model\":\"claude\",\"response\":{\"a\":1}}";
    json_t *cached = pq_jobdoc_cache_parse(entry, strlen(entry)), *o, *from;
    size_t len;
    char *s;
    (void)state;

    assert_non_null(cached);
    doc_init(&d);
    d.cached = cached;
    d.response = json_object_get(cached, "response");
    assert_string_equal(pq_jobdoc_result_provider(&d), "cache");
    assert_string_equal(pq_jobdoc_result_model(&d), "claude");
    s = pq_jobdoc_result(&d, &len);
    o = load(s, len);
    assert_string_equal(str(o, "provider"), "cache");
    assert_string_equal(str(o, "model"), "claude");
    from = json_object_get(o, "cached_from");
    assert_string_equal(str(from, "provider"), "anthropic");
    assert_string_equal(str(from, "model"), "claude");
    free(s);
    json_decref(o);
    json_decref(cached);
}

static void test_dlq(void **state)
{
    pq_jobdoc_t d;
    json_t *o;
    size_t len, full;
    int small = 0;
    char *s;
    (void)state;

    doc_init(&d);
    d.status = "failed";
    d.err = PQ_ERR_INVALID;
    d.errmsg = "refused";
    s = pq_jobdoc_dlq(&d, pq_jobdoc_error(&d), 1 << 20, &small, &len);
    o = load(s, len);
    full = len;
    assert_int_equal(small, 0);
    assert_string_equal(str(o, "id"), "j1");
    assert_non_null(json_object_get(o, "request"));
    assert_string_equal(str(json_object_get(o, "error"), "message"), "refused");
    free(s);
    json_decref(o);

    /* over max_msg: the small stand-in */
    s = pq_jobdoc_dlq(&d, pq_jobdoc_error(&d), full - 1, &small, &len);
    o = load(s, len);
    assert_int_equal(small, 1);
    assert_true(json_is_true(json_object_get(o, "truncated")));
    assert_string_equal(str(o, "id"), "j1");
    assert_string_equal(str(o, "tenant"), "acme");
    assert_string_equal(str(o, "model"), "fast");
    assert_null(json_object_get(o, "request"));
    assert_string_equal(str(json_object_get(o, "error"), "message"), "refused");
    assert_string_equal(str(json_object_get(o, "source"), "topic"), "promptq.requests");
    assert_int_equal(json_integer_value(json_object_get(json_object_get(o, "source"), "offset")),
                     42);
    free(s);
    json_decref(o);
}

static void test_dlq_small_without_envelope(void **state)
{
    pq_envelope_t none;
    pq_jobdoc_t d;
    json_t *o, *e;
    size_t len;
    int small = 0;
    char *s;
    (void)state;

    memset(&none, 0, sizeof(none));
    doc_init(&d);
    d.env = &none;
    /* no document: no dlq record from the envelope, the error is taken anyway */
    assert_null(pq_jobdoc_dlq(&d, pq_jobdoc_error(&d), 100, &small, &len));
    assert_int_equal(len, 0);
    s = pq_jobdoc_dlq_small(&d, &len);
    o = load(s, len);
    assert_null(json_object_get(o, "id"));
    assert_null(json_object_get(o, "model"));
    assert_string_equal(str(o, "tenant"), "default");
    e = json_object_get(o, "error");
    assert_string_equal(str(e, "type"), "invalid");
    assert_string_equal(str(e, "message"), "invalid job too large to copy");
    assert_string_equal(pq_jobdoc_id(&d), "-");
    free(s);
    json_decref(o);
}

static void test_invalid(void **state)
{
    const char obj[] = "{\"x\":1}";
    const char bad[] = "not json \xff\x00z";
    json_t *o, *e;
    size_t len;
    char *s;
    (void)state;

    s = pq_jobdoc_invalid(obj, strlen(obj), "no request", &len);
    o = load(s, len);
    assert_int_equal(json_integer_value(json_object_get(o, "x")), 1);
    e = json_object_get(o, "error");
    assert_string_equal(str(e, "type"), "invalid");
    assert_string_equal(str(e, "message"), "no request");
    free(s);
    json_decref(o);

    s = pq_jobdoc_invalid(bad, sizeof(bad) - 1, "not JSON", &len);
    o = load(s, len);
    assert_string_equal(str(o, "raw"), "not json ??z");
    free(s);
    json_decref(o);
}

static void test_raw_string(void **state)
{
    json_t *s;
    (void)state;

    s = pq_jobdoc_raw_string("h\xc3\xa9llo", 6); /* valid UTF-8 kept */
    assert_string_equal(json_string_value(s), "h\xc3\xa9llo");
    json_decref(s);
    s = pq_jobdoc_raw_string("a\x80", 2);
    assert_string_equal(json_string_value(s), "a?");
    json_decref(s);
    s = pq_jobdoc_raw_string("", 0);
    assert_string_equal(json_string_value(s), "");
    json_decref(s);
}

/* The provider's bytes, taken as they are, go into the result unchanged (spaces and all). */
static void test_result_spliced(void **state)
{
    const char *raw =
        "{\"id\": \"chatcmpl-2\", \"choices\": [ {\"n\": 1.50} ], \"c\": \"a\\u0000\"}";
    json_t *resp = json_loadb(raw, strlen(raw), JSON_ALLOW_NUL, NULL), *o;
    pq_jobdoc_t d;
    size_t len;
    char *s;
    (void)state;

    doc_init(&d);
    d.response = resp;
    d.response_text = raw;
    d.response_len = strlen(raw);
    s = pq_jobdoc_result(&d, &len);
    assert_non_null(s);
    assert_int_equal(len, strlen(s));
    assert_non_null(strstr(s, raw));
    o = json_loadb(s, len, JSON_ALLOW_NUL | JSON_REJECT_DUPLICATES, NULL);
    assert_non_null(o);
    assert_true(json_equal(json_object_get(o, "response"), resp));
    assert_string_equal(str(o, "id"), "j1");
    assert_null(json_object_get(o, "error"));
    json_decref(o);
    free(s);
    /* text without a completion object is enough */
    d.response = NULL;
    s = pq_jobdoc_result(&d, &len);
    assert_non_null(strstr(s, raw));
    assert_null(strstr(s, "\"error\""));
    free(s);
    json_decref(resp);
}

static void test_cache_entry(void **state)
{
    json_t *resp = json_pack("{s:s}", "content", "a\\u0000b"), *doc;
    size_t len;
    char *s, *text;
    (void)state;

    text = json_dumps(resp, JSON_COMPACT);
    s = pq_jobdoc_cache_entry("openai", "gpt-x", text, strlen(text), &len);
    free(text);
    assert_non_null(s);
    assert_int_equal(len, strlen(s));
    doc = pq_jobdoc_cache_parse(s, len);
    assert_non_null(doc);
    assert_string_equal(str(doc, "provider"), "openai");
    assert_string_equal(str(doc, "model"), "gpt-x");
    assert_true(json_equal(json_object_get(doc, "response"), resp));
    json_decref(doc);
    free(s);
    json_decref(resp);

    /* an answer with U+0000 reads back */
    s = "{\"provider\":\"p\",\"model\":\"m\",\"response\":{\"c\":\"a\\u0000b\"}}";
    doc = pq_jobdoc_cache_parse(s, strlen(s));
    assert_non_null(doc);
    json_decref(doc);
    /* not an entry */
    assert_null(pq_jobdoc_cache_parse("{\"provider\":\"p\",\"model\":\"m\"}", 30));
    assert_null(pq_jobdoc_cache_parse("{\"provider\":1,\"model\":\"m\",\"response\":{}}", 41));
    assert_null(pq_jobdoc_cache_parse("{\"provider\":\"p\",\"model\":\"m\",\"response\":[]}", 42));
    assert_null(pq_jobdoc_cache_parse("nope", 4));
}

static void test_park_since(void **state)
{
    json_t *park = json_pack("{s:s}", "parked_at", "2023-11-14T22:13:20.000Z");
    int64_t ms = 0;
    (void)state;

    assert_int_equal(pq_time_parse("2023-11-14T22:13:20.000Z", &ms), 0);
    assert_int_equal(pq_jobdoc_park_since(park), ms);
    assert_true(ms > 0);
    json_decref(park);
    park = json_pack("{s:s}", "parked_at", "yesterday");
    assert_int_equal(pq_jobdoc_park_since(park), 0);
    json_decref(park);
    park = json_pack("{s:i}", "parked_at", 5);
    assert_int_equal(pq_jobdoc_park_since(park), 0);
    json_decref(park);
    assert_int_equal(pq_jobdoc_park_since(NULL), 0);
}

static int drop_calls;
static char drop_tenant[80];
static int64_t drop_at;

static int drop_before(const char *tenant, int64_t parked_at, void *opaque)
{
    drop_calls++;
    snprintf(drop_tenant, sizeof(drop_tenant), "%s", tenant);
    drop_at = parked_at;
    return parked_at > 0 && parked_at < *(const int64_t *)opaque;
}

static void test_parked_expiry(void **state)
{
    const char *both = "{\"tenant\":\"acme\",\"deadline\":\"2023-11-14T22:13:30.000Z\","
                       "\"park\":{\"parked_at\":\"2023-11-14T22:13:20.000Z\"}}";
    const char *park_only = "{\"park\":{\"parked_at\":\"2023-11-14T22:13:20.000Z\"}}";
    int64_t at = 0, dl = 0, cut;
    int dropped = -1;
    (void)state;

    assert_int_equal(pq_time_parse("2023-11-14T22:13:20.000Z", &at), 0);
    assert_int_equal(pq_time_parse("2023-11-14T22:13:30.000Z", &dl), 0);
    /* the deadline comes first */
    assert_int_equal(pq_jobdoc_parked_expiry(both, strlen(both), 60000, NULL, NULL, &dropped), dl);
    assert_int_equal(dropped, 0);
    /* the park TTL comes first */
    assert_int_equal(pq_jobdoc_parked_expiry(both, strlen(both), 5000, NULL, NULL, &dropped),
                     at + 5000);
    /* neither: never */
    assert_int_equal(pq_jobdoc_parked_expiry("{}", 2, 5000, NULL, NULL, &dropped), INT64_MAX);
    /* not an object: 0, not dropped, the callback not asked */
    drop_calls = 0;
    cut = at + 1;
    dropped = -1;
    assert_int_equal(pq_jobdoc_parked_expiry("[1]", 3, 5000, drop_before, &cut, &dropped), 0);
    assert_int_equal(dropped, 0);
    assert_int_equal(pq_jobdoc_parked_expiry("{", 1, 5000, drop_before, &cut, &dropped), 0);
    assert_int_equal(drop_calls, 0);
    /* dropped: parked before the operator's cut, asked with the tenant and parked_at */
    assert_int_equal(
        pq_jobdoc_parked_expiry(both, strlen(both), 60000, drop_before, &cut, &dropped), dl);
    assert_int_equal(dropped, 1);
    assert_string_equal(drop_tenant, "acme");
    assert_int_equal(drop_at, at);
    /* parked after the cut; no tenant: "default" */
    cut = at;
    pq_jobdoc_parked_expiry(park_only, strlen(park_only), 60000, drop_before, &cut, &dropped);
    assert_int_equal(dropped, 0);
    assert_string_equal(drop_tenant, "default");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_result_succeeded),
        cmocka_unit_test(test_result_failed_error),
        cmocka_unit_test(test_result_cache_hit),
        cmocka_unit_test(test_dlq),
        cmocka_unit_test(test_dlq_small_without_envelope),
        cmocka_unit_test(test_invalid),
        cmocka_unit_test(test_raw_string),
        cmocka_unit_test(test_result_spliced),
        cmocka_unit_test(test_cache_entry),
        cmocka_unit_test(test_park_since),
        cmocka_unit_test(test_parked_expiry),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
