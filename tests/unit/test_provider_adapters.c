/* Provider adapters (Azure OpenAI, Anthropic, Gemini, watsonx), data-driven.
 *
 * Each folder $PQ_TEST_DATA/providers/<type>/<case>/ holds a README line citing the public
 * reference the case follows, and either
 *   - a request case: request.json (OpenAI-shaped input), optional target.json ({"model",
 *     "base_url", "default_max_tokens", "headers": {name: value}, "api_version", "azure_api",
 *     "project_id", "space_id", "watsonx_version" (null unsets the default)} overriding the
 *     test target),
 *     optional key.txt (the key to pass, default KEY below), and expected_request.json
 *     ({"url", "headers": {name: value} that must be sent, "headers_absent": [names],
 *     "body": the JSON body}) or expected_error.json ({"error": pq_err_name, "errstr_contains"});
 *   - an answer case: status (the HTTP status), response.json or response.txt (the raw body) and
 *     expected_completion.json (the OpenAI chat.completion; "created": "$now" means "the current
 *     time") or expected_error.json, and optional fault.json ({"code", "reason" (exact),
 *     "reason_contains", "key_wide"}: the pq_provider_fault_t parse_response fills; without it
 *     the fault is only checked for the key), and optional verbatim ("1" or "0": whether the
 *     adapter says the body is the completion unchanged; whenever it says so, the body must
 *     read back as the completion, and the adapter's answer_as_is fast path, when it has one,
 *     must say the same).
 * Every errstr and fault is checked for the key (error fixtures echo it in their messages, G6);
 * the test provider's configured key is KEY, so the reason sanitiser sees it.
 * Also: watsonx IAM token request/parse, keys echoed in error bodies, request out-param hygiene. */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <cmocka.h>

#include "providers/provider.h"
#include "providers/common.h"
#include "promptq/util.h"

/* Not in provider.h yet (the lead adds them with the registry). */
extern const pq_provider_ops_t pq_provider_azure_openai;
extern const pq_provider_ops_t pq_provider_anthropic;
extern const pq_provider_ops_t pq_provider_gemini;

#define KEY    "sk-test-SECRETKEY-0001"
#define SECRET "SECRETKEY"
#define BASE   "http://127.0.0.1:9"

typedef struct adapter_s {
    const char *type;
    const pq_provider_ops_t *ops;
    const char *model;
} adapter_t;

static const adapter_t adapters[] = {
    {"azure_openai", &pq_provider_azure_openai, "gpt4o-deploy"},
    {"anthropic", &pq_provider_anthropic, "claude-3-5-haiku-latest"},
    {"gemini", &pq_provider_gemini, "gemini-2.0-flash"},
    {"watsonx", &pq_provider_watsonx, "ibm/granite-3-8b-instruct"},
    {"openai", &pq_provider_openai, "gpt-4o-mini"},
};
#define NADAPTERS (sizeof(adapters) / sizeof(adapters[0]))

/* A provider config and target for one case; strings point into the case's target.json. */
typedef struct fixture_s {
    pq_provider_conf_t p;
    pq_target_t t;
    pq_kv_t headers[8];
    char *keys[1];
    json_t *target_json;
} fixture_t;

static const char *data_dir(void)
{
    const char *d = getenv("PQ_TEST_DATA");
    return d ? d : "tests/data";
}

static void fixture_init(fixture_t *f, const adapter_t *a, json_t *target_json)
{
    const char *k;
    json_t *v;

    memset(f, 0, sizeof(*f));
    f->target_json = target_json;
    f->p.name = (char *)"prov";
    f->p.type = (char *)a->type;
    f->p.base_url = (char *)BASE;
    f->p.api_version = (char *)"2024-10-21";
    f->p.project_id = (char *)"proj-1";
    f->p.iam_url = (char *)BASE "/identity/token";
    f->p.default_max_tokens = 4096;
    f->keys[0] = (char *)KEY;
    f->p.api_keys = f->keys;
    f->p.napi_keys = 1;
    f->t.provider = (char *)"prov";
    f->t.model = (char *)a->model;
    f->t.p = &f->p;
    if (!target_json)
        return;
    if ((v = json_object_get(target_json, "model")))
        f->t.model = (char *)json_string_value(v);
    if ((v = json_object_get(target_json, "base_url")))
        f->p.base_url = (char *)json_string_value(v);
    /* provider strings: a JSON null unsets the test default */
    if ((v = json_object_get(target_json, "api_version")))
        f->p.api_version = (char *)json_string_value(v);
    if ((v = json_object_get(target_json, "azure_api")))
        f->p.azure_api = (char *)json_string_value(v);
    if ((v = json_object_get(target_json, "project_id")))
        f->p.project_id = (char *)json_string_value(v);
    if ((v = json_object_get(target_json, "space_id")))
        f->p.space_id = (char *)json_string_value(v);
    if ((v = json_object_get(target_json, "watsonx_version")))
        f->p.watsonx_version = (char *)json_string_value(v);
    if ((v = json_object_get(target_json, "default_max_tokens")))
        f->p.default_max_tokens = (int)json_integer_value(v);
    json_object_foreach(json_object_get(target_json, "headers"), k, v)
    {
        assert_true(f->p.nheaders < 8);
        f->headers[f->p.nheaders].key = (char *)k;
        f->headers[f->p.nheaders].value = (char *)json_string_value(v);
        f->p.nheaders++;
    }
    f->p.headers = f->headers;
}

