/* IBM watsonx.ai wire format: IAM token exchange (POST /identity/token, form body with
 * grant_type and apikey) and chat (POST /ml/v1/text/chat?version=..., Authorization: Bearer
 * TOKEN). With --key, the IAM apikey must be one of the keys and chat needs a token this sim
 * issued ("simtok-..."). Errors: {"errors":[{"code","message"}],"trace","status_code"}. */
#include "sim.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <strings.h>

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>

#define TOKEN_PREFIX "simtok-"
#define TOKEN_TTL_S  3600
#define GRANT_APIKEY "urn:ibm:params:oauth:grant-type:apikey"

static int watsonx_auth_key(struct evhttp_request *req, char *buf, size_t size)
{
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
    size_t n;

    if (!h || strncasecmp(h, "Bearer ", 7) != 0)
        return -1;
    h += 7;
    n = strlen(h);
    if (!n || n >= size)
        return -1;
    memcpy(buf, h, n + 1);
    return 0;
}

static void watsonx_error(pq_sim_call_t *call, int status, const pq_sim_error_t *e)
{
    const char *code = e->code;
    char trace[40];

    if (!code) {
        switch (e->kind) {
        case PQ_SIM_E_AUTH:
            code = "authentication_token_not_valid";
            break;
        case PQ_SIM_E_NOT_FOUND:
            code = "not_found";
            break;
        case PQ_SIM_E_RATE:
            code = "rate_limit_exceeded";
            break;
        case PQ_SIM_E_SERVER:
            code = "internal_server_error";
            break;
        default:
            code = "invalid_input_argument";
            break;
        }
    }
    snprintf(trace, sizeof(trace), "sim-trace-%llu",
             (unsigned long long)pq_sim_next_id(pq_sim_call_sim(call)));
    pq_sim_call_json(call, status,
                     json_pack("{s:[{s:s, s:s}], s:s, s:i}", "errors", "code", code, "message",
                               e->message, "trace", trace, "status_code", status));
}

static const pq_sim_format_t watsonx_format = {
    .name = "watsonx",
    .auth_key = watsonx_auth_key,
    .error = watsonx_error,
};

static int match_token(const char *path, pq_sim_call_t *call)
{
    return !strcmp(path, "/identity/token");
}

static int match_chat(const char *path, pq_sim_call_t *call)
{
    return !strcmp(path, "/ml/v1/text/chat");
}

static int match_chat_stream(const char *path, pq_sim_call_t *call)
{
    return !strcmp(path, "/ml/v1/text/chat_stream");
}

/* IAM answers errors in its own shape. */
static void iam_error(pq_sim_call_t *call, int status, const char *code, const char *message)
{
    pq_sim_call_json(call, status,
                     json_pack("{s:s, s:s, s:{s:s}}", "errorCode", code, "errorMessage", message,
                               "context", "requestId", "sim"));
}

static void watsonx_token(pq_sim_call_t *call)
{
    pq_sim_t *sim = pq_sim_call_sim(call);
    struct evkeyvalq form;
    const char *body, *grant, *apikey;
    char *copy, token[64];
    size_t len;
    int64_t now = pq_sim_now_s(sim);

    body = pq_sim_call_body(call, &len);
    copy = strndup(body, len);
    if (!copy) {
        iam_error(call, 500, "BXNIM0001E", "out of memory");
        return;
    }
    TAILQ_INIT(&form);
    if (evhttp_parse_query_str(copy, &form) != 0) {
        iam_error(call, 400, "BXNIM0109E", "Property missing or empty. Operation not allowed.");
        goto out_free;
    }
    grant = evhttp_find_header(&form, "grant_type");
    apikey = evhttp_find_header(&form, "apikey");
    if (!grant || strcmp(grant, GRANT_APIKEY) != 0) {
        iam_error(call, 400, "BXNIM0109E", "Property missing or empty: grant_type.");
        goto out_free;
    }
    if (!apikey || !*apikey) {
        iam_error(call, 400, "BXNIM0109E", "Property missing or empty: apikey.");
        goto out_free;
    }
    if (!pq_sim_key_valid(sim, apikey)) {
        iam_error(call, 400, "BXNIM0415E", "Provided API key could not be found.");
        goto out_free;
    }
    snprintf(token, sizeof(token), TOKEN_PREFIX "%llu", (unsigned long long)pq_sim_next_id(sim));
    pq_sim_call_json(call, 200,
                     json_pack("{s:s, s:s, s:s, s:i, s:I, s:s}", "access_token", token,
                               "refresh_token", "not_supported", "token_type", "Bearer",
                               "expires_in", TOKEN_TTL_S, "expiration",
                               (json_int_t)(now + TOKEN_TTL_S), "scope", "ibm openid"));
out_free:
    evhttp_clear_headers(&form);
    free(copy);
}

