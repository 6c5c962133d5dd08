/* Anthropic Messages wire format: POST /v1/messages, headers x-api-key and anthropic-version.
 * Errors: {"type":"error","error":{"type","message"}}. */
#include "sim.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MSG_MAX 512

static int anthropic_auth_key(struct evhttp_request *req, char *buf, size_t size)
{
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(req), "x-api-key");
    size_t n = h ? strlen(h) : 0;

    if (!n || n >= size)
        return -1;
    memcpy(buf, h, n + 1);
    return 0;
}

static void anthropic_error(pq_sim_call_t *call, int status, const pq_sim_error_t *e)
{
    const char *type;

    switch (e->kind) {
    case PQ_SIM_E_AUTH:
        type = status == 403 ? "permission_error" : "authentication_error";
        break;
    case PQ_SIM_E_NOT_FOUND:
        type = "not_found_error";
        break;
    case PQ_SIM_E_RATE:
        type = "rate_limit_error";
        break;
    case PQ_SIM_E_SERVER:
        type = status == 529 ? "overloaded_error" : "api_error";
        break;
    default:
        type = "invalid_request_error";
        break;
    }
    if (e->provider_code && e->code)
        type = e->code; /* overloaded_error, rate_limit_error, ... */
    pq_sim_call_json(call, status,
                     json_pack("{s:s, s:{s:s, s:s}}", "type", "error", "error", "type", type,
                               "message", e->message));
}

static const pq_sim_format_t anthropic_format = {
    .name = "anthropic",
    .auth_key = anthropic_auth_key,
    .error = anthropic_error,
};

static int match_messages(const char *path, pq_sim_call_t *call)
{
    return !strcmp(path, "/v1/messages");
}

static void invalid(pq_sim_call_t *call, const char *msg)
{
    pq_sim_call_error(call, 400, PQ_SIM_E_INVALID, msg, NULL, NULL);
}

/* Bytes of text in a string or an array of content blocks; -1 if neither. The text of the
 * blocks is appended to *last when last != NULL (replacing what it held). */
static long content_bytes(const json_t *content, char **last, size_t *last_len)
{
    size_t i, n = 0;
    const json_t *b, *t;

    if (json_is_string(content)) {
        n = json_string_length(content);
    } else if (json_is_array(content)) {
        json_array_foreach(content, i, b)
        {
            if (!json_is_object(b) || !json_is_string(json_object_get(b, "type")))
                return -1;
            t = json_object_get(b, "text");
            if (t && !json_is_string(t))
                return -1;
            if (!strcmp(json_string_value(json_object_get(b, "type")), "text") && !t)
                return -1;
            if (t)
                n += json_string_length(t);
        }
    } else {
        return -1;
    }
    if (last) {
        free(*last);
        *last = NULL;
        *last_len = 0;
        if (pq_sim_core_text(content, last, last_len))
            return -1;
    }
    return (long)n;
}

/* One named event whose data is doc (taken) with its "type" set to the event name. */
static int anthropic_event(pq_sim_call_t *call, const char *type, json_t *doc, int done)
{
    int rc = -1;

    if (doc && !json_object_set_new(doc, "type", json_string(type)))
        rc = pq_sim_call_stream_event(call, type, doc, NULL, done);
    json_decref(doc);
    return rc;
}

/* The Messages stream: message_start, a text block (one delta per word, a ping after the block
 * start), message_delta with the stop reason and output usage, message_stop. */
