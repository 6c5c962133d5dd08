/* Rate-limit hints from a provider's answer headers (pure). */
#include "rate_hints.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <curl/curl.h>

#define LINE_MAX_BYTES 256

void pq_rate_hints_init(pq_rate_hints_t *h)
{
    h->retry_after_ms = -1;
    h->retry_after_is_ms = 0;
    h->reset_requests_ms = -1;
    h->reset_tokens_ms = -1;
    h->remaining_requests = -1;
    h->remaining_tokens = -1;
}

static int64_t clamp_ms(double d)
{
    if (!(d >= 0)) /* NaN and negatives */
        return 0;
    return d < (double)PQ_RATE_HINT_MAX_MS ? (int64_t)d : PQ_RATE_HINT_MAX_MS;
}

/* A plain non-negative number filling all of s, or -1. */
static int number(const char *s, double *out)
{
    char *end;
    double d;

    if (!*s || !(isdigit((unsigned char)*s) || *s == '.'))
        return -1;
    d = strtod(s, &end);
    if (*end != '\0' || !(d >= 0))
        return -1;
    *out = d;
    return 0;
}

int pq_rate_hints_duration(const char *s, size_t len, int64_t *ms)
{
    double total = 0;
    size_t i = 0;
    int parts = 0;

    while (i < len) {
        double v = 0, scale = 1;
        int digits = 0, dot = 0;

        while (i < len && (isdigit((unsigned char)s[i]) || (s[i] == '.' && !dot))) {
            if (s[i] == '.') {
                dot = 1;
            } else if (dot) {
                scale /= 10;
                v += (s[i] - '0') * scale;
                digits++;
            } else {
                v = v * 10 + (s[i] - '0');
                digits++;
            }
            if (v > 1e15)
                return -1;
            i++;
        }
        if (!digits || i >= len)
            return -1;
        if (s[i] == 'h')
            total += v * 3600000.0, i++;
        else if (s[i] == 'm' && i + 1 < len && s[i + 1] == 's')
            total += v, i += 2;
        else if (s[i] == 'm')
            total += v * 60000.0, i++;
        else if (s[i] == 's')
            total += v * 1000.0, i++;
        else
            return -1;
        parts++;
    }
    if (!parts)
        return -1;
    *ms = clamp_ms(total);
    return 0;
}

/* An RFC 3339 time ("2026-12-04T01:02:03Z", fractions and offsets allowed) as ms until it,
 * or -1. */
static int64_t until_rfc3339(const char *v, int64_t now_ms)
{
    struct tm tm;
    const char *p;
    char *end;
    double frac = 0;
    long off = 0;
    time_t t;

    memset(&tm, 0, sizeof(tm));
    p = strptime(v, "%Y-%m-%dT%H:%M:%S", &tm);
    if (!p)
        return -1;
    if (*p == '.') {
        frac = strtod(p, &end);
        p = end;
    }
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        int hh, mm;
        if (strlen(p) != 6 || p[3] != ':' || !isdigit((unsigned char)p[1]) ||
            !isdigit((unsigned char)p[2]) || !isdigit((unsigned char)p[4]) ||
            !isdigit((unsigned char)p[5]))
            return -1;
        hh = (p[1] - '0') * 10 + (p[2] - '0');
        mm = (p[4] - '0') * 10 + (p[5] - '0');
        off = (hh * 60L + mm) * 60L * (*p == '-' ? -1 : 1);
        p += 6;
    } else {
        return -1;
    }
    if (*p)
        return -1;
    t = timegm(&tm);
    if (t == (time_t)-1)
        return -1;
    return clamp_ms(((double)(t - off) + frac) * 1000.0 - (double)now_ms);
}

void pq_rate_hints_header(pq_rate_hints_t *h, const char *line, size_t len, int64_t now_ms)
{
    char buf[LINE_MAX_BYTES];
    const char *colon, *v;
    size_t nlen;
    double d;
    int64_t ms;

    if (len >= sizeof(buf))
        return; /* no hint is that long */
    memcpy(buf, line, len);
    buf[len] = '\0';
    while (len > 0 && (buf[len - 1] == '\r' || buf[len - 1] == '\n' || buf[len - 1] == ' ' ||
                       buf[len - 1] == '\t'))
        buf[--len] = '\0';
    colon = memchr(buf, ':', len);
    if (!colon)
        return;
    nlen = (size_t)(colon - buf);
    v = colon + 1;
    while (*v == ' ' || *v == '\t')
        v++;
#define IS(name) (nlen == sizeof(name) - 1 && strncasecmp(buf, name, nlen) == 0)
    if (IS("retry-after-ms")) {
        if (number(v, &d) == 0) {
            h->retry_after_ms = clamp_ms(d);
            h->retry_after_is_ms = 1;
        }
    } else if (IS("retry-after")) {
        if (h->retry_after_is_ms)
            return;
        if (number(v, &d) == 0) {
            h->retry_after_ms = clamp_ms(d * 1000.0);
        } else {
            time_t t = curl_getdate(v, NULL); /* "Wed, 21 Oct 2015 07:28:00 GMT" */
            if (t != (time_t)-1)
                h->retry_after_ms = clamp_ms((double)t * 1000.0 - (double)now_ms);
        }
    } else if (IS("x-ratelimit-reset-requests") || IS("x-ratelimit-reset-tokens")) {
        /* a duration ("6m0s"), or seconds as a plain number */
        if (pq_rate_hints_duration(v, strlen(v), &ms) != 0) {
            if (number(v, &d) != 0)
                return;
            ms = clamp_ms(d * 1000.0);
        }
        if (IS("x-ratelimit-reset-requests"))
            h->reset_requests_ms = ms;
        else
            h->reset_tokens_ms = ms;
    } else if (IS("anthropic-ratelimit-requests-reset") || IS("anthropic-ratelimit-tokens-reset")) {
        if ((ms = until_rfc3339(v, now_ms)) < 0)
            return;
        if (IS("anthropic-ratelimit-requests-reset"))
            h->reset_requests_ms = ms;
        else
            h->reset_tokens_ms = ms;
    } else if (IS("x-ratelimit-remaining-requests") ||
               IS("anthropic-ratelimit-requests-remaining")) {
        if (number(v, &d) == 0)
            h->remaining_requests = d < 1e15 ? (int64_t)d : (int64_t)1e15;
    } else if (IS("x-ratelimit-remaining-tokens") || IS("anthropic-ratelimit-tokens-remaining")) {
        if (number(v, &d) == 0)
            h->remaining_tokens = d < 1e15 ? (int64_t)d : (int64_t)1e15;
    }
#undef IS
}

int64_t pq_rate_hints_wait_ms(const pq_rate_hints_t *h)
{
    int64_t rq = h->reset_requests_ms, tk = h->reset_tokens_ms;

    if (h->retry_after_ms >= 0)
        return h->retry_after_ms;
    if (h->remaining_requests == 0 && rq >= 0)
        return h->remaining_tokens == 0 && tk > rq ? tk : rq;
    if (h->remaining_tokens == 0 && tk >= 0)
        return tk;
    return rq > tk ? rq : tk; /* -1 when neither was given */
}
