/* IBM watsonx.ai chat (https://cloud.ibm.com/apidocs/watsonx-ai#text-chat) and the IBM Cloud
 * IAM token exchange (https://cloud.ibm.com/docs/iam?topic=iam-iamtoken_from_apikey).
 *
 * POST {base_url}/ml/v1/text/chat?version={watsonx_version} (default
 * PQ_WATSONX_VERSION_DEFAULT) with Authorization: Bearer <IAM token> (the `key` given to
 * build_request is the token the worker exchanged the API key for: token_request and
 * token_parse below, the table's token hooks).
 *
 * Request mapping from OpenAI chat completions: body {model_id: target model, project_id or
 * space_id (whichever the provider config gives), messages, ...}; developer messages become system
 * messages; system and assistant contents given as text parts are joined into a string (watsonx
 * takes a string there); user content parts, tool messages and assistant tool_calls pass unchanged.
 * max_completion_tokens or max_tokens -> max_tokens; stop (string or array) -> stop array;
 * temperature, top_p, n, seed, presence_penalty, frequency_penalty, logit_bias, logprobs,
 * top_logprobs, response_format and tools pass; tool_choice "auto"/"none"/"required" ->
 * tool_choice_option, a {function} object -> tool_choice. functions, function_call, audio,
 * prediction, web_search_options and non-text modalities are PQ_ERR_UNSUPPORTED; stream,
 * stream_options, user, store, metadata, service_tier, parallel_tool_calls and unknown fields are
 * dropped.
 *
 * Answer: OpenAI-like {id, model_id, created, choices, usage}; model_id -> model, choices get an
 * index and a finish_reason (time_limit -> length). Errors {"errors":[{"code","message"}],
 * "trace","status_code"}: errors[0].code names the error in errstr and is the fault's code; a
 * 400 whose message says the input tokens exceed the model's maximum sequence length / total
 * tokens limit is context_length (watsonx gives it no code of its own), other 400/413/422
 * refused; the sanitised message is the fault's reason for those and 404. watsonx chat has no
 * content-filter error (its HAP/PII moderations annotate a successful answer). */
#include "provider.h"
#include "common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "promptq/util.h"

#define IAM_GRANT_APIKEY   "urn:ibm:params:oauth:grant-type:apikey"
#define IAM_TOKEN_MAX      (64 * 1024)
#define IAM_REFRESH_MARGIN 60 /* seconds before expiration */

/* ---- request ---- */

/* Joins the text of string-or-parts content into a new JSON string; NULL if a part is not
 * text (or no memory). */
static json_t *content_text(const json_t *content)
{
    size_t i, n = 0, off = 0;
    json_t *part, *out;
    char *buf;

    if (json_is_string(content) || json_is_null(content))
        return json_incref((json_t *)content);
    if (!json_is_array(content))
        return NULL;
    json_array_foreach(content, i, part)
    {
        const char *type = json_string_value(json_object_get(part, "type"));
        if (!type || strcmp(type, "text") != 0 || !json_is_string(json_object_get(part, "text")))
            return NULL;
        n += json_string_length(json_object_get(part, "text"));
    }
    if (!(buf = malloc(n + 1)))
        return NULL;
    json_array_foreach(content, i, part)
    {
        json_t *t = json_object_get(part, "text");
        memcpy(buf + off, json_string_value(t), json_string_length(t));
        off += json_string_length(t);
    }
    out = json_stringn(buf, off);
    free(buf);
    return out;
}

static pq_err_t convert_messages(const json_t *msgs, json_t *out, char *errstr, size_t errstr_size)
{
    size_t i;
    json_t *m;

    if (pq_provider_messages_check(msgs, errstr, errstr_size) != PQ_OK)
        return PQ_ERR_INVALID;
    json_array_foreach(msgs, i, m)
    {
        const char *role = pq_provider_message_role(m, i, errstr, errstr_size);
        json_t *copy, *content = json_object_get(m, "content");

        if (!role)
            return PQ_ERR_INVALID;
        if (strcmp(role, "function") == 0 ||
            pq_provider_field_set(json_object_get(m, "function_call"))) {
            snprintf(errstr, errstr_size, "watsonx cannot express messages[%zu] (function)", i);
            return PQ_ERR_UNSUPPORTED;
        }
        if (!(copy = json_copy(m)) || json_array_append_new(out, copy))
            return PQ_ERR_NOMEM;
        if (strcmp(role, "developer") == 0 &&
            json_object_set_new(copy, "role", json_string("system")))
            return PQ_ERR_NOMEM;
        if (strcmp(role, "user") != 0 && strcmp(role, "tool") != 0 && content) {
            json_t *text = content_text(content);
            if (!text) {
                snprintf(errstr, errstr_size,
                         "watsonx cannot express messages[%zu] (non-text content for role %s)", i,
                         strcmp(role, "assistant") == 0 ? "assistant" : "system");
                return PQ_ERR_UNSUPPORTED;
            }
            if (json_object_set_new(copy, "content", text))
                return PQ_ERR_NOMEM;
        }
    }
    return PQ_OK;
}

