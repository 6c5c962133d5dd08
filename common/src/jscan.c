/* The strict JSON scanner (jscan.h): one checking pass by recursive descent, then walks that
 * skip over values already known to be well formed. */
#include "promptq/jscan.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* The longest number whose double value is checked (for overflow) here; longer reals are
 * refused (jansson reads them; nothing promptq looks at is one). */
#define REAL_MAX_CHARS 320

/* Most members pq_js_unique_names compares (a larger max_members is taken as this). */
#define UNIQUE_NAMES_MAX 256

typedef struct scan_s {
    const char *start, *end;
    const char *fault;
    int max_depth;
} scan_t;

static int is_ws(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && is_ws((unsigned char)*p))
        p++;
    return p;
}

static const char *fail(scan_t *s, const char *at)
{
    if (!s->fault)
        s->fault = at;
    return NULL;
}

static int hex4(const char *p, const char *end, unsigned *out)
{
    unsigned v = 0;

    if (end - p < 4)
        return -1;
    for (int i = 0; i < 4; i++) {
        unsigned char c = (unsigned char)p[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= c - '0';
        else if (c >= 'a' && c <= 'f')
            v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            v |= c - 'A' + 10;
        else
            return -1;
    }
    *out = v;
    return 0;
}

size_t pq_js_utf8_len(const unsigned char *p, const unsigned char *end)
{
    unsigned c = p[0], cp;
    size_t n;

    if (c >= 0xC2 && c <= 0xDF)
        n = 2, cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF)
        n = 3, cp = c & 0x0F;
    else if (c >= 0xF0 && c <= 0xF4)
        n = 4, cp = c & 0x07;
    else
        return 0;
    if ((size_t)(end - p) < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (p[i] & 0x3F);
    }
    if ((n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) || cp > 0x10FFFF ||
        (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

/* A string from its opening quote at p; key: an object's member name (no \u0000 there). */
static const char *scan_string(scan_t *s, const char *p, int key)
{
    const char *end = s->end;

    p++;
    for (;;) {
        unsigned char c;
        /* the common case: a run of printable ASCII */
        while (p < end && (unsigned char)*p >= 0x20 && (unsigned char)*p < 0x80 && *p != '"' &&
               *p != '\\')
            p++;
        if (p >= end)
            return fail(s, p);
        c = (unsigned char)*p;
        if (c == '"')
            return p + 1;
        if (c < 0x20)
            return fail(s, p); /* raw control character */
        if (c >= 0x80) {
            size_t n = pq_js_utf8_len((const unsigned char *)p, (const unsigned char *)end);
            if (!n)
                return fail(s, p);
            p += n;
            continue;
        }
        /* an escape */
        if (end - p < 2)
            return fail(s, p);
        switch (p[1]) {
        case '"':
        case '\\':
        case '/':
        case 'b':
        case 'f':
        case 'n':
        case 'r':
        case 't':
            p += 2;
            break;
        case 'u': {
            unsigned u, lo;
            if (hex4(p + 2, end, &u))
                return fail(s, p);
            if (u >= 0xDC00 && u <= 0xDFFF)
                return fail(s, p); /* a low surrogate alone */
            if (u >= 0xD800 && u <= 0xDBFF) {
                if (end - p < 12 || p[6] != '\\' || p[7] != 'u' || hex4(p + 8, end, &lo) ||
                    lo < 0xDC00 || lo > 0xDFFF)
                    return fail(s, p);
                p += 12;
            } else {
                if (u == 0 && key)
                    return fail(s, p); /* jansson refuses NUL in names even with ALLOW_NUL */
                p += 6;
            }
            break;
        }
        default:
            return fail(s, p);
        }
    }
}

/* digits of an integer (optional '-') fit int64_t */
static int int_fits(const char *p, const char *end)
{
    int neg = *p == '-';
    uint64_t v = 0, lim = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;

    for (p += neg; p < end; p++) {
        unsigned d = (unsigned)(*p - '0');
        if (v > (lim - d) / 10)
            return 0;
        v = v * 10 + d;
    }
    return 1;
}

static const char *scan_number(scan_t *s, const char *p, pq_js_type_t *type)
{
    const char *start = p, *end = s->end;
    int real = 0;

    if (p < end && *p == '-')
        p++;
    if (p >= end)
        return fail(s, p);
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    } else {
        return fail(s, p);
    }
    if (p < end && *p == '.') {
        real = 1;
        p++;
        if (p >= end || *p < '0' || *p > '9')
            return fail(s, p);
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        real = 1;
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (p >= end || *p < '0' || *p > '9')
            return fail(s, p);
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    if (!real) {
        if (!int_fits(start, p))
            return fail(s, start); /* jansson: "too big integer" */
        *type = PQ_JS_INTEGER;
        return p;
    }
    {
        char buf[REAL_MAX_CHARS + 1];
        size_t n = (size_t)(p - start);
        double d;
        if (n > REAL_MAX_CHARS)
            return fail(s, start);
        memcpy(buf, start, n);
        buf[n] = '\0';
        errno = 0;
        d = strtod(buf, NULL);
        if (errno == ERANGE && (d == HUGE_VAL || d == -HUGE_VAL))
            return fail(s, start); /* jansson: "real number overflow" */
    }
    *type = PQ_JS_REAL;
    return p;
}

static const char *scan_value(scan_t *s, const char *p, int depth, pq_js_type_t *type);

static const char *scan_container(scan_t *s, const char *p, int depth, int object)
{
    const char *end = s->end;
    char close = object ? '}' : ']';
    pq_js_type_t t;

    if (depth >= s->max_depth)
        return fail(s, p);
    p = skip_ws(p + 1, end);
    if (p < end && *p == close)
        return p + 1;
    for (;;) {
        if (object) {
            if (p >= end || *p != '"')
                return fail(s, p);
            if (!(p = scan_string(s, p, 1)))
                return NULL;
            p = skip_ws(p, end);
            if (p >= end || *p != ':')
                return fail(s, p);
            p = skip_ws(p + 1, end);
        }
        if (!(p = scan_value(s, p, depth + 1, &t)))
            return NULL;
        p = skip_ws(p, end);
        if (p < end && *p == ',') {
            p = skip_ws(p + 1, end);
            continue;
        }
        if (p < end && *p == close)
            return p + 1;
        return fail(s, p);
    }
}

static const char *literal(scan_t *s, const char *p, const char *word, size_t n)
{
    if ((size_t)(s->end - p) < n || memcmp(p, word, n) != 0)
        return fail(s, p);
    return p + n;
}

static const char *scan_value(scan_t *s, const char *p, int depth, pq_js_type_t *type)
{
    if (p >= s->end)
        return fail(s, p);
    switch (*p) {
    case '{':
        *type = PQ_JS_OBJECT;
        return scan_container(s, p, depth, 1);
    case '[':
        *type = PQ_JS_ARRAY;
        return scan_container(s, p, depth, 0);
    case '"':
        *type = PQ_JS_STRING;
        return scan_string(s, p, 0);
    case 't':
        *type = PQ_JS_TRUE;
        return literal(s, p, "true", 4);
    case 'f':
        *type = PQ_JS_FALSE;
        return literal(s, p, "false", 5);
    case 'n':
        *type = PQ_JS_NULL;
        return literal(s, p, "null", 4);
    default:
        return scan_number(s, p, type);
    }
}

int pq_js_check(const char *buf, size_t len, int max_depth, pq_js_t *root, size_t *fault_at)
{
    scan_t s = {buf, buf + len, NULL, max_depth < 0 ? 0 : max_depth};
    const char *p = skip_ws(buf, s.end), *v = p, *after;
    pq_js_type_t type = PQ_JS_NONE;

    memset(root, 0, sizeof(*root));
    after = scan_value(&s, p, 0, &type);
    if (after && skip_ws(after, s.end) != s.end)
        after = fail(&s, skip_ws(after, s.end)); /* something after the value */
    if (!after) {
        if (fault_at)
            *fault_at = (size_t)((s.fault ? s.fault : s.end) - buf);
        return -1;
    }
    root->p = v;
    root->n = (size_t)(after - v);
    root->type = type;
    return 0;
}

/* ---- walking a checked text ---- */

/* The end of the (well-formed) string whose opening quote is at p. */
static const char *skip_string(const char *p, const char *end)
{
    for (p++; p < end; p++) {
        if (*p == '\\')
            p++;
        else if (*p == '"')
            return p + 1;
    }
    return end;
}

/* The end of the (well-formed) value at p, and its type. */
static const char *skip_value(const char *p, const char *end, pq_js_type_t *type)
{
    int depth = 0;

    switch (*p) {
    case '"':
        *type = PQ_JS_STRING;
        return skip_string(p, end);
    case '{':
    case '[':
        *type = *p == '{' ? PQ_JS_OBJECT : PQ_JS_ARRAY;
        for (; p < end; p++) {
            if (*p == '"') {
                p = skip_string(p, end) - 1;
            } else if (*p == '{' || *p == '[') {
                depth++;
            } else if (*p == '}' || *p == ']') {
                if (--depth == 0)
                    return p + 1;
            }
        }
        return end;
    case 't':
        *type = PQ_JS_TRUE;
        return p + 4;
    case 'f':
        *type = PQ_JS_FALSE;
        return p + 5;
    case 'n':
        *type = PQ_JS_NULL;
        return p + 4;
    default:
        *type = PQ_JS_INTEGER;
        while (p < end && !is_ws((unsigned char)*p) && *p != ',' && *p != '}' && *p != ']') {
            if (*p == '.' || *p == 'e' || *p == 'E')
                *type = PQ_JS_REAL;
            p++;
        }
        return p;
    }
}

void pq_js_iter(const pq_js_t *v, pq_js_iter_t *it)
{
    if (v->type == PQ_JS_OBJECT || v->type == PQ_JS_ARRAY) {
        it->p = v->p + 1;
        it->end = v->p + v->n - 1; /* at the closing bracket */
    } else {
        it->p = it->end = NULL;
    }
}

/* Moves to the next item: past a ',' and whitespace; 0 at the end. */
static int iter_step(pq_js_iter_t *it)
{
    if (!it->p)
        return 0;
    it->p = skip_ws(it->p, it->end);
    if (it->p < it->end && *it->p == ',')
        it->p = skip_ws(it->p + 1, it->end);
    return it->p < it->end;
}

static void take(pq_js_iter_t *it, pq_js_t *out)
{
    const char *e = skip_value(it->p, it->end, &out->type);
    out->p = it->p;
    out->n = (size_t)(e - it->p);
    it->p = e;
}

int pq_js_next_member(pq_js_iter_t *it, pq_js_t *name, pq_js_t *value)
{
    if (!iter_step(it))
        return 0;
    take(it, name);
    it->p = skip_ws(it->p, it->end);
    it->p = skip_ws(it->p + 1, it->end); /* the ':' */
    take(it, value);
    return 1;
}

int pq_js_next_elem(pq_js_iter_t *it, pq_js_t *value)
{
    if (!iter_step(it))
        return 0;
    take(it, value);
    return 1;
}

/* name (a string span) written exactly s */
static int name_is(const pq_js_t *name, const char *s, size_t n)
{
    return name->n == n + 2 && memcmp(name->p + 1, s, n) == 0;
}

int pq_js_get(const pq_js_t *obj, const char *name, pq_js_t *out)
{
    pq_js_iter_t it;
    pq_js_t k, v;
    size_t n = strlen(name);

    memset(out, 0, sizeof(*out));
    if (obj->type != PQ_JS_OBJECT)
        return 0;
    pq_js_iter(obj, &it);
    while (pq_js_next_member(&it, &k, &v)) {
        if (name_is(&k, name, n)) {
            *out = v;
            return 1;
        }
    }
    return 0;
}

int pq_js_unique_names(const pq_js_t *obj, size_t max_members)
{
    pq_js_t names[UNIQUE_NAMES_MAX], k, v;
    pq_js_iter_t it;
    size_t n = 0;

    if (obj->type != PQ_JS_OBJECT)
        return 0;
    if (max_members > UNIQUE_NAMES_MAX)
        max_members = UNIQUE_NAMES_MAX;
    /* one walk collects the names (values are skipped once), then they are compared */
    pq_js_iter(obj, &it);
    while (pq_js_next_member(&it, &k, &v)) {
        if (n == max_members || memchr(k.p, '\\', k.n))
            return 0;
        for (size_t i = 0; i < n; i++)
            if (names[i].n == k.n && memcmp(names[i].p, k.p, k.n) == 0)
                return 0;
        names[n++] = k;
    }
    return 1;
}

int pq_js_str_plain(const pq_js_t *v)
{
    return v->type == PQ_JS_STRING && !memchr(v->p, '\\', v->n);
}

int pq_js_str_is(const pq_js_t *v, const char *s)
{
    return pq_js_str_plain(v) && name_is(v, s, strlen(s));
}

int pq_js_int(const pq_js_t *v, int64_t *out)
{
    const char *p = v->p, *end = v->p + v->n;
    int neg;
    uint64_t u = 0;

    if (v->type != PQ_JS_INTEGER)
        return -1;
    neg = *p == '-';
    for (p += neg; p < end; p++)
        u = u * 10 + (uint64_t)(*p - '0'); /* fits: checked by pq_js_check */
    *out = neg ? (int64_t)(0 - u) : (int64_t)u;
    return 0;
}
