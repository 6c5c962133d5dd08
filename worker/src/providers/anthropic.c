/* Anthropic Messages API (https://docs.anthropic.com/en/api/messages).
 *
 * POST {base_url}/v1/messages with x-api-key, anthropic-version: 2023-06-01 and a JSON body.
 *
 * Request mapping from OpenAI chat completions:
 *   - system and developer messages are joined (separated by a blank line) into the top-level
 *     "system" string, wherever they appear in the conversation;
 *   - user/assistant messages keep their role; tool messages become user messages holding
 *     tool_result blocks; assistant tool_calls become tool_use blocks;
 *   - consecutive messages of the same role are MERGED into one message (their content blocks
 *     concatenated in order), as Anthropic wants alternating turns; a conversation whose first
 *     turn is the assistant's is PQ_ERR_UNSUPPORTED (Anthropic wants a user turn first, and
 *     inventing one would change the prompt);
 *   - max_completion_tokens, else max_tokens, else the provider's default_max_tokens;
 *     stop -> stop_sequences; temperature (0..1 only), top_p, top_k pass; user ->
 *     metadata.user_id; tools (type function) -> tools with input_schema; tool_choice auto /
 *     none / required / {function} -> {type auto|none|any|tool}; parallel_tool_calls false ->
 *     disable_parallel_tool_use;
 *   - text and image (data: or http(s) URL) content parts are kept; other parts, n > 1,
 *     logprobs, logit_bias, non-zero penalties, response_format other than text, audio,
 *     functions, prediction and temperature > 1 are PQ_ERR_UNSUPPORTED (the target is skipped);
 *   - stream, stream_options, seed, store, metadata, service_tier and unknown fields are dropped.
 *
 * Answer mapping: text blocks joined -> message.content, tool_use blocks -> message.tool_calls,
 * stop_reason end_turn/stop_sequence/pause_turn -> stop, max_tokens -> length, tool_use ->
 * tool_calls, refusal -> content_filter; usage input (+ cache) / output -> prompt / completion
 * / total. Errors {"type":"error","error":{"type","message"}}: rate_limit_error and 429 are
 * rate_limited, overloaded_error (whatever the status) and 529 overloaded (both retryable),
 * 401/403 authentication, 404 not_found, an invalid_request_error whose message says "prompt is
 * too long" context_length, other 400/413/422 refused. The fault's code is error.type; its
 * reason the sanitised message for context_length, refused and not_found. Anthropic has no
 * content-filter error: a refusal is a successful answer with stop_reason "refusal". */
#include "provider.h"
#include "common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ANTHROPIC_VERSION "2023-06-01"

/* ---- request ---- */

typedef struct conv_s {
    json_t *messages; /* Anthropic messages being built */
    json_t *system;   /* array of system strings */
    char *errstr;
    size_t errstr_size;
} conv_t;

static pq_err_t image_block(conv_t *c, const json_t *part, size_t mi, json_t *blocks)
{
    json_t *iu = json_object_get(part, "image_url");
    const char *url = json_string_value(json_is_object(iu) ? json_object_get(iu, "url") : iu);
    const char *mt, *data;
    size_t mt_len;
    json_t *src;

    if (!url) {
        snprintf(c->errstr, c->errstr_size, "messages[%zu]: image_url part without a url", mi);
        return PQ_ERR_INVALID;
    }
    if (pq_provider_data_url(url, &mt, &mt_len, &data) == 0)
        src =
            json_pack("{s:s, s:s%, s:s}", "type", "base64", "media_type", mt, mt_len, "data", data);
    else if (strncmp(url, "https://", 8) == 0 || strncmp(url, "http://", 7) == 0)
        src = json_pack("{s:s, s:s}", "type", "url", "url", url);
    else {
        snprintf(c->errstr, c->errstr_size,
                 "anthropic cannot express messages[%zu]: image URL is neither data: nor http(s)",
                 mi);
        return PQ_ERR_UNSUPPORTED;
    }
    if (!src ||
        json_array_append_new(blocks, json_pack("{s:s, s:o}", "type", "image", "source", src)) != 0)
        return PQ_ERR_NOMEM;
    return PQ_OK;
}