static const char *const pass_fields[] = {
    "temperature",
    "top_p",
    "n",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    NULL,
};

static const char *const unsupported_fields[] = {
    "functions", "function_call", "audio", "prediction", "web_search_options", NULL,
};

static pq_err_t build_body(const pq_target_t *target, const json_t *req, json_t *body, char *errstr,
                           size_t errstr_size)
{
    json_t *msgs = json_array(), *v;
    pq_err_t err = PQ_ERR_NOMEM;
    size_t i;

    if (!msgs)
        goto out;
    for (i = 0; unsupported_fields[i]; i++)
        if (pq_provider_field_set(json_object_get(req, unsupported_fields[i]))) {
            snprintf(errstr, errstr_size, "watsonx cannot express %s", unsupported_fields[i]);
            err = PQ_ERR_UNSUPPORTED;
            goto out;
        }
    v = json_object_get(req, "modalities");
    for (i = 0; i < json_array_size(v); i++) {
        const char *s = json_string_value(json_array_get(v, i));
        if (!s || strcmp(s, "text") != 0) {
            snprintf(errstr, errstr_size, "watsonx cannot express modalities");
            err = PQ_ERR_UNSUPPORTED;
            goto out;
        }
    }
    if ((err = convert_messages(json_object_get(req, "messages"), msgs, errstr, errstr_size)))
        goto out;
    err = PQ_ERR_NOMEM;
    if (json_object_set_new(body, "model_id", json_string(target->model)) ||
        (target->p->project_id
             ? json_object_set_new(body, "project_id", json_string(target->p->project_id))
             : json_object_set_new(body, "space_id", json_string(target->p->space_id))) ||
        json_object_set(body, "messages", msgs))
        goto out;
    if ((err = pq_provider_max_tokens(req, &v, errstr, errstr_size)) != PQ_OK)
        goto out;
    err = PQ_ERR_NOMEM;
    if (v && json_object_set(body, "max_tokens", v))
        goto out;
    /* a stop of another type is dropped */
    if ((err = pq_provider_stop_set(req, body, "stop", 0, errstr, errstr_size)) != PQ_OK)
        goto out;
    err = PQ_ERR_NOMEM;
    for (i = 0; pass_fields[i]; i++) {
        v = json_object_get(req, pass_fields[i]);
        if (v && !json_is_null(v) && json_object_set(body, pass_fields[i], v))
            goto out;
    }
    v = json_object_get(req, "tool_choice");
    if (json_is_string(v)) {
        if (json_object_set(body, "tool_choice_option", v))
            goto out;
    } else if (json_is_object(v)) {
        if (json_object_set(body, "tool_choice", v))
            goto out;
    }
    err = PQ_OK;
out:
    if (err == PQ_ERR_NOMEM)
        snprintf(errstr, errstr_size, "out of memory");
    json_decref(msgs);
    return err;
}

static pq_err_t watsonx_build(const pq_target_t *target, const json_t *request, const char *key,
                              pq_provider_req_t *out, char *errstr, size_t errstr_size, int stream)
{
    const pq_provider_conf_t *p = target->p;
    json_t *body = json_object();
    char *ver = NULL;
    pq_err_t err;

    if ((err = pq_provider_req_start(request, out, errstr, errstr_size)) != PQ_OK)
        goto out;
    if (!p->project_id == !p->space_id) {
        snprintf(errstr, errstr_size,
                 "providers.%s: exactly one of project_id and space_id is "
                 "required",
                 p->name);
        err = PQ_ERR_CONFIG;
        goto out;
    }
    if ((err = pq_provider_key_check(p, key, "token", errstr, errstr_size)) != PQ_OK)
        goto out;
    if ((err = body ? build_body(target, request, body, errstr, errstr_size) : PQ_ERR_NOMEM) !=
        PQ_OK)
        goto out;
    err = PQ_ERR_NOMEM;
    if (!(ver = pq_provider_escape(p->watsonx_version ? p->watsonx_version
                                                      : PQ_WATSONX_VERSION_DEFAULT)))
        goto out;
    if (pq_provider_req_json(out, body) ||
        pq_provider_req_url(out, "%s/ml/v1/text/%s?version=%s", p->base_url,
                            stream ? "chat_stream" : "chat", ver) ||
        pq_provider_header_add(&out->headers, "Accept",
                               stream ? "text/event-stream" : "application/json") ||
        (key && *key && pq_provider_header_add_bearer(&out->headers, key)) ||
        pq_provider_headers_add_conf(&out->headers, p, 0, errstr, errstr_size))
        goto out;
    err = PQ_OK;
out:
    free(ver);
    json_decref(body);
    return pq_provider_req_end(out, err, errstr, errstr_size);
}

