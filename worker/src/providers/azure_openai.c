/* Azure OpenAI chat completions
 * (https://learn.microsoft.com/en-us/azure/ai-services/openai/reference#chat-completions).
 *
 * POST {base_url}/openai/deployments/{deployment}/chat/completions?api-version={api_version}
 * with the key in the api-key header. The route target's model names the deployment. The body
 * is the OpenAI request without "model" (the deployment in the path chooses the model; the
 * reference's request body has no model field) and with streaming turned off. The answer and
 * errors are OpenAI's ({"error":{"code","message"}}; content-filter annotations such as
 * prompt_filter_results and content_filter_results are extra fields and kept), so the answer
 * is read by the OpenAI adapter's parser. */
#include "provider.h"
#include "common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static pq_err_t azure_build_request(const pq_target_t *target, const json_t *request,
                                    const char *key, pq_provider_req_t *out, char *errstr,
                                    size_t errstr_size)
{
    const pq_provider_conf_t *p = target->p;
    json_t *body = NULL;
    char *dep = NULL, *ver = NULL;
    pq_err_t err = PQ_ERR_NOMEM;

    memset(out, 0, sizeof(*out));
    if (!json_is_object(request)) {
        snprintf(errstr, errstr_size, "request is not an object");
        err = PQ_ERR_INVALID;
        goto out_free;
    }
    if (!p->api_version) {
        snprintf(errstr, errstr_size, "providers.%s.api_version is required", p->name);
        err = PQ_ERR_CONFIG;
        goto out_free;
    }
    if (key && strpbrk(key, "\r\n")) {
        snprintf(errstr, errstr_size, "providers.%s: api key contains a line break", p->name);
        err = PQ_ERR_CONFIG;
        goto out_free;
    }
    if (!(body = json_copy((json_t *)request))) /* shallow: values are shared */
        goto out_nomem;
    json_object_del(body, "model");
    json_object_del(body, "stream");
    json_object_del(body, "stream_options");
    if (!(out->body = json_dumps(body, JSON_COMPACT)))
        goto out_nomem;
    out->body_len = strlen(out->body);
    if (!(dep = pq_provider_escape(target->model)) || !(ver = pq_provider_escape(p->api_version)))
        goto out_nomem;
    if (asprintf(&out->url, "%s/openai/deployments/%s/chat/completions?api-version=%s", p->base_url,
                 dep, ver) < 0) {
        out->url = NULL;
        goto out_nomem;
    }
    if (pq_provider_header_add(&out->headers, "Content-Type", "application/json") ||
        (key && *key && pq_provider_header_add(&out->headers, "api-key", key)))
        goto out_nomem;
    for (size_t i = 0; i < p->nheaders; i++)
        if (pq_provider_header_add(&out->headers, p->headers[i].key, p->headers[i].value))
            goto out_nomem;
    err = PQ_OK;
    goto out_free;

out_nomem:
    snprintf(errstr, errstr_size, "out of memory");
    pq_provider_req_clear(out);
out_free:
    free(dep);
    free(ver);
    json_decref(body);
    return err;
}

/* Answers have OpenAI's shape and are read by the OpenAI parser; errors
 * {"error":{"code","message","type"?,"innererror"?}} are classified here by status. */
static pq_err_t azure_parse_response(const pq_target_t *target, long status, const char *body,
                                     size_t len, json_t **completion, char *errstr,
                                     size_t errstr_size)
{
    pq_err_t err = pq_err_from_http_status(status);
    char token[64] = "";
    json_t *root, *e;

    if (err == PQ_OK)
        return pq_provider_openai.parse_response(target, status, body, len, completion, errstr,
                                                 errstr_size);
    *completion = NULL;
    root = json_loadb(body, len, 0, NULL);
    e = json_object_get(root, "error");
    pq_provider_safe_token(json_object_get(e, "code"), token, sizeof(token));
    if (!token[0])
        pq_provider_safe_token(json_object_get(e, "type"), token, sizeof(token));
    snprintf(errstr, errstr_size, "%s answered HTTP %ld%s%s", target->p->name, status,
             token[0] ? ": " : "", token);
    json_decref(root);
    return err;
}

const pq_provider_ops_t pq_provider_azure_openai = {
    .type = "azure_openai",
    .build_request = azure_build_request,
    .parse_response = azure_parse_response,
};
