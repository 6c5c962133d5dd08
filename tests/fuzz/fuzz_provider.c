/* libFuzzer target for the provider adapters (worker/src/providers/): what a provider answers
 * and what a client asks are both outside input. The first byte picks the adapter (low 3 bits),
 * the mode (bit 3) and the HTTP status (high 4 bits); the rest is the body.
 *   answer mode: parse_response on the body. A PQ_OK completion must be a chat.completion
 *     (and when the adapter says verbatim, the body must read back as exactly it)
 *     object with a "choices" array that dumps; errstr must be terminated; the fault's code a
 *     safe token and its reason whole UTF-8 without control bytes; none may carry a fragment
 *     of the key (the body may echo it, as providers' error bodies do: G6).
 *   request mode: the body as an OpenAI chat request through build_request and
 *     build_stream_request; what they build must be freed by pq_provider_req_clear and must
 *     not carry the key in the body or URL. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "providers/provider.h"
#include "promptq/jscan.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define KEY "sk-fuzz-SECRETKEY-0001"

static const struct {
    const pq_provider_ops_t *ops;
    const char *type, *model;
} adapters[] = {
    {&pq_provider_openai, "openai", "gpt-4o-mini"},
    {&pq_provider_azure_openai, "azure_openai", "deploy"},
    {&pq_provider_anthropic, "anthropic", "claude-3-5-haiku-latest"},
    {&pq_provider_gemini, "gemini", "gemini-2.0-flash"},
    {&pq_provider_watsonx, "watsonx", "ibm/granite-3-8b-instruct"},
};
#define NADAPTERS (sizeof(adapters) / sizeof(adapters[0]))

static const long statuses[16] = {200, 200, 200, 201, 400, 401, 403, 404,
                                  408, 409, 413, 422, 429, 500, 503, 529};

/* Aborts when s holds 6 consecutive characters of the key; reason: any such run (the
 * sanitiser's rule), other texts: a run with a digit or dash in it (an error type or code of
 * letters and underscores only is vocabulary, "rate_limit_error", not a key: a fragment made
 * of letters alone is allowed there). */
static void check_key(const char *s, int reason)
{
    static const char key[] = KEY;

    for (size_t i = 0; i + 6 <= sizeof(key) - 1; i++) {
        char run[7];
        memcpy(run, key + i, 6);
        run[6] = '\0';
        if (!reason && strspn(run, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz") == 6)
            continue;
        if (strstr(s, run))
            abort();
    }
}

static void check_text(const char *s, size_t size, int reason)
{
    size_t n = strnlen(s, size);

    if (n == size) /* not terminated inside its buffer */
        abort();
    check_key(s, reason);
    if (!reason)
        return;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20)
            abort();
    /* jansson refuses invalid UTF-8: a reason that is not whole characters fails here */
    if (n > 0) {
        json_t *str = json_stringn(s, n);
        if (!str)
            abort();
        json_decref(str);
    }
}

static void check_code(const char *code)
{
    for (const char *c = code; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
              *c == '_' || *c == '-' || *c == '.'))
            abort();
}

static void answer(const pq_target_t *t, const pq_provider_ops_t *ops, long status,
                   const char *body, size_t len)
{
    pq_provider_fault_t fault;
    json_t *completion = NULL;
    char errstr[256];
    pq_err_t err;
    int verbatim = 0;

    memset(&fault, 0, sizeof(fault));
    errstr[0] = '\0';
    err = ops->parse_response(t, status, body, len, &completion, &verbatim, &fault, errstr,
                              sizeof(errstr));
    if (ops->answer_as_is && pq_err_from_http_status(status) == PQ_OK) {
        /* the fast path takes an answer only when parse_response would, unchanged */
        int64_t total = -1;
        if (ops->answer_as_is(t, body, len, &total) &&
            (err != PQ_OK || !verbatim ||
             total != json_integer_value(
                          json_object_get(json_object_get(completion, "usage"), "total_tokens"))))
            abort();
    }
    if (verbatim) {
        /* said to be the completion as sent: the body reads back as it, and is a strict text */
        json_t *as_sent = json_loadb(body, len, JSON_ALLOW_NUL, NULL);
        pq_js_t v;
        if (pq_js_check(body, len, PQ_PROVIDER_JSON_DEPTH, &v, NULL) != 0)
            abort();
        if (err != PQ_OK || !json_equal(as_sent, completion))
            abort();
        json_decref(as_sent);
    }
    if (err == PQ_OK) {
        char *out;
        if (!json_is_object(completion) || !json_is_array(json_object_get(completion, "choices")))
            abort();
        out = json_dumps(completion, JSON_COMPACT);
        if (!out)
            abort();
        free(out);
    } else if (completion) {
        abort(); /* an error never hands out a completion */
    }
    json_decref(completion);
    check_text(errstr, sizeof(errstr), 0);
    check_text(fault.code, sizeof(fault.code), 0);
    check_code(fault.code);
    check_text(fault.reason, sizeof(fault.reason), 1);
}

static void request(const pq_target_t *t, const pq_provider_ops_t *ops, const char *body,
                    size_t len)
{
    json_t *req = json_loadb(body, len, JSON_ALLOW_NUL, NULL);
    char errstr[256];

    if (!req)
        return;
    for (int streamed = 0; streamed < 2; streamed++) {
        pq_provider_req_t out;
        pq_err_t err;

        if (streamed && !ops->build_stream_request)
            break;
        memset(&out, 0, sizeof(out));
        errstr[0] = '\0';
        err = streamed ? ops->build_stream_request(t, req, KEY, &out, errstr, sizeof(errstr))
                       : ops->build_request(t, req, KEY, &out, errstr, sizeof(errstr));
        check_text(errstr, sizeof(errstr), 0);
        if (err == PQ_OK) {
            if (!out.url || !out.body)
                abort();
            /* the key travels in a header (Gemini: x-goog-api-key), never in a URL or body
             * (unless the client's own request text holds those bytes) */
            if (!memmem(body, len, "SECRETKEY", 9) &&
                (strstr(out.url, "SECRETKEY") || memmem(out.body, out.body_len, "SECRETKEY", 9)))
                abort();
        }
        pq_provider_req_clear(&out);
    }
    json_decref(req);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char *keys[1] = {(char *)KEY};
    pq_provider_conf_t p;
    pq_target_t t;
    unsigned a;

    if (size < 1)
        return 0;
    a = (data[0] & 7u) % NADAPTERS;
    memset(&p, 0, sizeof(p));
    memset(&t, 0, sizeof(t));
    p.name = (char *)"prov";
    p.type = (char *)adapters[a].type;
    p.base_url = (char *)"http://127.0.0.1:9";
    p.api_version = (char *)"2024-10-21";
    p.project_id = (char *)"proj-1";
    p.iam_url = (char *)"http://127.0.0.1:9/identity/token";
    p.default_max_tokens = 4096;
    p.api_keys = keys;
    p.napi_keys = 1;
    t.provider = (char *)"prov";
    t.model = (char *)adapters[a].model;
    t.p = &p;
    if (data[0] & 8u)
        request(&t, adapters[a].ops, (const char *)data + 1, size - 1);
    else
        answer(&t, adapters[a].ops, statuses[data[0] >> 4], (const char *)data + 1, size - 1);
    return 0;
}