/* ---- answer ---- */

static const char *finish_reason(const char *r)
{
    if (!r)
        return "stop";
    if (strcmp(r, "length") == 0 || strcmp(r, "time_limit") == 0 || strcmp(r, "max_tokens") == 0)
        return "length";
    if (strcmp(r, "tool_calls") == 0 || strcmp(r, "content_filter") == 0)
        return r;
    return "stop";
}

/* 1 when an error message says the input has more tokens than the model takes. watsonx has no
 * code of its own for it (invalid_input_argument covers any bad argument), so the message
 * decides: "Token sequence length is longer than the specified maximum sequence length for
 * this model (1336 > 512)", "the number of input tokens 9000 cannot exceed the total tokens
 * limit 8192 for this model". */
static int too_many_tokens(const json_t *m)
{
    return pq_provider_str_has(m, "token") &&
           (pq_provider_str_has(m, "maximum sequence length") ||
            pq_provider_str_has(m, "total tokens limit") ||
            pq_provider_str_has(m, "context length") || pq_provider_str_has(m, "context window"));
}

static pq_err_t watsonx_parse_response(const pq_target_t *target, long status, const char *body,
                                       size_t len, json_t **completion, int *verbatim,
                                       pq_provider_fault_t *fault, char *errstr, size_t errstr_size)
{
    pq_err_t err = pq_err_from_http_status(status);
    static const char *const usage_names[] = {"prompt_tokens", "completion_tokens", "total_tokens"};
    json_t *root = json_loadb(body, len, JSON_ALLOW_NUL, NULL), *choices, *c, *out = NULL, *v;
    json_t *id, *created;
    json_int_t counts[3];
    size_t i;

    (void)verbatim; /* a converted answer is never the body */
    *completion = NULL;
    if (err != PQ_OK) {
        char token[80] = "";
        json_t *e0 = json_array_get(json_object_get(root, "errors"), 0);
        json_t *m = json_object_get(e0, "message");
        pq_provider_safe_token(json_object_get(e0, "code"), token, sizeof(token));
        if (err == PQ_ERR_REFUSED && too_many_tokens(m))
            err = PQ_ERR_CONTEXT_LENGTH;
        pq_provider_fault_code(fault, token);
        if (err == PQ_ERR_CONTEXT_LENGTH || err == PQ_ERR_REFUSED || err == PQ_ERR_NOT_FOUND)
            pq_provider_fault_reason(fault, target, m);
        pq_provider_http_error(errstr, errstr_size, target, status, token);
        goto out;
    }
    choices = json_object_get(root, "choices");
    if (!json_is_array(choices) || json_array_size(choices) == 0) {
        snprintf(errstr, errstr_size, "%s answered HTTP %ld without choices", target->p->name,
                 status);
        err = PQ_ERR_MALFORMED;
        goto out;
    }
    if (!(out = json_array()))
        goto out_nomem;
    json_array_foreach(choices, i, c)
    {
        json_t *msg = json_object_get(c, "message"), *idx = json_object_get(c, "index"), *oc;
        if (!json_is_object(msg) ||
            (!json_object_get(msg, "content") && !json_object_get(msg, "tool_calls"))) {
            snprintf(errstr, errstr_size, "%s answered a choice without a message",
                     target->p->name);
            err = PQ_ERR_MALFORMED;
            goto out;
        }
        if (!pq_provider_content_ok(json_object_get(msg, "content"))) {
            snprintf(errstr, errstr_size, "%s answered a message with unreadable content",
                     target->p->name);
            err = PQ_ERR_MALFORMED;
            goto out;
        }
        oc = json_pack(
            "{s:I, s:O, s:s, s:O}", "index",
            json_is_integer(idx) ? json_integer_value(idx) : (json_int_t)i, "message", msg,
            "finish_reason", finish_reason(json_string_value(json_object_get(c, "finish_reason"))),
            "logprobs",
            json_object_get(c, "logprobs") ? json_object_get(c, "logprobs") : json_null());
        if (!oc || json_array_append_new(out, oc))
            goto out_nomem;
        if (!json_object_get(msg, "role") &&
            json_object_set_new(json_object_get(oc, "message"), "role", json_string("assistant")))
            goto out_nomem;
    }
    if ((err = pq_provider_usage_read(target, json_object_get(root, "usage"), usage_names, counts,
                                      3, errstr, errstr_size)) != PQ_OK)
        goto out;
    id = json_object_get(root, "id");
    created = json_object_get(root, "created");
    v = json_object_get(root, "model_id");
    if (!json_is_string(v))
        v = json_object_get(root, "model");
    err = pq_provider_completion(
        completion, json_is_string(id) ? json_string_value(id) : "chat-unknown",
        json_is_integer(created) ? json_integer_value(created) : (json_int_t)time(NULL),
        json_is_string(v) ? json_string_value(v) : target->model, out, counts[0], counts[1],
        counts[2], errstr, errstr_size);
    goto out;

out_nomem:
    snprintf(errstr, errstr_size, "out of memory");
    err = PQ_ERR_NOMEM;
out:
    json_decref(out);
    json_decref(root);
    return err;
}

