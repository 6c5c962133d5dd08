/* OpenAI chat completions (and OpenAI-compatible servers: Ollama, vLLM, llama.cpp).
 * POST {base_url}/chat/completions with the request as is, "model" set to the target's model and
 * streaming turned off; the stream request has "stream": true and "stream_options":
 * {"include_usage": true} (always: the assembled answer needs the usage).
 *
 * Errors {"error":{"message","type","param","code"}} are classified by status, then by code or
 * type (pq_provider_openai_fault, shared with Azure): context_length_exceeded -> context_length;
 * content_policy_violation / content_filter -> content_filter; a 429 insufficient_quota is
 * key-wide. string_above_max_length (a per-field limit, not the context window) and
 * invalid_prompt stay refused. */
#include "provider.h"
#include "common.h"
#include "promptq/jscan.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* stream: ask for an SSE stream with usage on its last chunk. */
static pq_err_t openai_build(const pq_target_t *target, const json_t *request, const char *key,
                             pq_provider_req_t *out, char *errstr, size_t errstr_size, int stream)
{
    const pq_provider_conf_t *p = target->p;
    json_t *body = json_copy((json_t *)request); /* shallow: values are shared, not copied */
    pq_err_t err;

    if ((err = pq_provider_req_start(body, out, errstr, errstr_size)) != PQ_OK)
        goto out;
    err = PQ_ERR_NOMEM;
    if (json_object_set_new(body, "model", json_string(target->model)) != 0)
        goto out;
    if (pq_provider_stream_fields(body, stream))
        goto out;

    if (pq_provider_req_json(out, body) ||
        pq_provider_req_url(out, "%s/chat/completions", p->base_url) ||
        (key && *key && pq_provider_header_add_bearer(&out->headers, key)))
        goto out;
    /* header lines are capped at 1023 bytes here (PQ_ERR_CONFIG beyond) */
    err = pq_provider_headers_add_conf(&out->headers, p, 1024, errstr, errstr_size);
out:
    json_decref(body);
    return pq_provider_req_end(out, err, errstr, errstr_size);
}

static pq_err_t openai_build_request(const pq_target_t *target, const json_t *request,
                                     const char *key, pq_provider_req_t *out, char *errstr,
                                     size_t errstr_size)
{
    return openai_build(target, request, key, out, errstr, errstr_size, 0);
}

static pq_err_t openai_build_stream_request(const pq_target_t *target, const json_t *request,
                                            const char *key, pq_provider_req_t *out, char *errstr,
                                            size_t errstr_size)
{
    return openai_build(target, request, key, out, errstr, errstr_size, 1);
}

/* 1 when the code or type of an OpenAI error object is word. */
static int error_is(const char *code, const char *type, const char *word)
{
    return strcmp(code, word) == 0 || strcmp(type, word) == 0;
}

pq_err_t pq_provider_openai_fault(const pq_target_t *target, pq_err_t err, const json_t *error,
                                  pq_provider_fault_t *fault)
{
    char code[64] = "", type[64] = "";
    json_t *inner = json_object_get(error, "innererror"), *msg = json_object_get(error, "message");

    if (!json_is_object(error))
        return err;
    pq_provider_safe_token(json_object_get(error, "code"), code, sizeof(code));
    pq_provider_safe_token(json_object_get(error, "type"), type, sizeof(type));
    pq_provider_fault_code(fault, code[0] ? code : type);
    if (err == PQ_ERR_REFUSED) {
        char inner_code[64] = "";
        pq_provider_safe_token(json_object_get(inner, "code"), inner_code, sizeof(inner_code));
        if (error_is(code, type, "context_length_exceeded") ||
            /* compatible servers (vLLM) say it with OpenAI's words but without the code */
            (!code[0] && pq_provider_str_has(msg, "maximum context length")))
            err = PQ_ERR_CONTEXT_LENGTH;
        else if (error_is(code, type, "content_policy_violation") ||
                 error_is(code, type, "content_filter") ||
                 strcmp(inner_code, "ResponsibleAIPolicyViolation") == 0)
            err = PQ_ERR_CONTENT_FILTER;
    }
    if (fault && err == PQ_ERR_RATE_LIMITED && error_is(code, type, "insufficient_quota"))
        fault->key_wide = 1; /* the key has no quota left for any model */
    if (err == PQ_ERR_CONTEXT_LENGTH || err == PQ_ERR_CONTENT_FILTER || err == PQ_ERR_REFUSED ||
        err == PQ_ERR_NOT_FOUND)
        pq_provider_fault_reason(fault, target, msg);
    return err;
}

