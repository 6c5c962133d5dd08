/* OpenAI wire format: POST /v1/chat/completions, GET /v1/models[/{id}].
 * Validation follows the public API: the errors carry {"error":{message,type,param,code}}. */
#include "sim.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <event2/keyvalq_struct.h>

#define MSG_MAX 512

static int openai_auth_key(struct evhttp_request *req, char *buf, size_t size)
{
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
    size_t n;

    if (!h || strncasecmp(h, "Bearer ", 7) != 0)
        return -1;
    h += 7;
    while (*h == ' ')
        h++;
    n = strlen(h);
    while (n > 0 && (h[n - 1] == ' ' || h[n - 1] == '\t'))
        n--;
    if (n == 0 || n >= size)
        return -1;
    memcpy(buf, h, n);
    buf[n] = '\0';
    return 0;
}

void pq_sim_openai_error(pq_sim_call_t *call, int status, const pq_sim_error_t *e)
{
    const char *type;

    switch (e->kind) {
    case PQ_SIM_E_RATE:
        type = "requests";
        break;
    case PQ_SIM_E_SERVER:
        type = "server_error";
        break;
    default:
        type = "invalid_request_error";
        break;
    }
    if (e->provider_code && e->code) {
        /* OpenAI's own shapes: a quota error is its own type, other 429s rate_limit_error */
        if (!strcmp(e->code, "insufficient_quota"))
            type = "insufficient_quota";
        else if (status == 429)
            type = "rate_limit_error";
        else if (status >= 500)
            type = "server_error";
        else
            type = "invalid_request_error";
    }
    pq_sim_call_json(call, status,
                     json_pack("{s:{s:s, s:s, s:o, s:o}}", "error", "message", e->message, "type",
                               type, "param", e->param ? json_string(e->param) : json_null(),
                               "code", e->code ? json_string(e->code) : json_null()));
}

const pq_sim_format_t pq_sim_openai_format = {
    .name = "openai",
    .auth_key = openai_auth_key,
    .error = pq_sim_openai_error,
};

static int match_chat(const char *path, pq_sim_call_t *call)
{
    return !strcmp(path, "/v1/chat/completions");
}

static int match_models(const char *path, pq_sim_call_t *call)
{
    return !strcmp(path, "/v1/models");
}

static int match_model(const char *path, pq_sim_call_t *call)
{
    if (strncmp(path, "/v1/models/", 11) != 0 || !path[11])
        return 0;
    pq_sim_call_set_arg(call, path + 11, strlen(path + 11));
    return 1;
}

static const char *json_type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a decimal";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    default:
        return "null";
    }
}

int pq_sim_json_content_type(struct evhttp_request *req)
{
    const char *ct = evhttp_find_header(evhttp_request_get_input_headers(req), "Content-Type");
    size_t n = sizeof("application/json") - 1;

    while (ct && *ct == ' ')
        ct++;
    return ct && !strncasecmp(ct, "application/json", n) &&
           (ct[n] == '\0' || ct[n] == ';' || ct[n] == ' ');
}

static int role_ok(const char *r)
{
    static const char *const roles[] = {"system", "user", "assistant", "tool", "developer"};
    for (size_t i = 0; i < sizeof(roles) / sizeof(roles[0]); i++)
        if (!strcmp(r, roles[i]))
            return 1;
    return 0;
}

