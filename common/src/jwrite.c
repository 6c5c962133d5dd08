/* The JSON writer (jwrite.h). */
#include "promptq/jwrite.h"
#include "promptq/jscan.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JW_DEFAULT_CAP 1024

void pq_jw_init(pq_jw_t *w, size_t cap)
{
    w->len = 0;
    w->failed = 0;
    w->cap = cap ? cap : JW_DEFAULT_CAP;
    if (!(w->buf = malloc(w->cap))) {
        w->cap = 0;
        w->failed = 1;
    }
}

/* Room for n more bytes and a NUL. */
static int room(pq_jw_t *w, size_t n)
{
    size_t cap = w->cap ? w->cap : JW_DEFAULT_CAP;
    char *p;

    if (w->failed)
        return -1;
    if (w->len + n + 1 <= w->cap)
        return 0;
    while (cap < w->len + n + 1)
        cap *= 2;
    if (!(p = realloc(w->buf, cap))) {
        w->failed = 1;
        return -1;
    }
    w->buf = p;
    w->cap = cap;
    return 0;
}

void pq_jw_raw(pq_jw_t *w, const char *s, size_t n)
{
    if (room(w, n))
        return;
    memcpy(w->buf + w->len, s, n);
    w->len += n;
}

void pq_jw_key(pq_jw_t *w, const char *name)
{
    size_t n = strlen(name);

    if (room(w, n + 4))
        return;
    if (w->len && w->buf[w->len - 1] != '{')
        w->buf[w->len++] = ',';
    w->buf[w->len++] = '"';
    memcpy(w->buf + w->len, name, n);
    w->len += n;
    w->buf[w->len++] = '"';
    w->buf[w->len++] = ':';
}

void pq_jw_strn(pq_jw_t *w, const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s, *end = p + n;

    if (!s) {
        pq_jw_raw(w, "null", 4);
        return;
    }
    /* at most 6 bytes out per byte in (\u00XX), plus the quotes */
    if (room(w, n * 6 + 2))
        return;
    w->buf[w->len++] = '"';
    while (p < end) {
        unsigned char c = *p;
        size_t k;
        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
            w->buf[w->len++] = (char)c;
            p++;
            continue;
        }
        if (c >= 0x80) {
            if ((k = pq_js_utf8_len(p, end))) {
                memcpy(w->buf + w->len, p, k);
                w->len += k;
                p += k;
            } else {
                w->buf[w->len++] = '?';
                p++;
            }
            continue;
        }
        w->buf[w->len++] = '\\';
        switch (c) {
        case '"':
        case '\\':
            w->buf[w->len++] = (char)c;
            break;
        case '\n':
            w->buf[w->len++] = 'n';
            break;
        case '\r':
            w->buf[w->len++] = 'r';
            break;
        case '\t':
            w->buf[w->len++] = 't';
            break;
        case '\b':
            w->buf[w->len++] = 'b';
            break;
        case '\f':
            w->buf[w->len++] = 'f';
            break;
        default:
            w->len += (size_t)snprintf(w->buf + w->len, 6, "u%04x", c);
            break;
        }
        p++;
    }
    w->buf[w->len++] = '"';
}

void pq_jw_str(pq_jw_t *w, const char *s)
{
    pq_jw_strn(w, s, s ? strlen(s) : 0);
}

void pq_jw_int(pq_jw_t *w, int64_t v)
{
    if (room(w, 24))
        return;
    w->len += (size_t)snprintf(w->buf + w->len, 24, "%" PRId64, v);
}

void pq_jw_json(pq_jw_t *w, const json_t *v)
{
    size_t n;

    if (!v) {
        pq_jw_raw(w, "null", 4);
        return;
    }
    if (room(w, 0))
        return;
    n = json_dumpb(v, w->buf + w->len, w->cap - w->len - 1, JSON_COMPACT | JSON_ENCODE_ANY);
    if (n == 0) {
        w->failed = 1;
        return;
    }
    if (n > w->cap - w->len - 1) { /* did not fit: again with room */
        if (room(w, n))
            return;
        if (json_dumpb(v, w->buf + w->len, n, JSON_COMPACT | JSON_ENCODE_ANY) != n) {
            w->failed = 1;
            return;
        }
    }
    w->len += n;
}

char *pq_jw_finish(pq_jw_t *w, size_t *len)
{
    char *s = w->buf;

    *len = 0;
    if (w->failed || !s) {
        free(s);
        s = NULL;
    } else {
        s[w->len] = '\0';
        *len = w->len;
    }
    w->buf = NULL;
    w->len = w->cap = 0;
    w->failed = 0;
    return s;
}