/* Appends the blocks for an OpenAI content value (string, null or parts). text_only: images
 * are refused (system messages). */
static pq_err_t content_blocks(conv_t *c, const json_t *content, size_t mi, int text_only,
                               json_t *blocks)
{
    size_t j;
    json_t *part;

    if (!content || json_is_null(content))
        return PQ_OK;
    if (json_is_string(content)) {
        if (json_string_length(content) == 0)
            return PQ_OK;
        return json_array_append_new(blocks,
                                     json_pack("{s:s, s:O}", "type", "text", "text", content)) != 0
                   ? PQ_ERR_NOMEM
                   : PQ_OK;
    }
    if (!json_is_array(content)) {
        snprintf(c->errstr, c->errstr_size,
                 "messages[%zu].content: expected a string or an array of parts", mi);
        return PQ_ERR_INVALID;
    }
    json_array_foreach(content, j, part)
    {
        const char *type = json_string_value(json_object_get(part, "type"));
        json_t *text = json_object_get(part, "text");
        pq_err_t err;

        if (type && strcmp(type, "text") == 0 && json_is_string(text)) {
            if (json_string_length(text) > 0 &&
                json_array_append_new(blocks,
                                      json_pack("{s:s, s:O}", "type", "text", "text", text)) != 0)
                return PQ_ERR_NOMEM;
        } else if (type && strcmp(type, "image_url") == 0 && !text_only) {
            if ((err = image_block(c, part, mi, blocks)) != PQ_OK)
                return err;
        } else if (!type) {
            snprintf(c->errstr, c->errstr_size, "messages[%zu].content[%zu]: part without a type",
                     mi, j);
            return PQ_ERR_INVALID;
        } else {
            char tok[80];
            pq_provider_safe_token(json_object_get(part, "type"), tok, sizeof(tok));
            snprintf(c->errstr, c->errstr_size,
                     "anthropic cannot express messages[%zu].content[%zu] (part type %s)", mi, j,
                     tok[0] ? tok : "?");
            return PQ_ERR_UNSUPPORTED;
        }
    }
    return PQ_OK;
}

static pq_err_t tool_use_blocks(conv_t *c, const json_t *calls, size_t mi, json_t *blocks)
{
    size_t j;
    json_t *call;

    if (!calls || json_is_null(calls))
        return PQ_OK;
    if (!json_is_array(calls)) {
        snprintf(c->errstr, c->errstr_size, "messages[%zu].tool_calls: expected an array", mi);
        return PQ_ERR_INVALID;
    }
    json_array_foreach(calls, j, call)
    {
        const json_t *id, *name;
        json_t *input;
        pq_err_t err = pq_provider_tool_call(call, mi, j, "anthropic", &id, &name, &input,
                                             c->errstr, c->errstr_size);

        if (err != PQ_OK)
            return err;
        if (json_array_append_new(blocks, json_pack("{s:s, s:O, s:O, s:o}", "type", "tool_use",
                                                    "id", id, "name", name, "input", input)) != 0)
            return PQ_ERR_NOMEM;
    }
    return PQ_OK;
}

