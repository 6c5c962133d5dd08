/* Server-Sent Events decoder; see sse.h. */
#include "sse.h"

#include <stdlib.h>
#include <string.h>

/* A growable byte buffer with a hard cap; always NUL-terminated once allocated. */
typedef struct {
    char *p;
    size_t len, size;
} buf_t;

struct pq_sse_s {
    size_t max;
    buf_t line, data, type, id;
    int data_set;   /* a data field was seen for the pending event */
    int pending_cr; /* the last byte seen was a CR: an LF right after it ends nothing */
    int bom_done;   /* past the first bytes (a BOM is only skipped at the very start) */
    size_t bom_seen;
    int64_t retry_ms;
    uint64_t seq;
    pq_err_t failed;
};

static const unsigned char bom[3] = {0xEF, 0xBB, 0xBF};

static int buf_reserve(buf_t *b, size_t need)
{
    size_t size;
    char *p;

    if (need + 1 <= b->size)
        return 0;
    size = b->size ? b->size : 64;
    while (size < need + 1)
        size *= 2;
    if (!(p = realloc(b->p, size)))
        return -1;
    b->p = p;
    b->size = size;
    return 0;
}

/* Appends n bytes; PQ_ERR_TOO_LARGE when the result would pass max. */
static pq_err_t buf_add(buf_t *b, const char *s, size_t n, size_t max)
{
    if (n > max || b->len > max - n)
        return PQ_ERR_TOO_LARGE;
    if (buf_reserve(b, b->len + n))
        return PQ_ERR_NOMEM;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return PQ_OK;
}

static pq_err_t buf_set(buf_t *b, const char *s, size_t n, size_t max)
{
    b->len = 0;
    if (buf_reserve(b, 0))
        return PQ_ERR_NOMEM;
    b->p[0] = '\0';
    return buf_add(b, s, n, max);
}

static const char *buf_str(const buf_t *b)
{
    return b->p ? b->p : "";
}

pq_sse_t *pq_sse_new(size_t max_bytes)
{
    pq_sse_t *sse = calloc(1, sizeof(*sse));

    if (!sse)
        return NULL;
    sse->max = max_bytes ? max_bytes : PQ_SSE_DEFAULT_MAX;
    sse->retry_ms = -1;
    return sse;
}

void pq_sse_destroy(pq_sse_t *sse)
{
    if (!sse)
        return;
    free(sse->line.p);
    free(sse->data.p);
    free(sse->type.p);
    free(sse->id.p);
    free(sse);
}

static void event_reset(pq_sse_t *sse)
{
    sse->data.len = 0;
    sse->type.len = 0;
    sse->data_set = 0;
}

/* A blank line: dispatches the pending event when it has data. */
static pq_err_t dispatch(pq_sse_t *sse, pq_sse_event_cb cb, void *opaque)
{
    pq_sse_event_t ev;
    pq_err_t err = PQ_OK;

    if (!sse->data_set) {
        event_reset(sse);
        return PQ_OK;
    }
    /* the data buffer ends with the LF of its last line: drop it */
    if (sse->data.len > 0)
        sse->data.len--;
    if (sse->data.p)
        sse->data.p[sse->data.len] = '\0';
    ev.type = sse->type.len ? buf_str(&sse->type) : "message";
    ev.type_len = sse->type.len ? sse->type.len : 7;
    ev.data = buf_str(&sse->data);
    ev.data_len = sse->data.len;
    ev.id = buf_str(&sse->id);
    ev.id_len = sse->id.len;
    ev.retry_ms = sse->retry_ms;
    ev.seq = ++sse->seq;
    if (cb)
        err = cb(&ev, opaque);
    event_reset(sse);
    return err;
}

static int field_is(const char *name, size_t n, const char *word)
{
    return n == strlen(word) && memcmp(name, word, n) == 0;
}