static char *case_path(const char *type, const char *name, const char *file)
{
    char *path;
    assert_true(asprintf(&path, "%s/providers/%s/%s/%s", data_dir(), type, name, file) > 0);
    return path;
}

static char *case_read(const char *type, const char *name, const char *file, size_t *len)
{
    char *path = case_path(type, name, file), *buf;
    size_t l = 0;
    buf = pq_file_read(path, 4 * 1024 * 1024, &l);
    free(path);
    if (len)
        *len = l;
    return buf;
}

static json_t *case_json(const char *type, const char *name, const char *file)
{
    char *path = case_path(type, name, file);
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    free(path);
    return j;
}

static void assert_json_equal(const json_t *got, const json_t *want, const char *what)
{
    if (!json_equal((json_t *)got, (json_t *)want)) {
        char *g = json_dumps(got, JSON_INDENT(1) | JSON_SORT_KEYS | JSON_ENCODE_ANY);
        char *w = json_dumps(want, JSON_INDENT(1) | JSON_SORT_KEYS | JSON_ENCODE_ANY);
        print_error("%s differs\n--- got\n%s\n--- want\n%s\n", what, g ? g : "(null)",
                    w ? w : "(null)");
        free(g);
        free(w);
        fail();
    }
}

static void assert_no_secret(const char *errstr)
{
    if (strstr(errstr, SECRET)) {
        print_error("errstr leaks the key: %s\n", errstr);
        fail();
    }
}

/* Neither the fault's code nor its reason holds the key or a piece of it. */
static void assert_fault_no_secret(const pq_provider_fault_t *fault)
{
    assert_no_secret(fault->code);
    assert_no_secret(fault->reason);
    for (size_t i = 0; i + 6 <= strlen(KEY); i++) /* no 6 characters of the key */
        if (memmem(fault->reason, strlen(fault->reason), KEY + i, 6))
            fail_msg("fault reason holds a piece of the key: %s", fault->reason);
    assert_true(strlen(fault->reason) < sizeof(fault->reason));
}

static void check_fault(const json_t *exp, const pq_provider_fault_t *fault)
{
    const char *code = json_string_value(json_object_get(exp, "code"));
    const char *reason = json_string_value(json_object_get(exp, "reason"));
    const char *sub = json_string_value(json_object_get(exp, "reason_contains"));

    assert_fault_no_secret(fault);
    if (!exp)
        return;
    assert_string_equal(fault->code, code ? code : "");
    if (reason)
        assert_string_equal(fault->reason, reason);
    if (sub && !strstr(fault->reason, sub))
        fail_msg("fault reason \"%s\" lacks \"%s\"", fault->reason, sub);
    assert_int_equal(fault->key_wide, json_is_true(json_object_get(exp, "key_wide")) ? 1 : 0);
}

/* The value of header name in list (case-insensitive name), or NULL; fails on duplicates. */
static const char *header_get(const struct curl_slist *list, const char *name)
{
    const char *found = NULL;
    size_t n = strlen(name);

    for (; list; list = list->next)
        if (strncasecmp(list->data, name, n) == 0 && list->data[n] == ':') {
            if (found)
                fail_msg("header %s sent twice", name);
            found = list->data + n + 1;
            while (*found == ' ')
                found++;
        }
    return found;
}

static void check_expected_error(const json_t *exp, pq_err_t err, const char *errstr)
{
    const char *want = json_string_value(json_object_get(exp, "error"));
    const char *sub = json_string_value(json_object_get(exp, "errstr_contains"));

    assert_non_null(want);
    if (strcmp(pq_err_name(err), want) != 0)
        fail_msg("expected error %s, got %s (%s)", want, pq_err_name(err), errstr);
    assert_true(errstr[0] != '\0');
    if (sub && !strstr(errstr, sub))
        fail_msg("errstr \"%s\" lacks \"%s\"", errstr, sub);
}