static pq_err_t convert_message(conv_t *c, const json_t *m, size_t mi)
{
    const char *role = json_string_value(json_object_get(m, "role"));
    json_t *content = json_object_get(m, "content");
    json_t *blocks = json_array();
    pq_err_t err = PQ_OK;

    if (!blocks)
        return PQ_ERR_NOMEM;
    if (!role) {
        snprintf(c->errstr, c->errstr_size, "messages[%zu]: role is required", mi);
        err = PQ_ERR_INVALID;
    } else if (strcmp(role, "system") == 0 || strcmp(role, "developer") == 0) {
        size_t j;
        json_t *b;
        err = content_blocks(c, content, mi, 1, blocks);
        json_array_foreach(blocks, j, b)
        {
            if (err == PQ_OK && json_array_append(c->system, json_object_get(b, "text")) != 0)
                err = PQ_ERR_NOMEM;
        }
        json_decref(blocks);
        return err;
    } else if (strcmp(role, "user") == 0) {
        err = content_blocks(c, content, mi, 0, blocks);
    } else if (strcmp(role, "assistant") == 0) {
        err = content_blocks(c, content, mi, 0, blocks);
        if (err == PQ_OK)
            err = tool_use_blocks(c, json_object_get(m, "tool_calls"), mi, blocks);
        if (err == PQ_OK && pq_provider_field_set(json_object_get(m, "function_call"))) {
            snprintf(c->errstr, c->errstr_size,
                     "anthropic cannot express messages[%zu].function_call", mi);
            err = PQ_ERR_UNSUPPORTED;
        }
    } else if (strcmp(role, "tool") == 0) {
        json_t *id = json_object_get(m, "tool_call_id"), *inner = json_array();
        if (!inner) {
            err = PQ_ERR_NOMEM;
        } else if (!json_is_string(id)) {
            json_decref(inner);
            snprintf(c->errstr, c->errstr_size, "messages[%zu]: tool_call_id is required", mi);
            err = PQ_ERR_INVALID;
        } else if ((err = content_blocks(c, content, mi, 0, inner)) != PQ_OK) {
            json_decref(inner);
        } else if (json_array_append_new(blocks, json_pack("{s:s, s:O, s:o}", "type", "tool_result",
                                                           "tool_use_id", id, "content", inner)) !=
                   0) {
            err = PQ_ERR_NOMEM;
        }
        role = "user";
    } else if (strcmp(role, "function") == 0) {
        snprintf(c->errstr, c->errstr_size,
                 "anthropic cannot express messages[%zu] (role function)", mi);
        err = PQ_ERR_UNSUPPORTED;
    } else {
        snprintf(c->errstr, c->errstr_size, "messages[%zu]: unknown role", mi);
        err = PQ_ERR_INVALID;
    }
    if (err != PQ_OK) {
        json_decref(blocks);
        return err;
    }
    return pq_provider_turn_add(c->messages, role, "content", blocks);
}

/* A turn holding one text block is sent as a plain string. */
static void simplify_turns(json_t *messages)
{
    size_t i;
    json_t *m;

    json_array_foreach(messages, i, m)
    {
        json_t *content = json_object_get(m, "content");
        json_t *b = json_array_get(content, 0);
        const char *type = json_string_value(json_object_get(b, "type"));
        if (json_array_size(content) == 1 && type && strcmp(type, "text") == 0)
            json_object_set(m, "content", json_object_get(b, "text"));
    }
}

static char *join_system(const json_t *parts)
{
    size_t i, n = 0, off = 0;
    json_t *s;
    char *out;

    json_array_foreach(parts, i, s)
    {
        n += json_string_length(s) + 2;
    }
    out = malloc(n + 1);
    if (!out)
        return NULL;
    json_array_foreach(parts, i, s)
    {
        if (i > 0) {
            memcpy(out + off, "\n\n", 2);
            off += 2;
        }
        memcpy(out + off, json_string_value(s), json_string_length(s));
        off += json_string_length(s);
    }
    out[off] = '\0';
    return out;
}

static const char *const unsupported_fields[] = {
    "logprobs",           "top_logprobs", "logit_bias", "frequency_penalty",
    "presence_penalty",   "audio",        "functions",  "function_call",
    "web_search_options", "prediction",   NULL,
};