/* Reads max_tokens / max_completion_tokens; 0 when absent, -1 (answer set) when invalid. */
static int max_tokens_get(pq_sim_call_t *call, json_t *doc, int64_t *out)
{
    static const char *const names[] = {"max_completion_tokens", "max_tokens"};
    char msg[MSG_MAX];

    *out = 0;
    for (size_t i = 0; i < 2; i++) {
        json_t *v = json_object_get(doc, names[i]);
        if (!v || json_is_null(v))
            continue;
        if (!json_is_integer(v)) {
            snprintf(msg, sizeof(msg),
                     "Invalid type for '%s': expected an integer, but got %s instead.", names[i],
                     json_type_name(v));
            pq_sim_call_error(call, 400, PQ_SIM_E_INVALID, msg, names[i], "invalid_type");
            return -1;
        }
        if (json_integer_value(v) < 1) {
            snprintf(msg, sizeof(msg),
                     "Invalid '%s': integer below minimum value. Expected a value >= 1, but got "
                     "%lld instead.",
                     names[i], (long long)json_integer_value(v));
            pq_sim_call_error(call, 400, PQ_SIM_E_INVALID, msg, names[i],
                              "integer_below_min_value");
            return -1;
        }
        if (!*out)
            *out = json_integer_value(v);
    }
    return 0;
}

/* Validates messages; sets *prompt_bytes to the bytes of all message texts and *last to the
 * last message. 0, or -1 with the error answer set. */
static int messages_check(pq_sim_call_t *call, json_t *messages, size_t *prompt_bytes,
                          json_t **last)
{
    char msg[MSG_MAX], param[64];
    size_t i;
    json_t *m;

    *prompt_bytes = 0;
    if (!messages) {
        pq_sim_call_error(call, 400, PQ_SIM_E_INVALID, "Missing required parameter: 'messages'.",
                          "messages", "missing_required_parameter");
        return -1;
    }
    if (!json_is_array(messages)) {
        snprintf(msg, sizeof(msg),
                 "Invalid type for 'messages': expected an array, but got %s instead.",
                 json_type_name(messages));
        pq_sim_call_error(call, 400, PQ_SIM_E_INVALID, msg, "messages", "invalid_type");
        return -1;
    }
    if (json_array_size(messages) == 0) {
        pq_sim_call_error(call, 400, PQ_SIM_E_INVALID,
                          "Invalid 'messages': empty array. Expected an array with minimum length "
                          "1, but got an empty array instead.",
                          "messages", "empty_array");
        return -1;
    }
    json_array_foreach(messages, i, m)
    {
        json_t *role, *content;
        const char *r;

        if (!json_is_object(m)) {
            snprintf(param, sizeof(param), "messages[%zu]", i);
            snprintf(msg, sizeof(msg),
                     "Invalid type for '%s': expected an object, but got %s instead.", param,
                     json_type_name(m));
            pq_sim_call_error(call, 400, PQ_SIM_E_INVALID, msg, param, "invalid_type");
            return -1;
        }
        role = json_object_get(m, "role");
        r = json_string_value(role);
        if (!r) {
            snprintf(param, sizeof(param), "messages[%zu].role", i);
            snprintf(msg, sizeof(msg), "Missing required parameter: '%s'.", param);
            pq_sim_call_error(call, 400, PQ_SIM_E_INVALID, msg, param,
                              role ? "invalid_type" : "missing_required_parameter");
            return -1;
        }
        if (!role_ok(r)) {
            snprintf(param, sizeof(param), "messages[%zu].role", i);
            snprintf(msg, sizeof(msg),
                     "Invalid value: '%.64s'. Supported values are: 'system', 'assistant', "
                     "'user', 'tool', and 'developer'.",
                     r);
            pq_sim_call_error(call, 400, PQ_SIM_E_INVALID, msg, param, "invalid_value");
            return -1;
        }
        content = json_object_get(m, "content");
        if (!content && !(strcmp(r, "assistant") == 0 && json_object_get(m, "tool_calls"))) {
            snprintf(param, sizeof(param), "messages[%zu].content", i);
            snprintf(msg, sizeof(msg), "Missing required parameter: '%s'.", param);
            pq_sim_call_error(call, 400, PQ_SIM_E_INVALID, msg, param,
                              "missing_required_parameter");
            return -1;
        }
        if (json_is_string(content)) {
            *prompt_bytes += json_string_length(content);
        } else if (json_is_array(content)) {
            size_t j;
            json_t *part, *text;
            json_array_foreach(content, j, part)
            {
                text = json_object_get(part, "text");
                if (!json_is_object(part) || !json_is_string(json_object_get(part, "type")) ||
                    (text && !json_is_string(text))) {
                    snprintf(param, sizeof(param), "messages[%zu].content[%zu]", i, j);
                    snprintf(msg, sizeof(msg), "Invalid content part '%s'.", param);
                    pq_sim_call_error(call, 400, PQ_SIM_E_INVALID, msg, param, "invalid_type");
                    return -1;
                }
                if (text)
                    *prompt_bytes += json_string_length(text);
            }
        } else if (content && !(json_is_null(content) && strcmp(r, "assistant") == 0)) {
            snprintf(param, sizeof(param), "messages[%zu].content", i);
            snprintf(msg, sizeof(msg),
                     "Invalid type for '%s': expected one of a string or array of objects, but "
                     "got %s instead.",
                     param, json_type_name(content));
            pq_sim_call_error(call, 400, PQ_SIM_E_INVALID, msg, param, "invalid_type");
            return -1;
        }
        *last = m;
    }
    return 0;
}

