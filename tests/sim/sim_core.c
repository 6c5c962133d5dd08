/* The answer core shared by every wire format: what the simulated model says to a prompt. */
#include "sim.h"

#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#define ECHO_PREFIX "echo: "

int64_t pq_sim_core_tokens(size_t bytes)
{
    int64_t t = (int64_t)((bytes + 3) / 4);
    return t < 1 ? 1 : t;
}

/* Largest n <= len that does not split a UTF-8 sequence of s. */
static size_t utf8_floor(const char *s, size_t len, size_t n)
{
    if (n >= len)
        return len;
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
        n--;
    return n;
}

int pq_sim_core_answer(const char *prompt, size_t len, int64_t max_tokens, pq_sim_answer_t *out)
{
    size_t plen = sizeof(ECHO_PREFIX) - 1, total = plen + len, keep = total;

    memset(out, 0, sizeof(*out));
    if (max_tokens > 0 && (uint64_t)max_tokens < (uint64_t)SIZE_MAX / 4 &&
        total > (size_t)max_tokens * 4) {
        keep = (size_t)max_tokens * 4;
        out->truncated = 1;
    }
    out->text = malloc(total + 1);
    if (!out->text)
        return -1;
    memcpy(out->text, ECHO_PREFIX, plen);
    if (len)
        memcpy(out->text + plen, prompt, len);
    out->text[total] = '\0';
    if (out->truncated) {
        keep = utf8_floor(out->text, total, keep);
        out->text[keep] = '\0';
    }
    out->len = keep;
    return 0;
}

void pq_sim_core_continue(pq_sim_answer_t *a, const char *prefill, size_t len)
{
    if (!prefill || !len || len > a->len || memcmp(a->text, prefill, len))
        return;
    memmove(a->text, a->text + len, a->len - len + 1);
    a->len -= len;
}

void pq_sim_answer_free(pq_sim_answer_t *a)
{
    if (!a)
        return;
    free(a->text);
    a->text = NULL;
    a->len = 0;
}

int pq_sim_core_text(const json_t *content, char **out, size_t *len)
{
    size_t i, n = 0, off = 0;
    const json_t *part, *text;
    char *buf;

    *out = NULL;
    *len = 0;
    if (json_is_null(content) || !content) {
        n = 0;
    } else if (json_is_string(content)) {
        n = json_string_length(content);
    } else if (json_is_array(content)) {
        json_array_foreach(content, i, part)
        {
            if (!json_is_object(part))
                return -1;
            text = json_object_get(part, "text");
            if (text && !json_is_string(text))
                return -1;
            if (text)
                n += json_string_length(text);
        }
    } else {
        return -1;
    }
    buf = malloc(n + 1);
    if (!buf)
        return -1;
    if (json_is_string(content)) {
        memcpy(buf, json_string_value(content), n);
        off = n;
    } else if (json_is_array(content)) {
        json_array_foreach(content, i, part)
        {
            text = json_object_get(part, "text");
            if (!text)
                continue;
            memcpy(buf + off, json_string_value(text), json_string_length(text));
            off += json_string_length(text);
        }
    }
    buf[off] = '\0';
    *out = buf;
    *len = off;
    return 0;
}

int pq_sim_core_dump(const json_t *doc, struct evbuffer *out)
{
    char stackbuf[8192], *heap;
    size_t n = json_dumpb(doc, stackbuf, sizeof(stackbuf), JSON_COMPACT);
    int rc;

    if (n == 0)
        return -1;
    if (n <= sizeof(stackbuf))
        return evbuffer_add(out, stackbuf, n);
    /* Larger documents: one exact-size heap buffer, still a single evbuffer_add. */
    heap = malloc(n);
    if (!heap)
        return -1;
    rc = json_dumpb(doc, heap, n, JSON_COMPACT) == n ? evbuffer_add(out, heap, n) : -1;
    free(heap);
    return rc;
}

size_t pq_sim_core_piece_end(const char *text, size_t len, size_t off)
{
    while (off < len && text[off] == ' ')
        off++;
    while (off < len && text[off] != ' ')
        off++;
    return off;
}

int pq_sim_wants_stream(const json_t *doc)
{
    return json_is_true(json_object_get(doc, "stream"));
}