static int anthropic_stream(pq_sim_call_t *call, const char *id, const char *model,
                            const pq_sim_answer_t *ans, int64_t itok, int64_t otok)
{
    if (pq_sim_call_stream(call, "\n") ||
        anthropic_event(call, "message_start",
                        json_pack("{s:{s:s, s:s, s:s, s:[], s:s, s:n, s:n, s:{s:I, s:i}}}",
                                  "message", "id", id, "type", "message", "role", "assistant",
                                  "content", "model", model, "stop_reason", "stop_sequence",
                                  "usage", "input_tokens", (json_int_t)itok, "output_tokens", 1),
                        0) ||
        anthropic_event(call, "content_block_start",
                        json_pack("{s:i, s:{s:s, s:s}}", "index", 0, "content_block", "type",
                                  "text", "text", ""),
                        0) ||
        anthropic_event(call, "ping", json_object(), 0))
        return -1;
    for (size_t off = 0, end; off < ans->len; off = end) {
        end = pq_sim_core_piece_end(ans->text, ans->len, off);
        if (anthropic_event(call, "content_block_delta",
                            json_pack("{s:i, s:{s:s, s:s%}}", "index", 0, "delta", "type",
                                      "text_delta", "text", ans->text + off, end - off),
                            0))
            return -1;
    }
    return anthropic_event(call, "content_block_stop", json_pack("{s:i}", "index", 0), 0) ||
                   anthropic_event(call, "message_delta",
                                   json_pack("{s:{s:s, s:n}, s:{s:I}}", "delta", "stop_reason",
                                             ans->truncated ? "max_tokens" : "end_turn",
                                             "stop_sequence", "usage", "output_tokens",
                                             (json_int_t)otok),
                                   0) ||
                   anthropic_event(call, "message_stop", json_object(), 1)
               ? -1
               : 0;
}