void pq_sim_prompt_free(pq_sim_prompt_t *p)
{
    if (!p)
        return;
    free(p->text);
    free(p->prefill);
    json_decref(p->doc);
    memset(p, 0, sizeof(*p));
}

int pq_sim_openai_parse(pq_sim_call_t *call, int require_model, pq_sim_prompt_t *p)
{
    struct evhttp_request *req = pq_sim_call_request(call);
    json_error_t jerr;
    json_t *model, *last = NULL;
    const char *body;
    size_t len;

    memset(p, 0, sizeof(*p));
    if (!pq_sim_json_content_type(req)) {
        pq_sim_call_error(call, 400, PQ_SIM_E_INVALID,
                          "Invalid Content-Type header, expected application/json.", NULL,
                          "invalid_content_type");
        return -1;
    }
    body = pq_sim_call_body(call, &len);
    p->doc = json_loadb(body, len, 0, &jerr);
    if (!p->doc || !json_is_object(p->doc)) {
        pq_sim_call_error(call, 400, PQ_SIM_E_INVALID,
                          "We could not parse the JSON body of your request. (HINT: This likely "
                          "means you aren't using your HTTP library correctly. The OpenAI API "
                          "expects a JSON payload, but what was sent was not valid JSON.)",
                          NULL, NULL);
        goto out_fail;
    }
    model = json_object_get(p->doc, require_model == 2 ? "model_id" : "model");
    p->model = json_string_value(model);
    if (require_model && (!p->model || !*p->model)) {
        pq_sim_call_error(call, 400, PQ_SIM_E_INVALID,
                          require_model == 2 ? "Missing required parameter: 'model_id'."
                                             : "you must provide a model parameter",
                          require_model == 2 ? "model_id" : "model",
                          model ? "invalid_type" : "missing_required_parameter");
        goto out_fail;
    }
    if (p->model && !*p->model)
        p->model = NULL;
    if (messages_check(call, json_object_get(p->doc, "messages"), &p->prompt_bytes, &last))
        goto out_fail;
    if (max_tokens_get(call, p->doc, &p->max_tokens))
        goto out_fail;
    {
        /* a trailing assistant message is a prefill the answer continues */
        json_t *msgs = json_object_get(p->doc, "messages");
        size_t n = json_array_size(msgs);
        const char *role = json_string_value(json_object_get(last, "role"));

        if (n >= 2 && role && !strcmp(role, "assistant")) {
            if (pq_sim_core_text(json_object_get(last, "content"), &p->prefill, &p->prefill_len)) {
                pq_sim_call_error(call, 500, PQ_SIM_E_SERVER, "out of memory", NULL, NULL);
                goto out_fail;
            }
            last = json_array_get(msgs, n - 2);
        }
    }
    if (pq_sim_core_text(json_object_get(last, "content"), &p->text, &p->text_len)) {
        pq_sim_call_error(call, 500, PQ_SIM_E_SERVER, "out of memory", NULL, NULL);
        goto out_fail;
    }
    return 0;

out_fail:
    pq_sim_prompt_free(p);
    return -1;
}