/* Interprets one complete line (without its line end). */
static pq_err_t process_line(pq_sse_t *sse, const char *line, size_t len, pq_sse_event_cb cb,
                             void *opaque)
{
    const char *colon, *value;
    size_t name_len, value_len;
    pq_err_t err = PQ_OK;

    if (len == 0)
        return dispatch(sse, cb, opaque);
    if (line[0] == ':')
        return PQ_OK; /* comment, e.g. a keep-alive */
    colon = memchr(line, ':', len);
    if (colon) {
        name_len = (size_t)(colon - line);
        value = colon + 1;
        value_len = len - name_len - 1;
        if (value_len > 0 && value[0] == ' ') {
            value++;
            value_len--;
        }
    } else {
        name_len = len;
        value = line + len;
        value_len = 0;
    }
    if (field_is(line, name_len, "data")) {
        if ((err = buf_add(&sse->data, value, value_len, sse->max)) == PQ_OK)
            err = buf_add(&sse->data, "\n", 1, sse->max);
        sse->data_set = 1;
    } else if (field_is(line, name_len, "event")) {
        err = buf_set(&sse->type, value, value_len, sse->max);
    } else if (field_is(line, name_len, "id")) {
        if (!memchr(value, '\0', value_len))
            err = buf_set(&sse->id, value, value_len, sse->max);
    } else if (field_is(line, name_len, "retry")) {
        int64_t v = 0;
        size_t i;
        for (i = 0; i < value_len && value[i] >= '0' && value[i] <= '9'; i++) {
            if (v > (INT64_MAX - 9) / 10)
                break;
            v = v * 10 + (value[i] - '0');
        }
        if (value_len > 0 && i == value_len)
            sse->retry_ms = v;
    }
    return err;
}

pq_err_t pq_sse_feed(pq_sse_t *sse, const char *buf, size_t len, pq_sse_event_cb cb, void *opaque)
{
    size_t i = 0;
    pq_err_t err = PQ_OK;

    if (sse->failed)
        return sse->failed;
    /* a UTF-8 BOM at the very start of the stream, possibly split across feeds */
    while (!sse->bom_done && i < len) {
        if ((unsigned char)buf[i] != bom[sse->bom_seen]) {
            /* not a BOM: the bytes taken so far were data after all */
            if (sse->bom_seen &&
                (err = buf_add(&sse->line, (const char *)bom, sse->bom_seen, sse->max)) != PQ_OK)
                goto out;
            sse->bom_done = 1;
            break;
        }
        i++;
        if (++sse->bom_seen == sizeof(bom))
            sse->bom_done = 1;
    }
    while (i < len) {
        const char *start = buf + i, *end = start;
        const char *stop = buf + len;

        if (sse->pending_cr) {
            sse->pending_cr = 0;
            if (*start == '\n') {
                i++;
                continue;
            }
        }
        while (end < stop && *end != '\n' && *end != '\r')
            end++;
        if (end == stop) {
            /* no line end yet: keep the partial line */
            err = buf_add(&sse->line, start, (size_t)(end - start), sse->max);
            goto out;
        }
        if (sse->line.len) {
            if ((err = buf_add(&sse->line, start, (size_t)(end - start), sse->max)) != PQ_OK)
                goto out;
            err = process_line(sse, sse->line.p, sse->line.len, cb, opaque);
            sse->line.len = 0;
        } else {
            if ((size_t)(end - start) > sse->max) {
                err = PQ_ERR_TOO_LARGE;
                goto out;
            }
            err = process_line(sse, start, (size_t)(end - start), cb, opaque);
        }
        if (err != PQ_OK)
            goto out;
        sse->pending_cr = *end == '\r';
        i = (size_t)(end - buf) + 1;
    }
out:
    if (err != PQ_OK) {
        /* nothing half-read survives a failure, whatever the split */
        sse->failed = err;
        sse->line.len = 0;
        event_reset(sse);
    }
    return err;
}

int pq_sse_finish(pq_sse_t *sse)
{
    int cut = sse->line.len > 0 || sse->data_set;

    sse->line.len = 0;
    sse->pending_cr = 0;
    event_reset(sse);
    return cut;
}

uint64_t pq_sse_count(const pq_sse_t *sse)
{
    return sse->seq;
}
