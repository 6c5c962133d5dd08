/* Google Gemini wire format: POST /v1beta/models/{model}:generateContent (also /v1/...), key in
 * x-goog-api-key (or ?key=). Errors: {"error":{"code","message","status"}}. */
#include "sim.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include <event2/keyvalq_struct.h>

#define MSG_MAX       512
#define GEN_SUFFIX    ":generateContent"
#define STREAM_SUFFIX ":streamGenerateContent"

static int gemini_auth_key(struct evhttp_request *req, char *buf, size_t size)
{
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(req), "x-goog-api-key");
    const struct evhttp_uri *uri;
    struct evkeyvalq q;
    size_t n;
    int rc = -1;

    if (h) {
        n = strlen(h);
        if (!n || n >= size)
            return -1;
        memcpy(buf, h, n + 1);
        return 0;
    }
    uri = evhttp_request_get_evhttp_uri(req);
    if (!uri || !evhttp_uri_get_query(uri))
        return -1;
    TAILQ_INIT(&q);
    if (evhttp_parse_query_str(evhttp_uri_get_query(uri), &q) == 0) {
        h = evhttp_find_header(&q, "key");
        n = h ? strlen(h) : 0;
        if (n && n < size) {
            memcpy(buf, h, n + 1);
            rc = 0;
        }
    }
    evhttp_clear_headers(&q);
    return rc;
}

static const char *status_name(int status)
{
    switch (status) {
    case 400:
        return "INVALID_ARGUMENT";
    case 401:
        return "UNAUTHENTICATED";
    case 403:
        return "PERMISSION_DENIED";
    case 404:
        return "NOT_FOUND";
    case 429:
        return "RESOURCE_EXHAUSTED";
    case 500:
        return "INTERNAL";
    case 503:
        return "UNAVAILABLE";
    case 504:
        return "DEADLINE_EXCEEDED";
    default:
        return status < 500 ? "FAILED_PRECONDITION" : "UNKNOWN";
    }
}

/* Gemini answers a wrong API key with 400 INVALID_ARGUMENT, not 401: the reason is in
 * details[] (google.rpc.ErrorInfo reason API_KEY_INVALID). */
static void gemini_error(pq_sim_call_t *call, int status, const pq_sim_error_t *e)
{
    if (!e->provider_code && e->kind == PQ_SIM_E_AUTH && e->code &&
        !strcmp(e->code, "invalid_api_key")) {
        pq_sim_call_json(call, 400,
                         json_pack("{s:{s:i, s:s, s:s, s:[{s:s, s:s, s:s, s:{s:s}}]}}", "error",
                                   "code", 400, "message",
                                   "API key not valid. Please pass a valid API key.", "status",
                                   "INVALID_ARGUMENT", "details", "@type",
                                   "type.googleapis.com/google.rpc.ErrorInfo", "reason",
                                   "API_KEY_INVALID", "domain", "googleapis.com", "metadata",
                                   "service", "generativelanguage.googleapis.com"));
        return;
    }
    pq_sim_call_json(call, status,
                     json_pack("{s:{s:i, s:s, s:s}}", "error", "code", status, "message",
                               e->message, "status",
                               e->provider_code && e->code ? e->code : status_name(status)));
}

static const pq_sim_format_t gemini_format = {
    .name = "gemini",
    .auth_key = gemini_auth_key,
    .error = gemini_error,
};

/* 1 when path is models/{model}<suffix> (v1beta or v1); the model goes to the call's arg. */
static int match_suffix(const char *path, pq_sim_call_t *call, const char *suffix)
{
    size_t n = strlen(path), slen = strlen(suffix), plen;

    if (!strncmp(path, "/v1beta/models/", 15))
        plen = 15;
    else if (!strncmp(path, "/v1/models/", 11))
        plen = 11;
    else
        return 0;
    if (n <= plen + slen || strcmp(path + n - slen, suffix) != 0)
        return 0;
    pq_sim_call_set_arg(call, path + plen, n - plen - slen);
    return 1;
}

static int match_generate(const char *path, pq_sim_call_t *call)
{
    return match_suffix(path, call, GEN_SUFFIX);
}

static int match_stream(const char *path, pq_sim_call_t *call)
{
    return match_suffix(path, call, STREAM_SUFFIX);
}