static void run_request_case(const adapter_t *a, const char *name)
{
    json_t *req = case_json(a->type, name, "request.json");
    json_t *exp_req = case_json(a->type, name, "expected_request.json");
    json_t *exp_err = case_json(a->type, name, "expected_error.json");
    char *key = case_read(a->type, name, "key.txt", NULL), errstr[512] = "";
    pq_provider_req_t out;
    fixture_t f;
    pq_err_t err;

    assert_non_null(req);
    assert_true((exp_req != NULL) != (exp_err != NULL));
    fixture_init(&f, a, case_json(a->type, name, "target.json"));
    /* req_stream*: the streamed form (build_stream_request) */
    if (strncmp(name, "req_stream", 10) == 0) {
        assert_non_null(a->ops->build_stream_request);
        err =
            a->ops->build_stream_request(&f.t, req, key ? key : KEY, &out, errstr, sizeof(errstr));
    } else {
        err = a->ops->build_request(&f.t, req, key ? key : KEY, &out, errstr, sizeof(errstr));
    }
    assert_no_secret(errstr);
    if (exp_err) {
        check_expected_error(exp_err, err, errstr);
        assert_null(out.url);
        assert_null(out.body);
        assert_null(out.headers);
    } else {
        json_t *body, *v;
        const char *h;
        size_t i;

        if (err != PQ_OK)
            fail_msg("build_request: %s: %s", pq_err_name(err), errstr);
        assert_string_equal(out.url, json_string_value(json_object_get(exp_req, "url")));
        assert_non_null(out.body);
        assert_int_equal(out.body_len, strlen(out.body));
        body = json_loadb(out.body, out.body_len, 0, NULL);
        assert_non_null(body);
        assert_json_equal(body, json_object_get(exp_req, "body"), "request body");
        json_decref(body);
        json_object_foreach(json_object_get(exp_req, "headers"), h, v)
        {
            const char *got = header_get(out.headers, h);
            if (!got)
                fail_msg("header %s not sent", h);
            assert_string_equal(got, json_string_value(v));
        }
        json_array_foreach(json_object_get(exp_req, "headers_absent"), i, v)
        {
            if (header_get(out.headers, json_string_value(v)))
                fail_msg("header %s sent", json_string_value(v));
        }
        pq_provider_req_clear(&out);
        assert_null(out.url);
    }
    free(key);
    json_decref(f.target_json);
    json_decref(req);
    json_decref(exp_req);
    json_decref(exp_err);
}

/* Shape every completion must have, whatever the provider (DESIGN.md §3). */
static void check_completion_shape(const json_t *c)
{
    json_t *choices = json_object_get(c, "choices"), *ch, *u = json_object_get(c, "usage");
    size_t i;

    assert_string_equal(json_string_value(json_object_get(c, "object")), "chat.completion");
    assert_true(json_is_integer(json_object_get(c, "created")));
    assert_true(json_is_string(json_object_get(c, "model")));
    assert_true(json_array_size(choices) > 0);
    json_array_foreach(choices, i, ch)
    {
        assert_true(json_is_integer(json_object_get(ch, "index")));
        assert_true(json_is_object(json_object_get(ch, "message")));
        assert_true(json_is_string(json_object_get(ch, "finish_reason")));
    }
    assert_true(json_is_integer(json_object_get(u, "prompt_tokens")));
    assert_true(json_is_integer(json_object_get(u, "completion_tokens")));
    assert_true(json_is_integer(json_object_get(u, "total_tokens")));
}