static void anthropic_messages(pq_sim_call_t *call)
{
    struct evhttp_request *req = pq_sim_call_request(call);
    pq_sim_t *sim = pq_sim_call_sim(call);
    json_t *doc, *messages, *m, *maxt, *system, *resp;
    const char *body, *model, *role, *prev_role = "";
    json_t *temp;
    size_t len, i, prompt_bytes = 0, text_len = 0;
    char *text = NULL, *prompt = NULL, msg[MSG_MAX], id[48], version[64];
    size_t prompt_len = 0;
    pq_sim_answer_t ans;
    int64_t itok, otok;
    long nb;

    if (pq_sim_call_header(call, "anthropic-version", version, sizeof(version))) {
        invalid(call, "anthropic-version: header is required");
        return;
    }
    if (!pq_sim_json_content_type(req)) {
        invalid(call, "content-type: must be application/json");
        return;
    }
    body = pq_sim_call_body(call, &len);
    doc = json_loadb(body, len, 0, NULL);
    if (!json_is_object(doc)) {
        invalid(call, "The request body is not valid JSON.");
        goto out_free;
    }
    model = json_string_value(json_object_get(doc, "model"));
    if (!model || !*model) {
        invalid(call, "model: Field required");
        goto out_free;
    }
    maxt = json_object_get(doc, "max_tokens");
    if (!maxt) {
        invalid(call, "max_tokens: Field required");
        goto out_free;
    }
    if (!json_is_integer(maxt) || json_integer_value(maxt) < 1) {
        invalid(call, "max_tokens: Input should be a valid integer greater than or equal to 1");
        goto out_free;
    }
    temp = json_object_get(doc, "temperature");
    if (temp &&
        (!json_is_number(temp) || json_number_value(temp) < 0.0 || json_number_value(temp) > 1.0)) {
        invalid(call, "temperature: Input should be less than or equal to 1");
        goto out_free;
    }
    system = json_object_get(doc, "system");
    if (system) {
        nb = content_bytes(system, NULL, NULL);
        if (nb < 0) {
            invalid(call, "system: Input should be a valid string or a list of text blocks");
            goto out_free;
        }
        prompt_bytes += (size_t)nb;
    }
    messages = json_object_get(doc, "messages");
    if (!json_is_array(messages) || json_array_size(messages) == 0) {
        invalid(call, messages ? "messages: at least one message is required"
                               : "messages: Field required");
        goto out_free;
    }
    json_array_foreach(messages, i, m)
    {
        role = json_string_value(json_object_get(m, "role"));
        if (!json_is_object(m) || !role) {
            snprintf(msg, sizeof(msg), "messages.%zu.role: Field required", i);
            invalid(call, msg);
            goto out_free;
        }
        if (strcmp(role, "user") && strcmp(role, "assistant")) {
            snprintf(msg, sizeof(msg),
                     "messages.%zu.role: Input should be 'user' or 'assistant' (got '%.64s')", i,
                     role);
            invalid(call, msg);
            goto out_free;
        }
        if (i == 0 && strcmp(role, "user")) {
            invalid(call, "messages: first message must use the \"user\" role");
            goto out_free;
        }
        if (i > 0 && !strcmp(role, prev_role)) {
            snprintf(msg, sizeof(msg),
                     "messages: roles must alternate between \"user\" and \"assistant\", but "
                     "found multiple \"%s\" roles in a row",
                     role);
            invalid(call, msg);
            goto out_free;
        }
        prev_role = role;
        if (i + 1 == json_array_size(messages) && i > 0 && !strcmp(role, "assistant")) {
            /* a trailing assistant message: a prefill the answer continues */
            prompt = text;
            prompt_len = text_len;
            text = NULL;
            text_len = 0;
        }
        nb = content_bytes(json_object_get(m, "content"), &text, &text_len);
        if (nb < 0) {
            snprintf(msg, sizeof(msg),
                     "messages.%zu.content: Input should be a valid string or list of blocks", i);
            invalid(call, msg);
            goto out_free;
        }
        prompt_bytes += (size_t)nb;
    }
    if (prompt && pq_sim_call_rejects_prefill(call)) {
        invalid(call, "messages: this model does not support assistant message prefill");
        goto out_free;
    }
    if (prompt && text_len && strchr(" \t\r\n", text[text_len - 1])) {
        invalid(call, "messages: final assistant content cannot end with trailing whitespace");
        goto out_free;
    }
    if (pq_sim_core_answer(prompt ? prompt : text, prompt ? prompt_len : text_len,
                           json_integer_value(maxt), &ans)) {
        pq_sim_call_error(call, 500, PQ_SIM_E_SERVER, "out of memory", NULL, NULL);
        goto out_free;
    }
    if (prompt)
        pq_sim_core_continue(&ans, text, text_len);
    pq_sim_model_seen(sim, model);
    itok = pq_sim_core_tokens(prompt_bytes);
    otok = pq_sim_core_tokens(ans.len);
    snprintf(id, sizeof(id), "msg_sim%llu", (unsigned long long)pq_sim_next_id(sim));
    resp = json_pack("{s:s, s:s, s:s, s:s, s:[{s:s, s:s%}], s:s, s:n, s:{s:I, s:I}}", "id", id,
                     "type", "message", "role", "assistant", "model", model, "content", "type",
                     "text", "text", ans.text, ans.len, "stop_reason",
                     ans.truncated ? "max_tokens" : "end_turn", "stop_sequence", "usage",
                     "input_tokens", (json_int_t)itok, "output_tokens", (json_int_t)otok);
    if (resp && pq_sim_wants_stream(doc)) {
        json_decref(resp);
        if (anthropic_stream(call, id, model, &ans, itok, otok) == 0)
            pq_sim_call_tokens(call, itok + otok);
        else
            pq_sim_call_error(call, 500, PQ_SIM_E_SERVER, "could not build the answer", NULL, NULL);
    } else if (resp) {
        pq_sim_call_json(call, 200, resp);
        pq_sim_call_tokens(call, itok + otok);
    } else {
        pq_sim_call_error(call, 500, PQ_SIM_E_SERVER, "could not build the answer", NULL, NULL);
    }
    pq_sim_answer_free(&ans);
out_free:
    free(text);
    free(prompt);
    json_decref(doc);
}

const pq_sim_route_t pq_sim_anthropic_routes[] = {
    {&anthropic_format, EVHTTP_REQ_POST, match_messages, anthropic_messages, 1, "model"},
    {NULL, 0, NULL, NULL, 0, NULL},
};
