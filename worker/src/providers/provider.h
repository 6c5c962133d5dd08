/* Provider adapters: one table of functions per provider type (STYLE.md item 9), one file per
 * provider, so adding a provider touches nothing but its own file and the registry.
 *
 * An adapter turns an OpenAI chat-completions request into the provider's HTTP request and the
 * provider's answer back into an OpenAI chat.completion object. Adapters are pure: no I/O, no
 * logging of keys or bodies (G6). */
#ifndef PQ_WORKER_PROVIDER_H
#define PQ_WORKER_PROVIDER_H

#include <stddef.h>
#include <stdint.h>
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

/* Deepest nesting of a provider's answer that is taken as it is (answer_as_is, the verbatim
 * flag of parse_response); a deeper one is parsed and serialised again. */
#define PQ_PROVIDER_JSON_DEPTH 64

/* Longest provider reason passed back to clients (bytes, NUL included). */
#define PQ_PROVIDER_REASON_MAX 320

/* What a provider said about a call that failed, beyond the error code. Filled by
 * parse_response for non-2xx answers (and 2xx answers that are refusals, such as a Gemini
 * safety block); zeroed first by the caller. */
typedef struct pq_provider_fault_s {
    /* The provider's error code or type when it is a safe word (pq_provider_safe_token):
     * "context_length_exceeded", "content_filter", "rate_limit_error", "RESOURCE_EXHAUSTED",
     * "overloaded_error", ...; "" when none. */
    char code[64];
    /* The provider's own message, sanitised by pq_provider_reason_sanitize (no key fragments,
     * no control bytes, capped, whole UTF-8 characters); "" when none. Set only where it helps
     * a client: context length, content policy and other refusals (400/422/404). */
    char reason[PQ_PROVIDER_REASON_MAX];
    /* A 429 or quota error about the key as a whole (e.g. OpenAI "insufficient_quota"): the
     * rest applies to the key for every model, not just this one. */
    int key_wide;
} pq_provider_fault_t;

typedef struct pq_provider_ops_s {
    const char *type; /* the "type" of a provider in the config */

    /* Builds the request for target (its provider config is target->p) from an OpenAI
     * chat-completions body. request: borrowed. key: the API key to use, or NULL. Returns PQ_OK
     * and fills out, or PQ_ERR_UNSUPPORTED (the target cannot express the request) /
     * PQ_ERR_INVALID / PQ_ERR_NOMEM with a message in errstr (never containing the key). */
    pq_err_t (*build_request)(const pq_target_t *target, const json_t *request, const char *key,
                              pq_provider_req_t *out, char *errstr, size_t errstr_size);

    /* Optional (NULL: the provider cannot stream; jobs then make the non-streamed call): the
     * streamed form of build_request, same arguments and errors. The adapter streams only when
     * called through this hook; build_request never streams, whatever the request's own
     * "stream" field says. OpenAI and Azure send "stream": true and "stream_options":
     * {"include_usage": true} (always; whether the usage chunk is relayed to the client is the
     * worker's business), Anthropic "stream": true, Gemini :streamGenerateContent?alt=sse,
     * watsonx /ml/v1/text/chat_stream. A 2xx answer is then an SSE body for
     * stream/stream.h's decoder of the provider's format; a non-2xx answer is classified by
     * parse_response as for build_request. */
    pq_err_t (*build_stream_request)(const pq_target_t *target, const json_t *request,
                                     const char *key, pq_provider_req_t *out, char *errstr,
                                     size_t errstr_size);

    /* Classifies an HTTP answer (the error classes of README "Failover"). On a 2xx answer that
     * holds a usable completion, returns PQ_OK and sets *completion to a new OpenAI
     * chat.completion object; when verbatim is not NULL (the caller sets *verbatim to 0 first),
     * an adapter that took the body's JSON as it is, without a change and without duplicate
     * member names, sets *verbatim to 1: the body's bytes are then a faithful JSON text of
     * *completion, stored as they are instead of serialising *completion again. Otherwise returns
     * the error code: retryable (CONNECT, TIMEOUT, RATE_LIMITED, SERVER, OVERLOADED, MALFORMED) or
     * permanent (AUTH, NOT_FOUND, CONTEXT_LENGTH, CONTENT_FILTER, REFUSED), a short message in
     * errstr that never quotes the body (provider error bodies may echo keys, G6), and, when fault
     * is not NULL, the provider's code and sanitised reason. body: borrowed, len bytes, not
     * NUL-terminated. */
    pq_err_t (*parse_response)(const pq_target_t *target, long status, const char *body, size_t len,
                               json_t **completion, int *verbatim, pq_provider_fault_t *fault,
                               char *errstr, size_t errstr_size);

    /* Optional (NULL: every answer goes through parse_response): the fast path of
     * parse_response for a 2xx answer. Returns 1 when body, as it is, is a usable chat.completion
     * that parse_response would return unchanged and with its verbatim flag set, checked without
     * building it (a strict JSON text, pq_js_check, no member name twice in the objects it
     * reads), and sets *total_tokens to its usage.total_tokens; returns 0 when the caller must
     * call parse_response (which then classifies the answer). Pure. */
    int (*answer_as_is)(const pq_target_t *target, const char *body, size_t len,
                        int64_t *total_tokens);

    /* Optional (NULL: a call carries the API key itself): the provider authenticates calls with
     * a short-lived token exchanged for the API key (watsonx: an IBM Cloud IAM access token).
     * token_request builds the exchange for apikey (out: new fields, as build_request's; the
     * body may hold the key); token_parse reads the answer: on PQ_OK a new *token (the caller
     * wipes and frees it) and *expires_at_ms, the wall-clock time to stop using it; errors as
     * parse_response's (PQ_ERR_AUTH for a key the exchange refuses). The worker (prov.h) caches
     * one token per provider and key, runs one exchange per key at a time for all its waiting
     * calls, passes the token as build_request's key, and when the chat endpoint answers 401
     * drops that token and fetches a new one once before it moves on. Both pure, no secret in
     * errstr. */
    pq_err_t (*token_request)(const pq_provider_conf_t *p, const char *apikey,
                              pq_provider_req_t *out, char *errstr, size_t errstr_size);
    pq_err_t (*token_parse)(long status, const char *body, size_t len, char **token,
                            int64_t *expires_at_ms, char *errstr, size_t errstr_size);
} pq_provider_ops_t;

/* The adapter for a provider type, or NULL when this build has none. Borrowed (static). */
const pq_provider_ops_t *pq_provider_find(const char *type);

/* Frees the fields of req and zeroes it. Safe on a zeroed req. */
void pq_provider_req_clear(pq_provider_req_t *req);

/* Adapters. */
extern const pq_provider_ops_t pq_provider_openai;
extern const pq_provider_ops_t pq_provider_azure_openai;
extern const pq_provider_ops_t pq_provider_anthropic;
extern const pq_provider_ops_t pq_provider_gemini;
extern const pq_provider_ops_t pq_provider_watsonx;

#endif