static pq_err_t watsonx_build_request(const pq_target_t *target, const json_t *request,
                                      const char *key, pq_provider_req_t *out, char *errstr,
                                      size_t errstr_size)
{
    return watsonx_build(target, request, key, out, errstr, errstr_size, 0);
}

/* The same body to /ml/v1/text/chat_stream (SSE, Accept: text/event-stream). */
static pq_err_t watsonx_build_stream_request(const pq_target_t *target, const json_t *request,
                                             const char *key, pq_provider_req_t *out, char *errstr,
                                             size_t errstr_size)
{
    return watsonx_build(target, request, key, out, errstr, errstr_size, 1);
}

/* ---- IAM token exchange ---- */

/* An IAM error code ("BXNIM0415E": capitals, digits, a final capital) into buf, else "". */
static void iam_code(const json_t *v, char *buf, size_t size)
{
    const char *s = json_string_value(v);
    size_t n = s ? strlen(s) : 0, i = 0, letters, digits;

    buf[0] = '\0';
    if (n < 6 || n > 16 || n >= size)
        return;
    while (i < n && s[i] >= 'A' && s[i] <= 'Z')
        i++;
    letters = i;
    while (i < n && s[i] >= '0' && s[i] <= '9')
        i++;
    digits = i - letters;
    if (letters < 2 || digits < 3 || i != n - 1 || s[i] < 'A' || s[i] > 'Z')
        return;
    memcpy(buf, s, n + 1);
}

/* The IAM token request: POST p->iam_url (default https://iam.cloud.ibm.com/identity/token) with
 * Content-Type application/x-www-form-urlencoded, Accept application/json and the body
 * grant_type=urn:ibm:params:oauth:grant-type:apikey&apikey=<URL-encoded apikey>. Errors:
 * PQ_ERR_CONFIG (no iam_url, empty key), PQ_ERR_NOMEM. */
static pq_err_t watsonx_token_request(const pq_provider_conf_t *p, const char *apikey,
                                      pq_provider_req_t *out, char *errstr, size_t errstr_size)
{
    static const char prefix[] = "grant_type=" IAM_GRANT_APIKEY "&apikey=";
    pq_err_t err = PQ_ERR_NOMEM;
    char *esc = NULL;
    size_t n;

    memset(out, 0, sizeof(*out));
    if (!p->iam_url || !*p->iam_url) {
        snprintf(errstr, errstr_size, "providers.%s.iam_url is required", p->name);
        return PQ_ERR_CONFIG;
    }
    if (!apikey || !*apikey) {
        snprintf(errstr, errstr_size, "providers.%s: watsonx needs an api key", p->name);
        return PQ_ERR_CONFIG;
    }
    if (!(esc = pq_provider_escape(apikey)))
        goto out_nomem;
    n = sizeof(prefix) - 1 + strlen(esc);
    if (!(out->body = malloc(n + 1)))
        goto out_nomem;
    memcpy(out->body, prefix, sizeof(prefix) - 1);
    memcpy(out->body + sizeof(prefix) - 1, esc, strlen(esc) + 1);
    out->body_len = n;
    if (!(out->url = strdup(p->iam_url)))
        goto out_nomem;
    if (pq_provider_header_add(&out->headers, "Content-Type",
                               "application/x-www-form-urlencoded") ||
        pq_provider_header_add(&out->headers, "Accept", "application/json"))
        goto out_nomem;
    err = PQ_OK;
    goto out_free;

out_nomem:
    snprintf(errstr, errstr_size, "out of memory");
    if (out->body)
        explicit_bzero(out->body, out->body_len);
    pq_provider_req_clear(out);
out_free:
    if (esc) {
        explicit_bzero(esc, strlen(esc));
        free(esc);
    }
    return err;
}

