/* IBM watsonx.ai: IAM token exchange helpers for the worker (the chat adapter itself is
 * pq_provider_watsonx, declared in provider.h).
 *
 * watsonx authenticates chat calls with a short-lived IAM access token, not with the API key:
 * the worker exchanges each configured API key for a token (pq_watsonx_token_request, then an
 * HTTP call, then pq_watsonx_token_parse), caches the token until *expires_at_ms, and passes
 * the TOKEN as the `key` argument of pq_provider_watsonx.build_request. Both helpers are pure
 * (no I/O) and never copy the API key, the token or the IAM answer into errstr (G6). */
#ifndef PQ_WORKER_PROVIDERS_WATSONX_H
#define PQ_WORKER_PROVIDERS_WATSONX_H

#include <stdint.h>

#include "provider.h"

/* Builds the IAM token request: POST p->iam_url (default https://iam.cloud.ibm.com/identity/token)
 * with Content-Type application/x-www-form-urlencoded, Accept application/json and the body
 * grant_type=urn:ibm:params:oauth:grant-type:apikey&apikey=<URL-encoded apikey>.
 * p, apikey: borrowed. out: filled with new fields (free with pq_provider_req_clear); the body
 * holds the API key. Returns PQ_OK, PQ_ERR_CONFIG (no iam_url, empty key) or PQ_ERR_NOMEM. */
pq_err_t pq_watsonx_token_request(const pq_provider_conf_t *p, const char *apikey,
                                  pq_provider_req_t *out, char *errstr, size_t errstr_size);

/* Reads the IAM answer {access_token, token_type, expires_in, expiration}. body: borrowed, len
 * bytes, not NUL-terminated. On PQ_OK, *token is a new string (the caller frees it, ideally after
 * wiping it) and *expires_at_ms is when the caller should stop using it and fetch a new one:
 * 60 s before `expiration` (epoch seconds), or after 80 % of the lifetime for tokens that live
 * less than 5 minutes. Errors: 400/401/403 (IAM answers a wrong or unknown API key with 400,
 * e.g. BXNIM0415E) -> PQ_ERR_AUTH, 429 -> PQ_ERR_RATE_LIMITED, 5xx -> PQ_ERR_SERVER, a 2xx
 * without a usable token -> PQ_ERR_MALFORMED; errstr names the IAM errorCode at most. */
pq_err_t pq_watsonx_token_parse(long status, const char *body, size_t len, char **token,
                                int64_t *expires_at_ms, char *errstr, size_t errstr_size);

#endif