/* Fields with no Anthropic equivalent, or values it cannot express. */
static pq_err_t check_unsupported(const json_t *req, char *errstr, size_t errstr_size)
{
    const char *bad = NULL;
    json_t *v, *mod;
    size_t i;

    for (i = 0; unsupported_fields[i] && !bad; i++)
        if (pq_provider_field_set(json_object_get(req, unsupported_fields[i])))
            bad = unsupported_fields[i];
    v = json_object_get(req, "n");
    if (!bad && json_is_integer(v) && json_integer_value(v) > 1)
        bad = "n > 1";
    v = json_object_get(req, "response_format");
    if (!bad && json_is_object(v)) {
        const char *t = json_string_value(json_object_get(v, "type"));
        if (t && strcmp(t, "text") != 0)
            bad = "response_format";
    }
    mod = json_object_get(req, "modalities");
    json_array_foreach(mod, i, v)
    {
        if (!bad && (!json_is_string(v) || strcmp(json_string_value(v), "text") != 0))
            bad = "modalities";
    }
    v = json_object_get(req, "temperature");
    if (!bad && json_is_number(v) && json_number_value(v) > 1.0)
        bad = "temperature > 1";
    if (!bad)
        return PQ_OK;
    snprintf(errstr, errstr_size, "anthropic cannot express %s", bad);
    return PQ_ERR_UNSUPPORTED;
}

static pq_err_t map_tools(const json_t *req, json_t *body, char *errstr, size_t errstr_size)
{
    json_t *tools = json_object_get(req, "tools"), *choice = json_object_get(req, "tool_choice");
    json_t *out, *t, *tc = NULL;
    size_t i;

    if (pq_provider_field_set(tools)) {
        if (!json_is_array(tools)) {
            snprintf(errstr, errstr_size, "tools: expected an array");
            return PQ_ERR_INVALID;
        }
        if (!(out = json_array()) || json_object_set_new(body, "tools", out) != 0)
            return PQ_ERR_NOMEM;
        json_array_foreach(tools, i, t)
        {
            const json_t *name, *desc, *params;
            pq_err_t err =
                pq_provider_tool_def(t, i, "anthropic", &name, &desc, &params, errstr, errstr_size);
            json_t *o;

            if (err != PQ_OK)
                return err;
            o = json_pack("{s:O}", "name", name);
            if (!o || json_array_append_new(out, o) != 0)
                return PQ_ERR_NOMEM;
            if (desc && json_object_set(o, "description", (json_t *)desc) != 0)
                return PQ_ERR_NOMEM;
            if (json_object_set_new(o, "input_schema",
                                    params ? json_incref((json_t *)params)
                                           : json_pack("{s:s}", "type", "object")))
                return PQ_ERR_NOMEM;
        }
    }
    if (json_is_string(choice)) {
        const char *s = json_string_value(choice);
        const char *type = strcmp(s, "required") == 0 ? "any" : s;
        if (strcmp(type, "auto") != 0 && strcmp(type, "none") != 0 && strcmp(type, "any") != 0) {
            snprintf(errstr, errstr_size, "tool_choice: unknown value");
            return PQ_ERR_INVALID;
        }
        tc = json_pack("{s:s}", "type", type);
    } else if (json_is_object(choice)) {
        json_t *name = json_object_get(json_object_get(choice, "function"), "name");
        if (!json_is_string(name)) {
            snprintf(errstr, errstr_size, "anthropic cannot express this tool_choice");
            return PQ_ERR_UNSUPPORTED;
        }
        tc = json_pack("{s:s, s:O}", "type", "tool", "name", name);
    } else if (json_is_false(json_object_get(req, "parallel_tool_calls")) &&
               pq_provider_field_set(tools)) {
        tc = json_pack("{s:s}", "type", "auto");
    } else {
        return PQ_OK;
    }
    if (!tc)
        return PQ_ERR_NOMEM;
    if (json_is_false(json_object_get(req, "parallel_tool_calls")) &&
        strcmp(json_string_value(json_object_get(tc, "type")), "none") != 0 &&
        json_object_set_new(tc, "disable_parallel_tool_use", json_true()) != 0) {
        json_decref(tc);
        return PQ_ERR_NOMEM;
    }
    return json_object_set_new(body, "tool_choice", tc) ? PQ_ERR_NOMEM : PQ_OK;
}