static const char *const usage_names[] = {"prompt_tokens", "completion_tokens", "total_tokens"};

/* A content parts array as pq_provider_content_ok takes it: objects with a string "type", and
 * a string "text" in the "text" ones. */
static int parts_as_is(const pq_js_t *content)
{
    pq_js_iter_t it;
    pq_js_t part, type, text;

    pq_js_iter(content, &it);
    while (pq_js_next_elem(&it, &part)) {
        if (!pq_js_unique_names(&part, 64) || !pq_js_get(&part, "type", &type) ||
            !pq_js_str_plain(&type))
            return 0;
        if (pq_js_str_is(&type, "text") &&
            (!pq_js_get(&part, "text", &text) || text.type != PQ_JS_STRING))
            return 0;
    }
    return 1;
}

/* openai_parse_response's checks, on the text: every one it would fix up or refuse makes this
 * say 0, so the two agree (test_provider_adapters and fuzz_provider hold them to it). */
static int openai_answer_as_is(const pq_target_t *target, const char *body, size_t len,
                               int64_t *total_tokens)
{
    pq_js_t root, v, choices, c, msg, content, usage;
    pq_js_iter_t it;
    int64_t counts[3];
    size_t n = 0;

    (void)target;
    if (pq_js_check(body, len, PQ_PROVIDER_JSON_DEPTH, &root, NULL) != 0 ||
        !pq_js_unique_names(&root, 64))
        return 0;
    if (!pq_js_get(&root, "object", &v) || v.type != PQ_JS_STRING ||
        !pq_js_get(&root, "created", &v) || v.type != PQ_JS_INTEGER ||
        !pq_js_get(&root, "model", &v) || v.type != PQ_JS_STRING ||
        !pq_js_get(&root, "choices", &choices) || choices.type != PQ_JS_ARRAY)
        return 0;
    pq_js_iter(&choices, &it);
    while (pq_js_next_elem(&it, &c)) {
        n++;
        if (!pq_js_unique_names(&c, 64) || !pq_js_get(&c, "message", &msg) ||
            !pq_js_unique_names(&msg, 64) || !pq_js_get(&c, "index", &v) ||
            v.type != PQ_JS_INTEGER || !pq_js_get(&c, "finish_reason", &v) ||
            v.type != PQ_JS_STRING)
            return 0;
        if (pq_js_get(&msg, "content", &content) && content.type != PQ_JS_NULL &&
            content.type != PQ_JS_STRING && (content.type != PQ_JS_ARRAY || !parts_as_is(&content)))
            return 0;
    }
    if (n == 0 || !pq_js_get(&root, "usage", &usage) || !pq_js_unique_names(&usage, 64))
        return 0;
    for (size_t i = 0; i < 3; i++)
        if (!pq_js_get(&usage, usage_names[i], &v) || pq_js_int(&v, &counts[i]) != 0 ||
            counts[i] < 0)
            return 0;
    if (counts[2] == 0 && (counts[0] != 0 || counts[1] != 0))
        return 0; /* parse_response fills the total in */
    *total_tokens = counts[2];
    return 1;
}