/* One chat.completion.chunk; delta: taken (NULL: no choices, for the usage chunk). */
static int chunk_event(pq_sim_call_t *call, const char *id, const char *model, int watsonx,
                       json_int_t created, json_t *delta, const char *finish, json_t *usage)
{
    json_t *doc = json_pack("{s:s, s:s, s:I, s:s, s:[]}", "id", id, "object",
                            "chat.completion.chunk", "created", created, "model", model, "choices");
    int rc = -1;

    if (!doc)
        goto out;
    if (delta && json_array_append_new(json_object_get(doc, "choices"),
                                       json_pack("{s:i, s:O, s:n, s:o}", "index", 0, "delta", delta,
                                                 "logprobs", "finish_reason",
                                                 finish ? json_string(finish) : json_null())))
        goto out;
    if (watsonx)
        json_object_set_new(doc, "model_id", json_string(model));
    else
        json_object_set_new(doc, "system_fingerprint", json_string("fp_sim"));
    if (usage)
        json_object_set(doc, "usage", usage);
    rc = pq_sim_call_stream_event(call, watsonx ? "message" : NULL, doc, NULL, 0);
out:
    json_decref(delta);
    json_decref(doc);
    return rc;
}

int pq_sim_openai_stream(pq_sim_call_t *call, const char *id, const char *model, int watsonx,
                         const pq_sim_answer_t *ans, int64_t ptok, int64_t ctok, int usage,
                         int done_marker)
{
    json_int_t created = (json_int_t)pq_sim_now_s(pq_sim_call_sim(call));
    const char *finish = ans->truncated ? "length" : "stop";
    json_t *u = json_pack("{s:I, s:I, s:I}", "prompt_tokens", (json_int_t)ptok, "completion_tokens",
                          (json_int_t)ctok, "total_tokens", (json_int_t)(ptok + ctok));
    int rc = -1;

    if (!u || pq_sim_call_stream(call, "\n") ||
        chunk_event(call, id, model, watsonx, created,
                    json_pack("{s:s, s:s}", "role", "assistant", "content", ""), NULL, NULL))
        goto out;
    for (size_t off = 0, end; off < ans->len; off = end) {
        end = pq_sim_core_piece_end(ans->text, ans->len, off);
        if (chunk_event(call, id, model, watsonx, created,
                        json_pack("{s:s%}", "content", ans->text + off, end - off), NULL, NULL))
            goto out;
    }
    /* watsonx puts the usage on its last chunk; OpenAI sends a chunk of its own */
    if (chunk_event(call, id, model, watsonx, created, json_object(), finish,
                    watsonx && usage ? u : NULL) ||
        (!watsonx && usage && chunk_event(call, id, model, 0, created, NULL, NULL, u)) ||
        (done_marker && pq_sim_call_stream_event(call, NULL, NULL, "[DONE]", 1)))
        goto out;
    rc = 0;
out:
    json_decref(u);
    return rc;
}