/* One GenerateContentResponse of a stream: text (len bytes), the finish reason on the last,
 * usage so far on each. */
static json_t *stream_response(const char *text, size_t len, const char *finish, int64_t ptok,
                               int64_t ctok, const char *model, const char *id)
{
    json_t *doc = json_pack("{s:[{s:{s:s, s:[{s:s%}]}, s:i}], s:{s:I, s:I, s:I}, s:s, s:s}",
                            "candidates", "content", "role", "model", "parts", "text", text, len,
                            "index", 0, "usageMetadata", "promptTokenCount", (json_int_t)ptok,
                            "candidatesTokenCount", (json_int_t)ctok, "totalTokenCount",
                            (json_int_t)(ptok + ctok), "modelVersion", model, "responseId", id);
    if (doc && finish)
        json_object_set_new(json_array_get(json_object_get(doc, "candidates"), 0), "finishReason",
                            json_string(finish));
    return doc;
}

/* streamGenerateContent: with alt=sse an SSE stream (CRLF line ends, as Gemini sends), one
 * response per word; without it one JSON array of those responses. */
static int gemini_stream(pq_sim_call_t *call, const pq_sim_answer_t *ans, int64_t ptok,
                         int64_t ctok, const char *model, const char *id)
{
    char alt[16];
    int sse = pq_sim_call_query(call, "alt", alt, sizeof(alt)) == 0 && !strcmp(alt, "sse");
    json_t *arr = sse ? NULL : json_array(), *doc;
    int rc = -1;

    if ((sse && pq_sim_call_stream(call, "\r\n")) || (!sse && !arr))
        goto out;
    for (size_t off = 0, end; off < ans->len; off = end) {
        end = pq_sim_core_piece_end(ans->text, ans->len, off);
        doc = stream_response(ans->text + off, end - off,
                              end == ans->len ? (ans->truncated ? "MAX_TOKENS" : "STOP") : NULL,
                              ptok, end == ans->len ? ctok : pq_sim_core_tokens(end), model, id);
        if (!doc)
            goto out;
        if (sse) {
            int err = pq_sim_call_stream_event(call, NULL, doc, NULL, 0);
            json_decref(doc);
            if (err)
                goto out;
        } else if (json_array_append_new(arr, doc)) {
            goto out;
        }
    }
    if (!sse) {
        pq_sim_call_json(call, 200, arr);
        arr = NULL;
    }
    rc = 0;
out:
    json_decref(arr);
    return rc;
}

static void invalid(pq_sim_call_t *call, const char *msg)
{
    pq_sim_call_error(call, 400, PQ_SIM_E_INVALID, msg, NULL, NULL);
}

/* Text bytes of a Content's parts, -1 if parts is not a non-empty array of objects. */
static long parts_bytes(const json_t *parts)
{
    size_t i, n = 0;
    const json_t *p, *t;

    if (!json_is_array(parts) || json_array_size(parts) == 0)
        return -1;
    json_array_foreach(parts, i, p)
    {
        if (!json_is_object(p))
            return -1;
        t = json_object_get(p, "text");
        if (t && !json_is_string(t))
            return -1;
        if (t)
            n += json_string_length(t);
    }
    return (long)n;
}