static void run_response_case(const adapter_t *a, const char *name)
{
    json_t *exp_c = case_json(a->type, name, "expected_completion.json");
    json_t *exp_err = case_json(a->type, name, "expected_error.json");
    json_t *exp_fault = case_json(a->type, name, "fault.json");
    char *status_s = case_read(a->type, name, "status", NULL), errstr[512] = "";
    char *exp_verbatim = case_read(a->type, name, "verbatim", NULL);
    pq_provider_fault_t fault;
    int verbatim = 0;
    json_t *completion = (json_t *)1;
    size_t len = 0;
    char *body = case_read(a->type, name, "response.json", &len);
    fixture_t f;
    pq_err_t err;

    if (!body)
        body = case_read(a->type, name, "response.txt", &len);
    assert_non_null(body);
    assert_non_null(status_s);
    assert_true((exp_c != NULL) != (exp_err != NULL));
    fixture_init(&f, a, case_json(a->type, name, "target.json"));
    memset(&fault, 0, sizeof(fault));
    err = a->ops->parse_response(&f.t, atol(status_s), body, len, &completion, &verbatim, &fault,
                                 errstr, sizeof(errstr));
    assert_no_secret(errstr);
    if (exp_verbatim)
        assert_int_equal(verbatim, atoi(exp_verbatim));
    if (a->ops->answer_as_is && pq_err_from_http_status(atol(status_s)) == PQ_OK) {
        /* the fast path agrees with parse_response: as it is exactly when verbatim */
        int64_t total = -1;
        int as_is = a->ops->answer_as_is(&f.t, body, len, &total);
        assert_int_equal(as_is, verbatim);
        if (as_is)
            assert_int_equal(total, json_integer_value(json_object_get(
                                        json_object_get(completion, "usage"), "total_tokens")));
    }
    if (verbatim) {
        json_t *as_sent = json_loadb(body, len, JSON_ALLOW_NUL, NULL);
        assert_int_equal(err, PQ_OK);
        assert_json_equal(as_sent, completion, "the body said to be verbatim");
        json_decref(as_sent);
    }
    check_fault(exp_fault, &fault);
    if (exp_err) {
        check_expected_error(exp_err, err, errstr);
        assert_null(completion);
    } else {
        json_t *created;
        if (err != PQ_OK)
            fail_msg("parse_response: %s: %s", pq_err_name(err), errstr);
        check_completion_shape(completion);
        created = json_object_get(exp_c, "created");
        if (json_is_string(created) && strcmp(json_string_value(created), "$now") == 0) {
            json_int_t got = json_integer_value(json_object_get(completion, "created"));
            json_int_t now = (json_int_t)time(NULL);
            assert_true(got >= now - 60 && got <= now + 60);
            json_object_del(completion, "created");
            json_object_del(exp_c, "created");
        }
        assert_json_equal(completion, exp_c, "completion");
        json_decref(completion);
    }
    json_decref(f.target_json);
    json_decref(exp_c);
    json_decref(exp_err);
    json_decref(exp_fault);
    free(status_s);
    free(exp_verbatim);
    free(body);
}

typedef struct case_s {
    const adapter_t *a;
    char name[256];
} case_t;

static void test_case(void **state)
{
    const case_t *c = *state;
    char *path = case_path(c->a->type, c->name, "request.json");
    FILE *fp = fopen(path, "r");

    free(path);
    if (fp) {
        fclose(fp);
        run_request_case(c->a, c->name);
    } else {
        run_response_case(c->a, c->name);
    }
}

/* ---- hand-written tests ---- */

/* Error bodies that echo the key in every field, for every status: errstr never holds it. */
static void test_no_key_in_errstr(void **state)
{
    static const long statuses[] = {400, 401, 403, 404, 408, 413, 422, 429, 500, 502, 503, 529};
    static const char *const bodies[] = {
        "{\"error\":{\"message\":\"bad key " KEY "\",\"type\":\"" KEY "\",\"code\":\"" KEY
        "\",\"status\":\"" KEY "\"}}",
        "{\"type\":\"error\",\"error\":{\"type\":\"" KEY "\",\"message\":\"" KEY "\"}}",
        "{\"errors\":[{\"code\":\"" KEY "\",\"message\":\"" KEY "\"}],\"trace\":\"" KEY "\"}",
        "{\"error\":{\"code\":401,\"message\":\"API key " KEY " not valid\",\"status\":\"" KEY
        "\",\"details\":[{\"reason\":\"" KEY "\"}]}}",
        "key=" KEY,
        "",
    };
    (void)state;
    for (size_t a = 0; a < NADAPTERS; a++)
        for (size_t s = 0; s < sizeof(statuses) / sizeof(statuses[0]); s++)
            for (size_t b = 0; b < sizeof(bodies) / sizeof(bodies[0]); b++) {
                fixture_t f;
                json_t *c = NULL;
                char errstr[512] = "";
                pq_provider_fault_t fault;
                pq_err_t err;
                fixture_init(&f, &adapters[a], NULL);
                memset(&fault, 0, sizeof(fault));
                err = adapters[a].ops->parse_response(
                    &f.t, statuses[s], bodies[b], strlen(bodies[b]), &c, NULL,
                    b % 2 ? &fault : NULL, errstr, sizeof(errstr));
                assert_int_not_equal(err, PQ_OK);
                assert_null(c);
                assert_no_secret(errstr);
                assert_fault_no_secret(&fault);
                assert_int_equal(err, statuses[s] == 529 ? PQ_ERR_OVERLOADED
                                                         : pq_err_from_http_status(statuses[s]));
            }
}