void pq_sim_openai_reply(pq_sim_call_t *call, const char *model, const pq_sim_prompt_t *p)
{
    pq_sim_t *sim = pq_sim_call_sim(call);
    int64_t ptok, ctok;
    pq_sim_answer_t ans;
    json_t *resp;
    char id[40];

    if (p->prefill && pq_sim_call_rejects_prefill(call)) {
        pq_sim_call_error(call, 400, PQ_SIM_E_INVALID,
                          "This model does not support assistant message prefill.", "messages",
                          "unsupported_value");
        return;
    }
    if (pq_sim_core_answer(p->text, p->text_len, p->max_tokens, &ans)) {
        pq_sim_call_error(call, 500, PQ_SIM_E_SERVER, "out of memory", NULL, NULL);
        return;
    }
    pq_sim_core_continue(&ans, p->prefill, p->prefill_len);
    pq_sim_model_seen(sim, model);
    ptok = pq_sim_core_tokens(p->prompt_bytes);
    ctok = pq_sim_core_tokens(ans.len);
    snprintf(id, sizeof(id), "chatcmpl-%llu", (unsigned long long)pq_sim_next_id(sim));
    resp = json_pack("{s:s, s:s, s:I, s:s, s:[{s:i, s:{s:s, s:s%, s:n}, s:s, s:n}], "
                     "s:{s:I, s:I, s:I}, s:s}",
                     "id", id, "object", "chat.completion", "created",
                     (json_int_t)pq_sim_now_s(sim), "model", model, "choices", "index", 0,
                     "message", "role", "assistant", "content", ans.text, ans.len, "refusal",
                     "finish_reason", ans.truncated ? "length" : "stop", "logprobs", "usage",
                     "prompt_tokens", (json_int_t)ptok, "completion_tokens", (json_int_t)ctok,
                     "total_tokens", (json_int_t)(ptok + ctok), "system_fingerprint", "fp_sim");
    if (resp && pq_sim_wants_stream(p->doc)) {
        json_decref(resp);
        resp = NULL;
        if (pq_sim_openai_stream(call, id, model, 0, &ans, ptok, ctok,
                                 json_is_true(json_object_get(
                                     json_object_get(p->doc, "stream_options"), "include_usage")),
                                 1) == 0)
            pq_sim_call_tokens(call, ptok + ctok);
        else
            pq_sim_call_error(call, 500, PQ_SIM_E_SERVER, "could not build the answer", NULL, NULL);
    } else if (!resp) {
        pq_sim_call_error(call, 500, PQ_SIM_E_SERVER, "could not build the answer", NULL, NULL);
    } else {
        pq_sim_call_json(call, 200, resp);
        pq_sim_call_tokens(call, ptok + ctok);
    }
    pq_sim_answer_free(&ans);
}

static void openai_chat(pq_sim_call_t *call)
{
    pq_sim_prompt_t p;

    if (pq_sim_openai_parse(call, 1, &p))
        return;
    pq_sim_openai_reply(call, p.model, &p);
    pq_sim_prompt_free(&p);
}

static json_t *model_object(pq_sim_t *sim, const char *id)
{
    return json_pack("{s:s, s:s, s:I, s:s}", "id", id, "object", "model", "created",
                     (json_int_t)pq_sim_started_s(sim), "owned_by", "promptq-sim");
}

static void openai_models(pq_sim_call_t *call)
{
    pq_sim_t *sim = pq_sim_call_sim(call);
    json_t *data = json_array(), *v;
    const char *key;

    json_object_foreach((json_t *)pq_sim_models(sim), key, v)
    {
        json_array_append_new(data, model_object(sim, key));
    }
    pq_sim_call_json(call, 200, json_pack("{s:s, s:o}", "object", "list", "data", data));
}

static void openai_model(pq_sim_call_t *call)
{
    pq_sim_t *sim = pq_sim_call_sim(call);
    const char *id = pq_sim_call_arg(call);
    char msg[MSG_MAX];

    if (!json_object_get(pq_sim_models(sim), id)) {
        snprintf(msg, sizeof(msg), "The model '%.200s' does not exist", id);
        pq_sim_call_error(call, 404, PQ_SIM_E_NOT_FOUND, msg, "model", "model_not_found");
        return;
    }
    pq_sim_call_json(call, 200, model_object(sim, id));
}

const pq_sim_route_t pq_sim_openai_routes[] = {
    {&pq_sim_openai_format, EVHTTP_REQ_POST, match_chat, openai_chat, 1, "model"},
    {&pq_sim_openai_format, EVHTTP_REQ_GET, match_models, openai_models, 1, NULL},
    {&pq_sim_openai_format, EVHTTP_REQ_GET, match_model, openai_model, 1, NULL},
    {NULL, 0, NULL, NULL, 0, NULL},
};
