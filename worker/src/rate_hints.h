/* Rate-limit hints of a provider's answer, read from its headers: how long to wait before the
 * same key may call that model again. Pure (no I/O): one header line at a time, then the wait.
 *
 *   retry-after-ms: N           OpenAI, Azure (milliseconds; preferred)
 *   Retry-After: N | HTTP-date  RFC 9110 §10.2.3
 *   x-ratelimit-reset-requests / -tokens: "1s", "6m0s", "20ms", "1h2m3.5s"   OpenAI, Azure
 *   x-ratelimit-remaining-requests / -tokens: N                              OpenAI, Azure
 *   anthropic-ratelimit-requests-reset / -tokens-reset: RFC 3339 time        Anthropic
 *   anthropic-ratelimit-requests-remaining / -tokens-remaining: N            Anthropic
 * Values that do not parse are ignored; every wait is clamped to [0, PQ_RATE_HINT_MAX_MS]
 * (callers cap it to their own policy, e.g. max_rest_ms). */
#ifndef PQ_WORKER_RATE_HINTS_H
#define PQ_WORKER_RATE_HINTS_H

#include <stddef.h>
#include <stdint.h>

#define PQ_RATE_HINT_MAX_MS 1000000000000LL /* about 31 years */

typedef struct pq_rate_hints_s {
    int64_t retry_after_ms;     /* retry-after-ms, else Retry-After; -1 none */
    int retry_after_is_ms;      /* it came from retry-after-ms (wins over Retry-After) */
    int64_t reset_requests_ms;  /* until the request limit resets; -1 none */
    int64_t reset_tokens_ms;    /* until the token limit resets; -1 none */
    int64_t remaining_requests; /* -1 unknown */
    int64_t remaining_tokens;   /* -1 unknown */
} pq_rate_hints_t;

/* Nothing known. */
void pq_rate_hints_init(pq_rate_hints_t *h);

/* Feeds one header line "Name: value" (len bytes, CR/LF at its end allowed, not necessarily
 * NUL-terminated). now_ms: the wall clock in ms, for dates. */
void pq_rate_hints_header(pq_rate_hints_t *h, const char *line, size_t len, int64_t now_ms);

/* The wait the answer asks for in ms: Retry-After (or retry-after-ms) when given; else the
 * reset of the limit that is used up (remaining 0), else the longer of the resets given;
 * -1 when the answer said nothing. */
int64_t pq_rate_hints_wait_ms(const pq_rate_hints_t *h);

/* Parses an OpenAI-style duration ("6m0s", "20ms", "1h2m3.5s", "0.5s") of len bytes into ms.
 * Returns 0, or -1 when it is not one. */
int pq_rate_hints_duration(const char *s, size_t len, int64_t *ms);

#endif