/* A 2xx body that is JSON but not an answer is malformed (retryable) for every adapter. */
static void test_malformed_2xx(void **state)
{
    static const char *const bodies[] = {"", "{", "[]", "null", "{\"choices\":[]}", "\"x\""};
    (void)state;
    for (size_t a = 0; a < NADAPTERS; a++)
        for (size_t b = 0; b < sizeof(bodies) / sizeof(bodies[0]); b++) {
            fixture_t f;
            json_t *c = NULL;
            char errstr[256] = "";
            pq_err_t err;
            fixture_init(&f, &adapters[a], NULL);
            err = adapters[a].ops->parse_response(&f.t, 200, bodies[b], strlen(bodies[b]), &c, NULL,
                                                  NULL, errstr, sizeof(errstr));
            if (err != PQ_ERR_MALFORMED)
                fail_msg("%s on \"%s\": %s", adapters[a].type, bodies[b], pq_err_name(err));
            assert_true(pq_err_is_retryable(err));
            assert_null(c);
        }
}

/* A request that is not an object, or has no messages, is invalid and leaves out zeroed. */
static void test_invalid_requests(void **state)
{
    json_t *reqs[] = {json_array(), json_pack("{s:s}", "model", "x"),
                      json_pack("{s:[i]}", "messages", 1)};
    (void)state;
    for (size_t a = 0; a < NADAPTERS; a++) {
        if (strcmp(adapters[a].type, "azure_openai") == 0 ||
            strcmp(adapters[a].type, "openai") == 0)
            continue; /* passes the body through: the provider judges it */
        for (size_t r = 0; r < sizeof(reqs) / sizeof(reqs[0]); r++) {
            fixture_t f;
            pq_provider_req_t out;
            char errstr[256] = "";
            pq_err_t err;
            fixture_init(&f, &adapters[a], NULL);
            err = adapters[a].ops->build_request(&f.t, reqs[r], KEY, &out, errstr, sizeof(errstr));
            if (err != PQ_ERR_INVALID)
                fail_msg("%s request %zu: %s", adapters[a].type, r, pq_err_name(err));
            assert_null(out.url);
            assert_null(out.body);
            assert_null(out.headers);
            assert_no_secret(errstr);
        }
    }
    for (size_t r = 0; r < sizeof(reqs) / sizeof(reqs[0]); r++)
        json_decref(reqs[r]);
}

/* Without a key no auth header is sent (local gateways, custom auth headers). */
static void test_no_key(void **state)
{
    json_t *req = json_pack("{s:[{s:s, s:s}]}", "messages", "role", "user", "content", "hi");
    static const char *const auth[] = {"api-key", "x-api-key", "x-goog-api-key", "Authorization"};
    (void)state;
    for (size_t a = 0; a < NADAPTERS; a++) {
        fixture_t f;
        pq_provider_req_t out;
        char errstr[256] = "";
        fixture_init(&f, &adapters[a], NULL);
        assert_int_equal(
            adapters[a].ops->build_request(&f.t, req, NULL, &out, errstr, sizeof(errstr)), PQ_OK);
        for (size_t h = 0; h < sizeof(auth) / sizeof(auth[0]); h++)
            assert_null(header_get(out.headers, auth[h]));
        pq_provider_req_clear(&out);
    }
    json_decref(req);
}

static void test_watsonx_token_request(void **state)
{
    fixture_t f;
    pq_provider_req_t out;
    char errstr[256] = "";
    (void)state;

    fixture_init(&f, &adapters[3], NULL);
    assert_int_equal(pq_provider_watsonx.token_request(&f.p, "a+b/c=d&e SECRETKEY-1", &out, errstr,
                                                       sizeof(errstr)),
                     PQ_OK);
    assert_string_equal(out.url, BASE "/identity/token");
    assert_string_equal(out.body, "grant_type=urn:ibm:params:oauth:grant-type:apikey&apikey="
                                  "a%2Bb%2Fc%3Dd%26e%20SECRETKEY-1");
    assert_int_equal(out.body_len, strlen(out.body));
    assert_string_equal(header_get(out.headers, "Content-Type"),
                        "application/x-www-form-urlencoded");
    assert_string_equal(header_get(out.headers, "Accept"), "application/json");
    assert_null(header_get(out.headers, "Authorization"));
    pq_provider_req_clear(&out);

    assert_int_equal(pq_provider_watsonx.token_request(&f.p, "", &out, errstr, sizeof(errstr)),
                     PQ_ERR_CONFIG);
    assert_null(out.body);
    f.p.iam_url = NULL;
    assert_int_equal(pq_provider_watsonx.token_request(&f.p, KEY, &out, errstr, sizeof(errstr)),
                     PQ_ERR_CONFIG);
    assert_no_secret(errstr);
}

