/* Azure OpenAI wire format: POST /openai/deployments/{deployment}/chat/completions
 * ?api-version=..., key in the api-key header. Body, answer and errors as OpenAI; the answer
 * names the deployment as its model when the body has none. The v1 API: POST
 * /openai/v1/chat/completions, no api-version, the deployment as the body's "model". */
#include "sim.h"

#include <stdlib.h>
#include <string.h>

#define DEPLOY_PREFIX "/openai/deployments/"
#define CHAT_SUFFIX   "/chat/completions"

static int azure_auth_key(struct evhttp_request *req, char *buf, size_t size)
{
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(req), "api-key");
    size_t n = h ? strlen(h) : 0;

    if (!n || n >= size)
        return -1;
    memcpy(buf, h, n + 1);
    return 0;
}

static const pq_sim_format_t azure_format = {
    .name = "azure_openai",
    .auth_key = azure_auth_key,
    .error = pq_sim_openai_error,
};

static int match_chat(const char *path, pq_sim_call_t *call)
{
    size_t plen = sizeof(DEPLOY_PREFIX) - 1, slen = sizeof(CHAT_SUFFIX) - 1, n = strlen(path);
    const char *dep = path + plen;

    if (n <= plen + slen || strncmp(path, DEPLOY_PREFIX, plen) != 0 ||
        strcmp(path + n - slen, CHAT_SUFFIX) != 0)
        return 0;
    if (memchr(dep, '/', n - plen - slen))
        return 0;
    /* the deployment name as Azure sees it: percent-decoded */
    {
        char raw[256];
        size_t rlen = n - plen - slen, dlen;
        char *dec;
        if (rlen >= sizeof(raw))
            return 0;
        memcpy(raw, dep, rlen);
        raw[rlen] = '\0';
        dec = evhttp_uridecode(raw, 0, &dlen);
        if (!dec)
            return 0;
        pq_sim_call_set_arg(call, dec, dlen);
        free(dec);
    }
    return 1;
}

static void azure_chat(pq_sim_call_t *call)
{
    pq_sim_prompt_t p;
    char version[64];

    if (pq_sim_call_query(call, "api-version", version, sizeof(version)) || !version[0]) {
        pq_sim_call_error(call, 400, PQ_SIM_E_INVALID,
                          "Missing required query parameter: 'api-version'.", "api-version",
                          "missing_required_parameter");
        return;
    }
    if (pq_sim_openai_parse(call, 0, &p))
        return;
    pq_sim_openai_reply(call, p.model ? p.model : pq_sim_call_arg(call), &p);
    pq_sim_prompt_free(&p);
}

static int match_v1_chat(const char *path, pq_sim_call_t *call)
{
    (void)call;
    return !strcmp(path, "/openai/v1/chat/completions");
}

static void azure_v1_chat(pq_sim_call_t *call)
{
    pq_sim_prompt_t p;

    if (pq_sim_openai_parse(call, 1, &p))
        return;
    pq_sim_openai_reply(call, p.model, &p);
    pq_sim_prompt_free(&p);
}

const pq_sim_route_t pq_sim_azure_routes[] = {
    {&azure_format, EVHTTP_REQ_POST, match_chat, azure_chat, 1, ""},
    {&azure_format, EVHTTP_REQ_POST, match_v1_chat, azure_v1_chat, 1, "model"},
    {NULL, 0, NULL, NULL, 0, NULL},
};
