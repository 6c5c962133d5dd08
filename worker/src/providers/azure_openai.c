/* Azure OpenAI chat completions
 * (https://learn.microsoft.com/en-us/azure/ai-services/openai/reference#chat-completions).
 *
 * POST {base_url}/openai/deployments/{deployment}/chat/completions?api-version={api_version}
 * with the key in the api-key header. The route target's model names the deployment. The body
 * is the OpenAI request without "model" (the deployment in the path chooses the model; the
 * reference's request body has no model field) and with streaming turned off. The answer and
 * errors are OpenAI's ({"error":{"code","message"}}; content-filter annotations such as
 * prompt_filter_results and content_filter_results are extra fields and kept), so the answer
 * is read by the OpenAI adapter's parser.
 *
 * With azure_api "v1" (the v1 API,
 * https://learn.microsoft.com/en-us/azure/ai-foundry/openai/api-version-lifecycle):
 * POST {base_url}/openai/v1/chat/completions without api-version, with the body's "model" set
 * to the target's model (the deployment name), as OpenAI's. */
#include "provider.h"
#include "common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static pq_err_t azure_build(const pq_target_t *target, const json_t *request, const char *key,
                            pq_provider_req_t *out, char *errstr, size_t errstr_size, int stream)
{
    const pq_provider_conf_t *p = target->p;
    json_t *body = NULL;
    char *dep = NULL, *ver = NULL;
    int v1 = p->azure_api && strcmp(p->azure_api, "v1") == 0;
    pq_err_t err;

    if ((err = pq_provider_req_start(request, out, errstr, errstr_size)) != PQ_OK)
        goto out;
    if (!v1 && !p->api_version) {
        snprintf(errstr, errstr_size, "providers.%s.api_version is required", p->name);
        err = PQ_ERR_CONFIG;
        goto out;
    }
    if ((err = pq_provider_key_check(p, key, "api key", errstr, errstr_size)) != PQ_OK)
        goto out;
    err = PQ_ERR_NOMEM;
    if (!(body = json_copy((json_t *)request))) /* shallow: values are shared */
        goto out;
    if (pq_provider_stream_fields(body, stream))
        goto out;
    if (v1) {
        if (json_object_set_new(body, "model", json_string(target->model)) ||
            pq_provider_req_json(out, body) ||
            pq_provider_req_url(out, "%s/openai/v1/chat/completions", p->base_url))
            goto out;
    } else {
        json_object_del(body, "model");
        if (pq_provider_req_json(out, body) || !(dep = pq_provider_escape(target->model)) ||
            !(ver = pq_provider_escape(p->api_version)) ||
            pq_provider_req_url(out, "%s/openai/deployments/%s/chat/completions?api-version=%s",
                                p->base_url, dep, ver))
            goto out;
    }
    if ((key && *key && pq_provider_header_add(&out->headers, "api-key", key)) ||
        pq_provider_headers_add_conf(&out->headers, p, 0, errstr, errstr_size))
        goto out;
    err = PQ_OK;
out:
    free(dep);
    free(ver);
    json_decref(body);
    return pq_provider_req_end(out, err, errstr, errstr_size);
}

static pq_err_t azure_build_request(const pq_target_t *target, const json_t *request,
                                    const char *key, pq_provider_req_t *out, char *errstr,
                                    size_t errstr_size)
{
    return azure_build(target, request, key, out, errstr, errstr_size, 0);
}

/* As OpenAI's: "stream": true, "stream_options": {"include_usage": true}. */
static pq_err_t azure_build_stream_request(const pq_target_t *target, const json_t *request,
                                           const char *key, pq_provider_req_t *out, char *errstr,
                                           size_t errstr_size)
{
    return azure_build(target, request, key, out, errstr, errstr_size, 1);
}

/* Answers have OpenAI's shape and are read by the OpenAI parser; errors
 * {"error":{"code","message","type"?,"innererror"?}} are classified by status and then by
 * pq_provider_openai_fault: code "content_filter" (a 400 whose innererror.code is
 * ResponsibleAIPolicyViolation: the prompt tripped the content filter) is content_filter,
 * "context_length_exceeded" context_length. */
static pq_err_t azure_parse_response(const pq_target_t *target, long status, const char *body,
                                     size_t len, json_t **completion, int *verbatim,
                                     pq_provider_fault_t *fault, char *errstr, size_t errstr_size)
{
    pq_err_t err = pq_err_from_http_status(status);
    char token[64] = "";
    json_t *root, *e;

    if (err == PQ_OK)
        return pq_provider_openai.parse_response(target, status, body, len, completion, verbatim,
                                                 fault, errstr, errstr_size);
    *completion = NULL;
    root = json_loadb(body, len, JSON_ALLOW_NUL, NULL);
    e = json_object_get(root, "error");
    pq_provider_safe_token(json_object_get(e, "code"), token, sizeof(token));
    if (!token[0])
        pq_provider_safe_token(json_object_get(e, "type"), token, sizeof(token));
    err = pq_provider_openai_fault(target, err, json_is_object(e) ? e : NULL, fault);
    pq_provider_http_error(errstr, errstr_size, target, status, token);
    json_decref(root);
    return err;
}

/* A 2xx answer is OpenAI's chat.completion (Azure adds members such as content_filter_results,
 * which pass as they are). */
static int azure_answer_as_is(const pq_target_t *target, const char *body, size_t len,
                              int64_t *total_tokens)
{
    return pq_provider_openai.answer_as_is(target, body, len, total_tokens);
}

const pq_provider_ops_t pq_provider_azure_openai = {
    .type = "azure_openai",
    .build_request = azure_build_request,
    .build_stream_request = azure_build_stream_request,
    .parse_response = azure_parse_response,
    .answer_as_is = azure_answer_as_is,
};