static pq_err_t token_parse(long status, const char *body, char **token, int64_t *exp, char *errstr,
                            size_t size)
{
    return pq_provider_watsonx.token_parse(status, body, strlen(body), token, exp, errstr, size);
}

static void test_watsonx_token_parse(void **state)
{
    char *token = NULL, errstr[256] = "";
    int64_t exp = 0, now_s = pq_now_ms() / 1000;
    char body[512];
    (void)state;

    /* IAM's documented answer: cached until 60 s before expiration */
    assert_int_equal(token_parse(200,
                                 "{\"access_token\":\"eyJ.SECRETKEY.sig\",\"refresh_token\":"
                                 "\"not_supported\",\"token_type\":\"Bearer\",\"expires_in\":3600,"
                                 "\"expiration\":1700003600,\"scope\":\"ibm openid\"}",
                                 &token, &exp, errstr, sizeof(errstr)),
                     PQ_OK);
    assert_string_equal(token, "eyJ.SECRETKEY.sig");
    assert_int_equal(exp, (int64_t)(1700003600 - 60) * 1000);
    free(token);

    /* a short-lived token is refreshed after 80 % of its life */
    assert_int_equal(token_parse(200,
                                 "{\"access_token\":\"t\",\"expires_in\":100,"
                                 "\"expiration\":1700000100}",
                                 &token, &exp, errstr, sizeof(errstr)),
                     PQ_OK);
    assert_int_equal(exp, (int64_t)(1700000100 - 20) * 1000);
    free(token);

    /* expires_in without expiration: counted from now */
    assert_int_equal(token_parse(200, "{\"access_token\":\"t\",\"expires_in\":3600}", &token, &exp,
                                 errstr, sizeof(errstr)),
                     PQ_OK);
    assert_true(exp >= (now_s + 3600 - 60 - 5) * 1000 && exp <= (now_s + 3600 - 60 + 5) * 1000);
    free(token);

    /* 2xx without a usable token or expiry: malformed (retryable) */
    static const char *const bad[] = {"{}",
                                      "nope",
                                      "{\"access_token\":\"\",\"expiration\":1}",
                                      "{\"access_token\":7,\"expiration\":1}",
                                      "{\"access_token\":\"a\\r\\nb\",\"expiration\":1}",
                                      "{\"access_token\":\"t\"}"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(token_parse(200, bad[i], &token, &exp, errstr, sizeof(errstr)),
                         PQ_ERR_MALFORMED);
        assert_null(token);
    }

    /* IAM errors: a wrong key is 400 BXNIM0415E, named in errstr without its message */
    snprintf(body, sizeof(body),
             "{\"errorCode\":\"BXNIM0415E\",\"errorMessage\":\"Provided API key could not be "
             "found: %s\",\"context\":{\"requestId\":\"x\"}}",
             KEY);
    assert_int_equal(token_parse(400, body, &token, &exp, errstr, sizeof(errstr)), PQ_ERR_AUTH);
    assert_non_null(strstr(errstr, "BXNIM0415E"));
    assert_no_secret(errstr);
    assert_null(token);
    snprintf(body, sizeof(body), "{\"errorCode\":\"%s\",\"errorMessage\":\"%s\"}", KEY, KEY);
    assert_int_equal(token_parse(401, body, &token, &exp, errstr, sizeof(errstr)), PQ_ERR_AUTH);
    assert_no_secret(errstr);
    assert_int_equal(token_parse(429, body, &token, &exp, errstr, sizeof(errstr)),
                     PQ_ERR_RATE_LIMITED);
    assert_int_equal(token_parse(503, "<html>", &token, &exp, errstr, sizeof(errstr)),
                     PQ_ERR_SERVER);
    assert_null(token);
}

