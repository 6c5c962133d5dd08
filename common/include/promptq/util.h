/* Small helpers: clocks, RFC 3339 times, bounded string copies. */
#ifndef PROMPTQ_UTIL_H
#define PROMPTQ_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Wall clock in milliseconds since the epoch. */
int64_t pq_now_ms(void);

/* Monotonic clock in milliseconds. */
int64_t pq_mono_ms(void);

/* The n-th (1-based) exponential backoff step: base * 2^(n-1), capped at max (no overflow).
 * Callers add their own jitter. Pure. */
int64_t pq_backoff_step_ms(int64_t base, int64_t max, int n);

/* Formats ms since the epoch as "2026-11-28T23:50:03.123Z" into buf (at least 32 bytes). */
void pq_time_format(int64_t ms, char *buf, size_t size);

/* Parses an RFC 3339 time ("2026-11-28T23:50:03Z", optional fraction, "Z" or "+hh:mm");
 * returns 0 and ms since the epoch, or -1 if it is not one. Pure. */
int pq_time_parse(const char *s, int64_t *ms);

/* strlcpy semantics: always NUL-terminates when size > 0; returns strlen(src). */
size_t pq_strlcpy(char *dst, const char *src, size_t size);

/* Reads a whole file into a new NUL-terminated buffer (caller frees); NULL on error with errno
 * set. Refuses files larger than max bytes (errno EFBIG). */
char *pq_file_read(const char *path, size_t max, size_t *len);

#endif
