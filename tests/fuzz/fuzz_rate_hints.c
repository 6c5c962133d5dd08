/* libFuzzer target for the rate-limit header parser (worker/src/rate_hints.c): a provider's
 * answer headers, one per line. Every wait must come out clamped to [0, PQ_RATE_HINT_MAX_MS]
 * (or -1: nothing said), whatever the numbers, units and dates (no undefined float-to-int
 * casts: UBSan checks that in the sanitizer build); a duration that parses is never negative. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rate_hints.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(int64_t v, int none_ok)
{
    if (v == -1 && none_ok)
        return;
    if (v < 0 || v > PQ_RATE_HINT_MAX_MS)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data, *end = s + size;
    const int64_t now = 1767225600000LL; /* 2026-01-01T00:00:00Z */
    pq_rate_hints_t h;
    int64_t ms;

    pq_rate_hints_init(&h);
    while (s < end) {
        const char *nl = memchr(s, '\n', (size_t)(end - s));
        size_t len = nl ? (size_t)(nl + 1 - s) : (size_t)(end - s);
        pq_rate_hints_header(&h, s, len, now);
        s += len;
    }
    check(pq_rate_hints_wait_ms(&h), 1);
    check(h.retry_after_ms, 1);
    check(h.reset_requests_ms, 1);
    check(h.reset_tokens_ms, 1);
    if (h.remaining_requests < -1 || h.remaining_tokens < -1)
        abort();
    if (pq_rate_hints_duration((const char *)data, size, &ms) == 0 && ms < 0)
        abort();
    return 0;
}