/* 1 when s is valid UTF-8 without control characters, double, leading or trailing spaces. */
static int reason_well_formed(const char *s)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t n = strlen(s);

    if (n > 0 && (s[0] == ' ' || s[n - 1] == ' '))
        return 0;
    for (size_t i = 0; i < n;) {
        size_t need = u[i] < 0x80 ? 1 : u[i] >= 0xF0 ? 4 : u[i] >= 0xE0 ? 3 : u[i] >= 0xC2 ? 2 : 0;
        if (need == 0 || i + need > n || u[i] < 0x20 || u[i] == 0x7F)
            return 0;
        for (size_t k = 1; k < need; k++)
            if ((u[i + k] & 0xC0) != 0x80)
                return 0;
        if (u[i] == ' ' && u[i + 1] == ' ')
            return 0;
        i += need;
    }
    return 1;
}

static void sanitize_expect(const pq_provider_conf_t *p, const char *in, size_t len,
                            const char *want)
{
    char out[PQ_PROVIDER_REASON_MAX];

    memset(out, 'X', sizeof(out));
    pq_provider_reason_sanitize(in, len, p, out, sizeof(out));
    assert_true(reason_well_formed(out));
    if (strcmp(out, want) != 0)
        fail_msg("sanitised \"%s\", want \"%s\"", out, want);
}
#define SANITIZE_EXPECT(p, lit, want) sanitize_expect(p, lit, sizeof(lit) - 1, want)

static void test_reason_sanitize(void **state)
{
    fixture_t f;
    char *keys[2] = {(char *)KEY, (char *)"hunter2hunter"};
    char big[2048 + 1], out[PQ_PROVIDER_REASON_MAX], small[8];
    size_t n;
    (void)state;

    fixture_init(&f, &adapters[0], NULL);
    f.p.api_keys = keys;
    f.p.napi_keys = 2;

    /* ordinary prose survives intact */
    SANITIZE_EXPECT(&f.p,
                    "This model's maximum context length is 128000 tokens. However, your "
                    "messages resulted in 130412 tokens. Please reduce the length of the messages.",
                    "This model's maximum context length is 128000 tokens. However, your messages "
                    "resulted in 130412 tokens. Please reduce the length of the messages.");
    SANITIZE_EXPECT(&f.p, "prompt is too long: 208656 tokens > 200000 maximum",
                    "prompt is too long: 208656 tokens > 200000 maximum");
    SANITIZE_EXPECT(&f.p, "Café crème, naïve façade — 東京 ✓", "Café crème, naïve façade — 東京 ✓");
    /* the configured key, whole or in pieces, in words of any shape */
    SANITIZE_EXPECT(&f.p, "Incorrect API key provided: " KEY ". Find your key at x.",
                    "Incorrect API key provided: [redacted] Find your key at x.");
    SANITIZE_EXPECT(&f.p, "key (SECRETKEY) and xSECRETx and 'test-S' rejected",
                    "key ([redacted]) and [redacted] and '[redacted]' rejected");
    SANITIZE_EXPECT(&f.p, "token hunter2hunter, or unter2h, is wrong; hunt is fine",
                    "token [redacted], or [redacted], is wrong; hunt is fine");
    /* a masked echo and key-looking words, even of keys not configured */
    SANITIZE_EXPECT(&f.p, "Incorrect API key provided: sk-abc1********wxyz.",
                    "Incorrect API key provided: [redacted]");
    SANITIZE_EXPECT(&f.p, "key abc1****wxyz, ** bold ** and 5 * 3",
                    "key [redacted], ** bold ** and 5 * 3");
    SANITIZE_EXPECT(NULL, "keys sk-x sk_live_1 AIzaSyA Bearer eyJ.a.b req_011CWdepJvA2D819tdYYq4h7",
                    "keys [redacted] [redacted] [redacted] [redacted] eyJ.a.b [redacted]");
    SANITIZE_EXPECT(NULL, "internationalizations internationalization", /* no digits */
                    "internationalizations internationalization");
    /* control characters, newlines and tabs are spaces; runs collapse; ends trimmed */
    SANITIZE_EXPECT(NULL, "  line one\n\tline two\r\n\x01\x7f end  ", "line one line two end");
    SANITIZE_EXPECT(NULL,
                    "a\0b\xc2\x85"
                    "c",
                    "a b c"); /* NUL and C1 NEL */
    /* invalid UTF-8: each bad byte is '?' (bad lead, bad continuation, overlong, surrogate,
     * cut short at the end) */
    SANITIZE_EXPECT(NULL, "bad \xff\xfe \xc3( \xc0\xaf \xed\xa0\x80 end \xe2\x82",
                    "bad ?? ?( ?? ??? end ??");

    /* a 2 KB message: at most 300 bytes, whole words of prose kept up to the cap */
    for (n = 0; n + 5 <= 2048; n += 5)
        memcpy(big + n, "word ", 5);
    memset(big + n, 'x', 2048 - n);
    big[2048] = '\0';
    pq_provider_reason_sanitize(big, 2048, &f.p, out, sizeof(out));
    assert_int_equal(strlen(out), 299); /* 60 "word"s and the space between */
    assert_true(reason_well_formed(out));
    assert_int_equal(strncmp(out, big, strlen(out)), 0);

    /* cut mid-"é" at the cap: the half character is dropped */
    memset(big, 0, sizeof(big));
    for (n = 0; n + 4 <= 296; n += 4)
        memcpy(big + n, "abc ", 4);
    memcpy(big + n, "abcé and more", strlen("abcé and more")); /* é at bytes 299-300 */
    pq_provider_reason_sanitize(big, strlen(big), &f.p, out, sizeof(out));
    assert_int_equal(strlen(out), 299);
    assert_true(reason_well_formed(out));
    assert_string_equal(out + 296, "abc");
    /* ... and at a caller's small buffer */
    pq_provider_reason_sanitize("ab\xc3\xa9\xc3\xa9\xc3\xa9", 8, NULL, small, sizeof(small));
    assert_string_equal(small, "ab\xc3\xa9\xc3\xa9");
    /* a key at the cap is redacted whole, never cut into a shorter piece that passes */
    memset(big, 0, sizeof(big));
    for (n = 0; n + 4 <= 292; n += 4)
        memcpy(big + n, "abc ", 4);
    memcpy(big + n, KEY, strlen(KEY));
    pq_provider_reason_sanitize(big, strlen(big), &f.p, out, sizeof(out));
    assert_null(strstr(out, "sk-"));
    assert_null(strstr(out, "SECRET"));
    assert_true(reason_well_formed(out));

    /* degenerate buffers */
    pq_provider_reason_sanitize("abc", 3, NULL, small, 1);
    assert_string_equal(small, "");
    small[0] = 'Z';
    pq_provider_reason_sanitize("abc", 3, NULL, small, 0);
    assert_int_equal(small[0], 'Z');
    pq_provider_reason_sanitize(NULL, 0, NULL, small, sizeof(small));
    assert_string_equal(small, "");
}

