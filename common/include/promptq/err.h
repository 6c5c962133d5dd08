/* promptq's one error enum. Retryable and permanent failures have distinct codes so that
 * failover branches on the code, never on message text. */
#ifndef PROMPTQ_ERR_H
#define PROMPTQ_ERR_H

typedef enum {
    PQ_OK = 0,

    /* Retryable: the same request may succeed later or elsewhere. */
    PQ_ERR__RETRYABLE_BEGIN = 100,
    PQ_ERR_CONNECT,      /* could not connect / connection reset */
    PQ_ERR_TIMEOUT,      /* no (complete) answer in time; HTTP 408 */
    PQ_ERR_RATE_LIMITED, /* HTTP 429 */
    PQ_ERR_SERVER,       /* HTTP 500, 502, 503, 504 */
    PQ_ERR_OVERLOADED,   /* HTTP 529 (Anthropic overloaded) */
    PQ_ERR_MALFORMED,    /* provider answered a body we could not parse */
    PQ_ERR_UNAVAILABLE,  /* a dependency (Kafka, Redis) is down right now */
    PQ_ERR_CIRCUIT_OPEN, /* target skipped: its circuit breaker is open */
    PQ_ERR__RETRYABLE_END,

    /* Permanent: retrying the same request will not help. */
    PQ_ERR__PERMANENT_BEGIN = 200,
    PQ_ERR_INVALID,        /* bad input: JSON, schema, field values */
    PQ_ERR_TOO_LARGE,      /* over a configured size cap */
    PQ_ERR_AUTH,           /* HTTP 401/403 */
    PQ_ERR_NOT_FOUND,      /* HTTP 404, unknown route or id */
    PQ_ERR_REFUSED,        /* HTTP 400/422 from a provider (not one of the two below) */
    PQ_ERR_CONTEXT_LENGTH, /* the prompt is over the target's context window */
    PQ_ERR_CONTENT_FILTER, /* the provider's content policy refused the request */
    PQ_ERR_CONFLICT,       /* (tenant, id) reused with another request */
    PQ_ERR_UNSUPPORTED,    /* a target cannot express the request */
    PQ_ERR_EXPIRED,        /* deadline or park TTL passed */
    PQ_ERR_CANCELLED,
    PQ_ERR_POISON, /* redelivered too often without finishing */
    PQ_ERR_CONFIG, /* bad configuration */
    PQ_ERR_NOMEM,
    PQ_ERR_INTERNAL,
    PQ_ERR__PERMANENT_END,
} pq_err_t;

/* Short machine name, e.g. "rate_limited", used in JSON error types and metrics labels. */
const char *pq_err_name(pq_err_t err);

/* Human description, e.g. "provider rate limit (HTTP 429)". */
const char *pq_err2str(pq_err_t err);

/* 1 if err is in the retryable range. */
int pq_err_is_retryable(pq_err_t err);

/* Maps an HTTP status from a provider to an error code (2xx maps to PQ_OK). */
pq_err_t pq_err_from_http_status(long status);

#endif