/* The IAM answer {access_token, token_type, expires_in, expiration}: *expires_at_ms is 60 s
 * before `expiration` (epoch seconds), or after 80 % of the lifetime for tokens that live less
 * than 5 minutes. 400/401/403 (IAM answers a wrong or unknown API key with 400, e.g.
 * BXNIM0415E) -> PQ_ERR_AUTH, 429 -> PQ_ERR_RATE_LIMITED, 5xx -> PQ_ERR_SERVER, a 2xx without a
 * usable token -> PQ_ERR_MALFORMED; errstr names the IAM errorCode at most. */
static pq_err_t watsonx_token_parse(long status, const char *body, size_t len, char **token,
                                    int64_t *expires_at_ms, char *errstr, size_t errstr_size)
{
    pq_err_t err = pq_err_from_http_status(status);
    json_t *root = json_loadb(body, len, JSON_ALLOW_NUL, NULL), *at, *exp, *ein;
    int64_t expiration, lifetime, margin;

    *token = NULL;
    *expires_at_ms = 0;
    if (err != PQ_OK) {
        char code[80] = "";
        iam_code(json_object_get(root, "errorCode"), code, sizeof(code));
        if (status == 400) /* IAM's answer to an unknown or malformed API key */
            err = PQ_ERR_AUTH;
        snprintf(errstr, errstr_size, "IAM answered HTTP %ld%s%s", status, code[0] ? ": " : "",
                 code);
        goto out;
    }
    at = json_object_get(root, "access_token");
    exp = json_object_get(root, "expiration");
    ein = json_object_get(root, "expires_in");
    if (!json_is_string(at) || json_string_length(at) == 0 ||
        json_string_length(at) > IAM_TOKEN_MAX || strpbrk(json_string_value(at), "\r\n") != NULL) {
        snprintf(errstr, errstr_size, "IAM answered HTTP %ld without a usable access_token",
                 status);
        err = PQ_ERR_MALFORMED;
        goto out;
    }
    lifetime = json_is_integer(ein) ? (int64_t)json_integer_value(ein) : 3600;
    if (json_is_integer(exp) && json_integer_value(exp) > 0)
        expiration = (int64_t)json_integer_value(exp);
    else if (json_is_integer(ein) && json_integer_value(ein) > 0)
        expiration = pq_now_ms() / 1000 + lifetime;
    else {
        snprintf(errstr, errstr_size, "IAM answered HTTP %ld without an expiration", status);
        err = PQ_ERR_MALFORMED;
        goto out;
    }
    margin = lifetime < 5 * 60 ? lifetime / 5 : IAM_REFRESH_MARGIN;
    if (margin < 0)
        margin = 0;
    if (!(*token = strdup(json_string_value(at)))) {
        snprintf(errstr, errstr_size, "out of memory");
        err = PQ_ERR_NOMEM;
        goto out;
    }
    *expires_at_ms = (expiration - margin) * 1000;
out:
    if (root) {
        /* wipe the token copy jansson holds before freeing it */
        json_t *t = json_object_get(root, "access_token");
        if (json_is_string(t))
            explicit_bzero((char *)json_string_value(t), json_string_length(t));
    }
    json_decref(root);
    return err;
}

const pq_provider_ops_t pq_provider_watsonx = {
    .type = "watsonx",
    .build_request = watsonx_build_request,
    .build_stream_request = watsonx_build_stream_request,
    .parse_response = watsonx_parse_response,
    .token_request = watsonx_token_request,
    .token_parse = watsonx_token_parse,
};