static pq_err_t build_body(const pq_target_t *target, const json_t *req, json_t *body, char *errstr,
                           size_t errstr_size)
{
    conv_t c = {json_array(), json_array(), errstr, errstr_size};
    json_t *msgs = json_object_get(req, "messages"), *m, *v;
    json_int_t max_tokens =
        target->p->default_max_tokens > 0 ? target->p->default_max_tokens : 4096;
    pq_err_t err;
    size_t i;

    if (!c.messages || !c.system) {
        err = PQ_ERR_NOMEM;
        goto out;
    }
    if ((err = check_unsupported(req, errstr, errstr_size)) != PQ_OK)
        goto out;
    if ((err = pq_provider_messages_check(msgs, errstr, errstr_size)) != PQ_OK)
        goto out;
    json_array_foreach(msgs, i, m)
    {
        if (!json_is_object(m)) {
            snprintf(errstr, errstr_size, "messages[%zu]: expected an object", i);
            err = PQ_ERR_INVALID;
            goto out;
        }
        if ((err = convert_message(&c, m, i)) != PQ_OK)
            goto out;
    }
    if (json_array_size(c.messages) == 0) {
        snprintf(errstr, errstr_size, "messages: no user or assistant content");
        err = PQ_ERR_INVALID;
        goto out;
    }
    if (strcmp(json_string_value(json_object_get(json_array_get(c.messages, 0), "role")), "user") !=
        0) {
        snprintf(errstr, errstr_size,
                 "anthropic cannot express a conversation that starts with the assistant");
        err = PQ_ERR_UNSUPPORTED;
        goto out;
    }
    simplify_turns(c.messages);

    if ((err = pq_provider_max_tokens(req, &v, errstr, errstr_size)) != PQ_OK)
        goto out;
    if (v)
        max_tokens = json_integer_value(v);
    err = PQ_ERR_NOMEM;
    if (json_object_set_new(body, "model", json_string(target->model)) ||
        json_object_set_new(body, "max_tokens", json_integer(max_tokens)))
        goto out;
    if (json_array_size(c.system) > 0) {
        char *s = join_system(c.system);
        if (!s || json_object_set_new(body, "system", json_string(s))) {
            free(s);
            goto out;
        }
        free(s);
    }
    if (json_object_set(body, "messages", c.messages))
        goto out;

    if ((err = pq_provider_stop_set(req, body, "stop_sequences", 1, errstr, errstr_size)) != PQ_OK)
        goto out;
    err = PQ_ERR_NOMEM;
    if (json_is_number(v = json_object_get(req, "temperature")) &&
        json_object_set(body, "temperature", v))
        goto out;
    if (json_is_number(v = json_object_get(req, "top_p")) && json_object_set(body, "top_p", v))
        goto out;
    if (json_is_integer(v = json_object_get(req, "top_k")) && json_object_set(body, "top_k", v))
        goto out;
    if (json_is_string(v = json_object_get(req, "user")) && json_string_length(v) > 0 &&
        json_object_set_new(body, "metadata", json_pack("{s:O}", "user_id", v)))
        goto out;
    err = map_tools(req, body, errstr, errstr_size);
out:
    if (err == PQ_ERR_NOMEM)
        snprintf(errstr, errstr_size, "out of memory");
    json_decref(c.messages);
    json_decref(c.system);
    return err;
}

static pq_err_t anthropic_build(const pq_target_t *target, const json_t *request, const char *key,
                                pq_provider_req_t *out, char *errstr, size_t errstr_size,
                                int stream)
{
    const pq_provider_conf_t *p = target->p;
    json_t *body = json_object();
    pq_err_t err;

    if ((err = pq_provider_req_start(request, out, errstr, errstr_size)) != PQ_OK ||
        (err = pq_provider_key_check(p, key, "api key", errstr, errstr_size)) != PQ_OK)
        goto out;
    if ((err = body ? build_body(target, request, body, errstr, errstr_size) : PQ_ERR_NOMEM) !=
        PQ_OK)
        goto out;
    err = PQ_ERR_NOMEM;
    if ((stream && json_object_set_new(body, "stream", json_true())) ||
        pq_provider_req_json(out, body) ||
        pq_provider_req_url(out, "%s/v1/messages", p->base_url) ||
        pq_provider_header_add(&out->headers, "anthropic-version", ANTHROPIC_VERSION) ||
        (key && *key && pq_provider_header_add(&out->headers, "x-api-key", key)) ||
        pq_provider_headers_add_conf(&out->headers, p, 0, errstr, errstr_size))
        goto out;
    err = PQ_OK;
out:
    json_decref(body);
    return pq_provider_req_end(out, err, errstr, errstr_size);
}

