/* Provider adapters: one table of functions per provider type (STYLE.md item 9), one file per
 * provider, so adding a provider touches nothing but its own file and the registry.
 *
 * An adapter turns an OpenAI chat-completions request into the provider's HTTP request and the
 * provider's answer back into an OpenAI chat.completion object. Adapters are pure: no I/O, no
 * logging of keys or bodies (G6). */
#ifndef PQ_WORKER_PROVIDER_H
#define PQ_WORKER_PROVIDER_H

#include <stddef.h>
#include <jansson.h>
#include <curl/curl.h>
#include "promptq/conf.h"
#include "promptq/err.h"

/* An outgoing HTTP request built by an adapter. All fields are new (the caller frees them with
 * pq_provider_req_clear, or takes them). */
typedef struct pq_provider_req_s {
    char *url;
    struct curl_slist *headers;
    char *body;
    size_t body_len;
} pq_provider_req_t;

typedef struct pq_provider_ops_s {
    const char *type; /* the "type" of a provider in the config */

    /* Builds the request for target (its provider config is target->p) from an OpenAI
     * chat-completions body. request: borrowed. key: the API key to use, or NULL. Returns PQ_OK
     * and fills out, or PQ_ERR_UNSUPPORTED (the target cannot express the request) /
     * PQ_ERR_INVALID / PQ_ERR_NOMEM with a message in errstr (never containing the key). */
    pq_err_t (*build_request)(const pq_target_t *target, const json_t *request, const char *key,
                              pq_provider_req_t *out, char *errstr, size_t errstr_size);

    /* Classifies an HTTP answer. On a 2xx answer that holds a usable completion, returns PQ_OK
     * and sets *completion to a new OpenAI chat.completion object. Otherwise returns the error
     * code (retryable or permanent) and a short message in errstr that never quotes the body
     * (provider error bodies may echo keys, G6). body: borrowed, len bytes, not NUL-terminated. */
    pq_err_t (*parse_response)(const pq_target_t *target, long status, const char *body, size_t len,
                               json_t **completion, char *errstr, size_t errstr_size);
} pq_provider_ops_t;

/* The adapter for a provider type, or NULL when this build has none. Borrowed (static). */
const pq_provider_ops_t *pq_provider_find(const char *type);

/* Frees the fields of req and zeroes it. Safe on a zeroed req. */
void pq_provider_req_clear(pq_provider_req_t *req);

/* Adapters (watsonx.h has the IAM token helpers of pq_provider_watsonx). */
extern const pq_provider_ops_t pq_provider_openai;
extern const pq_provider_ops_t pq_provider_azure_openai;
extern const pq_provider_ops_t pq_provider_anthropic;
extern const pq_provider_ops_t pq_provider_gemini;
extern const pq_provider_ops_t pq_provider_watsonx;

#endif