/* ---- main ---- */

static int name_cmp(const void *a, const void *b)
{
    return strcmp(((const case_t *)a)->name, ((const case_t *)b)->name);
}

int main(void)
{
    size_t cap = 512, n = 0;
    case_t *cases = calloc(cap, sizeof(*cases));
    struct CMUnitTest *tests;
    int rc;

    assert_non_null(cases);
    for (size_t a = 0; a < NADAPTERS; a++) {
        char dir[1024];
        size_t first = n;
        DIR *d;
        struct dirent *e;

        snprintf(dir, sizeof(dir), "%s/providers/%s", data_dir(), adapters[a].type);
        if (!(d = opendir(dir))) {
            fprintf(stderr, "no fixtures in %s\n", dir);
            return 1;
        }
        while ((e = readdir(d))) {
            if (e->d_name[0] == '.' || e->d_type != DT_DIR)
                continue;
            if (n == cap) {
                fprintf(stderr, "too many cases\n");
                return 1;
            }
            cases[n].a = &adapters[a];
            pq_strlcpy(cases[n].name, e->d_name, sizeof(cases[n].name));
            n++;
        }
        closedir(d);
        if (n == first) {
            fprintf(stderr, "no fixtures in %s\n", dir);
            return 1;
        }
        qsort(cases + first, n - first, sizeof(*cases), name_cmp);
    }
    tests = calloc(n + 8, sizeof(*tests));
    assert_non_null(tests);
    for (size_t i = 0; i < n; i++) {
        char *tname;
        assert_true(asprintf(&tname, "%s/%s", cases[i].a->type, cases[i].name) > 0);
        tests[i].name = tname;
        tests[i].test_func = test_case;
        tests[i].initial_state = &cases[i];
    }
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_no_key_in_errstr);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_malformed_2xx);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_invalid_requests);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_no_key);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_watsonx_token_request);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_watsonx_token_parse);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_reason_sanitize);
    rc = _cmocka_run_group_tests("provider_adapters", tests, n, NULL, NULL);
    for (size_t i = 0; i < n - 7; i++)
        free((char *)tests[i].name);
    free(tests);
    free(cases);
    return rc;
}