static pq_err_t anthropic_build_request(const pq_target_t *target, const json_t *request,
                                        const char *key, pq_provider_req_t *out, char *errstr,
                                        size_t errstr_size)
{
    return anthropic_build(target, request, key, out, errstr, errstr_size, 0);
}

/* The same body with "stream": true (Messages streaming: SSE events). */
static pq_err_t anthropic_build_stream_request(const pq_target_t *target, const json_t *request,
                                               const char *key, pq_provider_req_t *out,
                                               char *errstr, size_t errstr_size)
{
    return anthropic_build(target, request, key, out, errstr, errstr_size, 1);
}

/* ---- answer ---- */

static const char *finish_reason(const char *stop_reason)
{
    if (!stop_reason)
        return "stop";
    if (strcmp(stop_reason, "max_tokens") == 0 ||
        strcmp(stop_reason, "model_context_window_exceeded") == 0)
        return "length";
    if (strcmp(stop_reason, "tool_use") == 0)
        return "tool_calls";
    if (strcmp(stop_reason, "refusal") == 0)
        return "content_filter";
    return "stop"; /* end_turn, stop_sequence, pause_turn */
}

/* Builds the OpenAI message from the content blocks; NULL on a bad block or no memory. */
static json_t *message_from_blocks(const json_t *content)
{
    json_t *msg = json_pack("{s:s}", "role", "assistant"), *calls = NULL, *b;
    size_t i, len = 0, off = 0;
    char *text = NULL;

    if (!msg)
        return NULL;
    json_array_foreach(content, i, b)
    {
        const char *type = json_string_value(json_object_get(b, "type"));
        json_t *t = json_object_get(b, "text");
        if (!type)
            goto out_fail;
        if (strcmp(type, "text") == 0) {
            if (!json_is_string(t))
                goto out_fail;
            len += json_string_length(t);
        }
    }
    if (!(text = malloc(len + 1)))
        goto out_fail;
    json_array_foreach(content, i, b)
    {
        const char *type = json_string_value(json_object_get(b, "type"));
        if (strcmp(type, "text") == 0) {
            json_t *t = json_object_get(b, "text");
            memcpy(text + off, json_string_value(t), json_string_length(t));
            off += json_string_length(t);
        } else if (strcmp(type, "tool_use") == 0) {
            json_t *id = json_object_get(b, "id"), *name = json_object_get(b, "name"), *call;
            json_t *input = json_object_get(b, "input");
            if (!json_is_string(id) || !json_is_string(name))
                goto out_fail;
            call = pq_provider_tool_call_new(json_string_value(id), json_string_value(name),
                                             json_is_object(input) ? input : NULL);
            if (!call || (!calls && !(calls = json_array())) ||
                json_array_append_new(calls, call) != 0)
                goto out_fail;
        }
        /* thinking, redacted_thinking and server tool blocks have no OpenAI form */
    }
    text[off] = '\0';
    if (json_object_set_new(msg, "content",
                            (off == 0 && calls) ? json_null() : json_stringn(text, off)))
        goto out_fail;
    if (calls && json_object_set_new(msg, "tool_calls", calls))
        goto out_fail_calls_owned;
    free(text);
    return msg;

out_fail:
    json_decref(calls);
out_fail_calls_owned:
    free(text);
    json_decref(msg);
    return NULL;
}

