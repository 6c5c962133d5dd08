#include "promptq/err.h"

#include <stddef.h>

static const struct {
    pq_err_t err;
    const char *name;
    const char *desc;
} err_table[] = {
    {PQ_OK, "ok", "success"},
    {PQ_ERR_CONNECT, "connect", "could not connect"},
    {PQ_ERR_TIMEOUT, "timeout", "timed out"},
    {PQ_ERR_RATE_LIMITED, "rate_limited", "rate limited (HTTP 429)"},
    {PQ_ERR_SERVER, "server_error", "server error (HTTP 5xx)"},
    {PQ_ERR_OVERLOADED, "overloaded", "provider overloaded (HTTP 529)"},
    {PQ_ERR_MALFORMED, "malformed", "malformed answer"},
    {PQ_ERR_UNAVAILABLE, "unavailable", "dependency unavailable"},
    {PQ_ERR_CIRCUIT_OPEN, "circuit_open", "circuit breaker open"},
    {PQ_ERR_INVALID, "invalid_request", "invalid request"},
    {PQ_ERR_TOO_LARGE, "too_large", "too large"},
    {PQ_ERR_AUTH, "authentication", "authentication or permission refused (HTTP 401/403)"},
    {PQ_ERR_NOT_FOUND, "not_found", "not found"},
    {PQ_ERR_REFUSED, "refused", "request refused by provider (HTTP 400/422)"},
    {PQ_ERR_CONTEXT_LENGTH, "context_length_exceeded", "prompt over the model's context window"},
    {PQ_ERR_CONTENT_FILTER, "content_filter", "refused by the provider's content policy"},
    {PQ_ERR_CONFLICT, "id_conflict", "id reused with another request"},
    {PQ_ERR_UNSUPPORTED, "unsupported", "request cannot be expressed for this target"},
    {PQ_ERR_EXPIRED, "expired", "deadline or park TTL passed"},
    {PQ_ERR_CANCELLED, "cancelled", "cancelled"},
    {PQ_ERR_POISON, "poison", "redelivered too often without finishing"},
    {PQ_ERR_CONFIG, "config", "invalid configuration"},
    {PQ_ERR_NOMEM, "nomem", "out of memory"},
    {PQ_ERR_INTERNAL, "internal", "internal error"},
};

#define ERR_COUNT (sizeof(err_table) / sizeof(err_table[0]))

const char *pq_err_name(pq_err_t err)
{
    for (size_t i = 0; i < ERR_COUNT; i++)
        if (err_table[i].err == err)
            return err_table[i].name;
    return "unknown";
}

const char *pq_err2str(pq_err_t err)
{
    for (size_t i = 0; i < ERR_COUNT; i++)
        if (err_table[i].err == err)
            return err_table[i].desc;
    return "unknown error";
}

int pq_err_is_retryable(pq_err_t err)
{
    return err > PQ_ERR__RETRYABLE_BEGIN && err < PQ_ERR__RETRYABLE_END;
}

pq_err_t pq_err_from_http_status(long status)
{
    if (status >= 200 && status < 300)
        return PQ_OK;
    switch (status) {
    case 408:
        return PQ_ERR_TIMEOUT;
    case 409: /* a conflicting request of the provider's own: worth a retry */
        return PQ_ERR_SERVER;
    case 429:
        return PQ_ERR_RATE_LIMITED;
    case 500:
    case 502:
    case 503:
    case 504:
        return PQ_ERR_SERVER;
    case 529:
        return PQ_ERR_OVERLOADED;
    case 401:
    case 403:
        return PQ_ERR_AUTH;
    case 404:
        return PQ_ERR_NOT_FOUND;
    default:
        if (status >= 500)
            return PQ_ERR_SERVER;
        return PQ_ERR_REFUSED;
    }
}