/* generateContent, or streamGenerateContent when stream is set. */
static void gemini_answer(pq_sim_call_t *call, int stream)
{
    pq_sim_t *sim = pq_sim_call_sim(call);
    const char *model = pq_sim_call_arg(call), *body, *role;
    json_t *doc, *contents, *c, *last = NULL, *gc, *mot, *sys, *resp;
    size_t len, i, prompt_bytes = 0, text_len = 0;
    char *text = NULL, msg[MSG_MAX], id[40];
    int64_t max_tokens = 0, ptok, ctok;
    pq_sim_answer_t ans;
    long nb;

    if (!pq_sim_json_content_type(pq_sim_call_request(call))) {
        invalid(call, "Invalid Content-Type, expected application/json.");
        return;
    }
    body = pq_sim_call_body(call, &len);
    doc = json_loadb(body, len, 0, NULL);
    if (!json_is_object(doc)) {
        invalid(call, "Invalid JSON payload received.");
        goto out_free;
    }
    contents = json_object_get(doc, "contents");
    if (!json_is_array(contents) || json_array_size(contents) == 0) {
        invalid(call, "* GenerateContentRequest.contents: contents is not specified");
        goto out_free;
    }
    json_array_foreach(contents, i, c)
    {
        role = json_string_value(json_object_get(c, "role"));
        if (!json_is_object(c) || (json_object_get(c, "role") &&
                                   (!role || (strcmp(role, "user") && strcmp(role, "model"))))) {
            snprintf(msg, sizeof(msg), "Please use a valid role: user, model. (contents[%zu].role)",
                     i);
            invalid(call, msg);
            goto out_free;
        }
        nb = parts_bytes(json_object_get(c, "parts"));
        if (nb < 0) {
            snprintf(msg, sizeof(msg),
                     "* GenerateContentRequest.contents[%zu].parts: contents.parts must not be "
                     "empty.",
                     i);
            invalid(call, msg);
            goto out_free;
        }
        prompt_bytes += (size_t)nb;
        last = c;
    }
    sys = json_object_get(doc, "systemInstruction");
    if (!sys)
        sys = json_object_get(doc, "system_instruction");
    if (sys) {
        nb = json_is_object(sys) ? parts_bytes(json_object_get(sys, "parts")) : -1;
        if (nb < 0) {
            invalid(call, "* GenerateContentRequest.system_instruction.parts: must not be empty.");
            goto out_free;
        }
        prompt_bytes += (size_t)nb;
    }
    gc = json_object_get(doc, "generationConfig");
    mot = json_is_object(gc) ? json_object_get(gc, "maxOutputTokens") : NULL;
    if (mot) {
        if (!json_is_integer(mot) || json_integer_value(mot) < 1) {
            invalid(call, "* GenerateContentRequest.generation_config.max_output_tokens: must be "
                          "a positive integer");
            goto out_free;
        }
        max_tokens = json_integer_value(mot);
    }
    if (pq_sim_core_text(json_object_get(last, "parts"), &text, &text_len) ||
        pq_sim_core_answer(text, text_len, max_tokens, &ans)) {
        pq_sim_call_error(call, 500, PQ_SIM_E_SERVER, "out of memory", NULL, NULL);
        goto out_free;
    }
    pq_sim_model_seen(sim, model);
    ptok = pq_sim_core_tokens(prompt_bytes);
    ctok = pq_sim_core_tokens(ans.len);
    snprintf(id, sizeof(id), "sim%llu", (unsigned long long)pq_sim_next_id(sim));
    resp = json_pack("{s:[{s:{s:s, s:[{s:s%}]}, s:s, s:i}], s:{s:I, s:I, s:I}, s:s, s:s}",
                     "candidates", "content", "role", "model", "parts", "text", ans.text, ans.len,
                     "finishReason", ans.truncated ? "MAX_TOKENS" : "STOP", "index", 0,
                     "usageMetadata", "promptTokenCount", (json_int_t)ptok, "candidatesTokenCount",
                     (json_int_t)ctok, "totalTokenCount", (json_int_t)(ptok + ctok), "modelVersion",
                     model, "responseId", id);
    if (resp && stream) {
        json_decref(resp);
        if (gemini_stream(call, &ans, ptok, ctok, model, id) == 0)
            pq_sim_call_tokens(call, ptok + ctok);
        else
            pq_sim_call_error(call, 500, PQ_SIM_E_SERVER, "could not build the answer", NULL, NULL);
    } else if (resp) {
        pq_sim_call_json(call, 200, resp);
        pq_sim_call_tokens(call, ptok + ctok);
    } else {
        pq_sim_call_error(call, 500, PQ_SIM_E_SERVER, "could not build the answer", NULL, NULL);
    }
    pq_sim_answer_free(&ans);
out_free:
    free(text);
    json_decref(doc);
}

static void gemini_generate(pq_sim_call_t *call)
{
    gemini_answer(call, 0);
}

static void gemini_stream_generate(pq_sim_call_t *call)
{
    gemini_answer(call, 1);
}

const pq_sim_route_t pq_sim_gemini_routes[] = {
    {&gemini_format, EVHTTP_REQ_POST, match_generate, gemini_generate, 1, ""},
    {&gemini_format, EVHTTP_REQ_POST, match_stream, gemini_stream_generate, 1, ""},
    {NULL, 0, NULL, NULL, 0, NULL},
};