static pq_err_t openai_parse_response(const pq_target_t *target, long status, const char *body,
                                      size_t len, json_t **completion, int *verbatim,
                                      pq_provider_fault_t *fault, char *errstr, size_t errstr_size)
{
    pq_err_t err = pq_err_from_http_status(status);
    json_t *root = json_loadb(body, len, JSON_ALLOW_NUL, NULL);
    json_t *choices;
    json_int_t counts[3];
    int64_t total;
    int changed = 0;

    *completion = NULL;
    if (err != PQ_OK) {
        char token[80] = "";
        json_t *e = json_is_object(root) ? json_object_get(root, "error") : NULL;
        if (json_is_object(e)) {
            pq_provider_safe_token(json_object_get(e, "type"), token, sizeof(token));
            if (!token[0])
                pq_provider_safe_token(json_object_get(e, "code"), token, sizeof(token));
        }
        err = pq_provider_openai_fault(target, err, e, fault);
        pq_provider_http_error(errstr, errstr_size, target, status, token);
        goto out;
    }
    choices = json_is_object(root) ? json_object_get(root, "choices") : NULL;
    if (!json_is_array(choices) || json_array_size(choices) == 0) {
        snprintf(errstr, errstr_size, "%s answered HTTP %ld without choices", target->p->name,
                 status);
        err = PQ_ERR_MALFORMED;
        goto out;
    }
    for (size_t i = 0; i < json_array_size(choices); i++) {
        json_t *c = json_array_get(choices, i);
        if (!json_is_object(c) || !json_is_object(json_object_get(c, "message"))) {
            snprintf(errstr, errstr_size, "%s answered a choice without a message",
                     target->p->name);
            err = PQ_ERR_MALFORMED;
            goto out;
        }
        if (!pq_provider_content_ok(json_object_get(json_object_get(c, "message"), "content"))) {
            snprintf(errstr, errstr_size, "%s answered a message with unreadable content",
                     target->p->name);
            err = PQ_ERR_MALFORMED;
            goto out;
        }
        if (!json_is_integer(json_object_get(c, "index"))) {
            json_object_set_new(c, "index", json_integer((json_int_t)i));
            changed = 1;
        }
        if (!json_is_string(json_object_get(c, "finish_reason"))) {
            json_object_set_new(c, "finish_reason", json_string("stop"));
            changed = 1;
        }
    }
    if ((err = pq_provider_usage_read(target, json_object_get(root, "usage"), usage_names, counts,
                                      3, errstr, errstr_size)) != PQ_OK)
        goto out;
    if (!json_is_string(json_object_get(root, "object"))) {
        json_object_set_new(root, "object", json_string("chat.completion"));
        changed = 1;
    }
    if (!json_is_integer(json_object_get(root, "created"))) {
        json_object_set_new(root, "created", json_integer((json_int_t)time(NULL)));
        changed = 1;
    }
    if (!json_is_string(json_object_get(root, "model"))) {
        json_object_set_new(root, "model", json_string(target->model));
        changed = 1;
    }
    /* the counts, checked, replace what was sent (a missing or null count is 0; other usage
     * fields such as prompt_tokens_details stay) */
    if (!json_is_object(json_object_get(root, "usage")) &&
        json_object_set_new(root, "usage", json_object()))
        goto out_nomem;
    if (counts[2] == 0)
        counts[2] = counts[0] + counts[1];
    for (size_t i = 0; i < 3; i++) {
        json_t *usage = json_object_get(root, "usage"), *v = json_object_get(usage, usage_names[i]);
        /* a count already there as the integer it is stays as sent */
        if (json_is_integer(v) && json_integer_value(v) == counts[i])
            continue;
        changed = 1;
        if (json_object_set_new(usage, usage_names[i], json_integer(counts[i])))
            goto out_nomem;
    }
    /* as it is only when the fast path would take it too: a strict text (jansson reads a few
     * things other readers need not, such as a raw NUL byte between tokens) without a member
     * name twice where it is checked (a reader keeping the first would see what was not) */
    if (verbatim && !changed && openai_answer_as_is(target, body, len, &total))
        *verbatim = 1;
    *completion = root;
    root = NULL;
    goto out;

out_nomem:
    snprintf(errstr, errstr_size, "out of memory");
    err = PQ_ERR_NOMEM;
out:
    json_decref(root);
    return err;
}

const pq_provider_ops_t pq_provider_openai = {
    .type = "openai",
    .build_request = openai_build_request,
    .build_stream_request = openai_build_stream_request,
    .parse_response = openai_parse_response,
    .answer_as_is = openai_answer_as_is,
};