static pq_err_t anthropic_parse_response(const pq_target_t *target, long status, const char *body,
                                         size_t len, json_t **completion, int *verbatim,
                                         pq_provider_fault_t *fault, char *errstr,
                                         size_t errstr_size)
{
    pq_err_t err = pq_err_from_http_status(status);
    static const char *const usage_names[] = {"input_tokens", "cache_creation_input_tokens",
                                              "cache_read_input_tokens", "output_tokens"};
    json_t *root = json_loadb(body, len, JSON_ALLOW_NUL, NULL), *content, *msg, *e;
    const char *type = json_string_value(json_object_get(root, "type"));
    json_int_t in, out, counts[4];

    (void)verbatim; /* a converted answer is never the body */
    *completion = NULL;
    if (err == PQ_OK && type && strcmp(type, "error") == 0)
        err = PQ_ERR_MALFORMED; /* an error object in a 2xx answer */
    if (err != PQ_OK) {
        char token[80] = "";
        e = json_object_get(root, "error");
        json_t *m = json_object_get(e, "message");
        pq_provider_safe_token(json_object_get(e, "type"), token, sizeof(token));
        if (strcmp(token, "overloaded_error") == 0)
            err = PQ_ERR_OVERLOADED;
        else if (strcmp(token, "rate_limit_error") == 0)
            err = PQ_ERR_RATE_LIMITED;
        else if (err == PQ_ERR_REFUSED && strcmp(token, "invalid_request_error") == 0 &&
                 pq_provider_str_has(m, "prompt is too long"))
            err = PQ_ERR_CONTEXT_LENGTH; /* "prompt is too long: 208656 tokens > 200000 maximum" */
        pq_provider_fault_code(fault, token);
        if (err == PQ_ERR_CONTEXT_LENGTH || err == PQ_ERR_REFUSED || err == PQ_ERR_NOT_FOUND)
            pq_provider_fault_reason(fault, target, m);
        pq_provider_http_error(errstr, errstr_size, target, status, token);
        goto out;
    }
    content = json_object_get(root, "content");
    if (!json_is_array(content)) {
        snprintf(errstr, errstr_size, "%s answered HTTP %ld without content", target->p->name,
                 status);
        err = PQ_ERR_MALFORMED;
        goto out;
    }
    if (!(msg = message_from_blocks(content))) {
        snprintf(errstr, errstr_size, "%s answered unreadable content blocks", target->p->name);
        err = PQ_ERR_MALFORMED;
        goto out;
    }
    if ((err = pq_provider_usage_read(target, json_object_get(root, "usage"), usage_names, counts,
                                      4, errstr, errstr_size)) != PQ_OK) {
        json_decref(msg);
        goto out;
    }
    in = counts[0] + counts[1] + counts[2];
    out = counts[3];
    *completion = json_pack(
        "{s:s, s:s, s:I, s:s, s:[{s:i, s:o, s:s, s:n}], s:{s:I, s:I, s:I}}", "id",
        json_is_string(json_object_get(root, "id")) ? json_string_value(json_object_get(root, "id"))
                                                    : "msg_unknown",
        "object", "chat.completion", "created", (json_int_t)time(NULL), "model",
        json_is_string(json_object_get(root, "model"))
            ? json_string_value(json_object_get(root, "model"))
            : target->model,
        "choices", "index", 0, "message", msg, "finish_reason",
        finish_reason(json_string_value(json_object_get(root, "stop_reason"))), "logprobs", "usage",
        "prompt_tokens", in, "completion_tokens", out, "total_tokens", in + out);
    if (!*completion) {
        snprintf(errstr, errstr_size, "out of memory");
        err = PQ_ERR_NOMEM;
    }
out:
    json_decref(root);
    return err;
}

const pq_provider_ops_t pq_provider_anthropic = {
    .type = "anthropic",
    .build_request = anthropic_build_request,
    .build_stream_request = anthropic_build_stream_request,
    .parse_response = anthropic_parse_response,
};