/* text/chat, or text/chat_stream when stream is set. */
static void watsonx_answer(pq_sim_call_t *call, int stream)
{
    pq_sim_t *sim = pq_sim_call_sim(call);
    pq_sim_prompt_t p;
    pq_sim_answer_t ans;
    char token[512], version[64], id[40];
    int64_t ptok, ctok;
    json_t *resp;

    /* pq_sim_key_valid(sim, NULL) is 1 only when no --key was given (open sim). */
    if (watsonx_auth_key(pq_sim_call_request(call), token, sizeof(token)) != 0) {
        if (!pq_sim_key_valid(sim, NULL)) {
            pq_sim_call_error(call, 401, PQ_SIM_E_AUTH,
                              "Failed to authenticate the request due to no Authorization header",
                              NULL, "authorization_rejected");
            return;
        }
    } else if ((!pq_sim_key_valid(sim, NULL) &&
                strncmp(token, TOKEN_PREFIX, sizeof(TOKEN_PREFIX) - 1) != 0) ||
               (!strncmp(token, TOKEN_PREFIX, sizeof(TOKEN_PREFIX) - 1) &&
                strtoull(token + sizeof(TOKEN_PREFIX) - 1, NULL, 10) < pq_sim_token_floor(sim))) {
        pq_sim_call_error(call, 401, PQ_SIM_E_AUTH,
                          "Failed to authenticate the request due to an expired or invalid token",
                          NULL, "authentication_token_not_valid");
        return;
    }
    if (pq_sim_call_query(call, "version", version, sizeof(version)) || !version[0]) {
        pq_sim_call_error(call, 400, PQ_SIM_E_INVALID, "Missing query parameter 'version'", NULL,
                          "invalid_request_entity");
        return;
    }
    if (pq_sim_openai_parse(call, 2, &p))
        return;
    if (!json_is_string(json_object_get(p.doc, "project_id")) &&
        !json_is_string(json_object_get(p.doc, "space_id"))) {
        pq_sim_call_error(call, 400, PQ_SIM_E_INVALID,
                          "Either 'project_id' or 'space_id' must be specified", NULL,
                          "json_validation_error");
        goto out_free;
    }
    if (pq_sim_core_answer(p.text, p.text_len, p.max_tokens, &ans)) {
        pq_sim_call_error(call, 500, PQ_SIM_E_SERVER, "out of memory", NULL, NULL);
        goto out_free;
    }
    pq_sim_model_seen(sim, p.model);
    ptok = pq_sim_core_tokens(p.prompt_bytes);
    ctok = pq_sim_core_tokens(ans.len);
    snprintf(id, sizeof(id), "chat-sim%llu", (unsigned long long)pq_sim_next_id(sim));
    resp = json_pack(
        "{s:s, s:s, s:s, s:I, s:[{s:i, s:{s:s, s:s%}, s:s}], s:{s:I, s:I, s:I}}", "id", id,
        "model_id", p.model, "model", p.model, "created", (json_int_t)pq_sim_now_s(sim), "choices",
        "index", 0, "message", "role", "assistant", "content", ans.text, ans.len, "finish_reason",
        ans.truncated ? "length" : "stop", "usage", "prompt_tokens", (json_int_t)ptok,
        "completion_tokens", (json_int_t)ctok, "total_tokens", (json_int_t)(ptok + ctok));
    if (resp && (stream || pq_sim_wants_stream(p.doc))) {
        json_decref(resp);
        if (pq_sim_openai_stream(call, id, p.model, 1, &ans, ptok, ctok, 1, 0) == 0)
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
    pq_sim_prompt_free(&p);
}

static void watsonx_chat(pq_sim_call_t *call)
{
    watsonx_answer(call, 0);
}

static void watsonx_chat_stream(pq_sim_call_t *call)
{
    watsonx_answer(call, 1);
}

/* Auth is done by the handlers: IAM checks the apikey, chat checks the token. */
const pq_sim_route_t pq_sim_watsonx_routes[] = {
    {&watsonx_format, EVHTTP_REQ_POST, match_token, watsonx_token, 0, NULL},
    {&watsonx_format, EVHTTP_REQ_POST, match_chat, watsonx_chat, 0, "model_id"},
    {&watsonx_format, EVHTTP_REQ_POST, match_chat_stream, watsonx_chat_stream, 0, "model_id"},
    {NULL, 0, NULL, NULL, 0, NULL},
};
