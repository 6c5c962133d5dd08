/* libFuzzer target for the strict JSON scanner (common/src/jscan.c), differential against
 * jansson: whatever the scanner accepts jansson must load (JSON_ALLOW_NUL | JSON_DECODE_ANY),
 * and walking it must find what jansson built: the same types, the same integers, the same
 * plain strings, the same members of objects whose names are unique. The scanner may refuse
 * more only where jscan.h says so (reals over 320 characters) and where jansson is lenient
 * (raw NUL bytes). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <jansson.h>

#include "promptq/jscan.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void same(const pq_js_t *v, const json_t *j, int depth)
{
    pq_js_iter_t it;
    pq_js_t k, e;
    int64_t n;
    size_t i = 0;

    switch (v->type) {
    case PQ_JS_OBJECT:
        if (!json_is_object(j))
            abort();
        if (!pq_js_unique_names(v, 1u << 30))
            return; /* jansson kept the last of a name; nothing to line up */
        pq_js_iter(v, &it);
        while (pq_js_next_member(&it, &k, &e)) {
            const json_t *m = json_object_getn(j, k.p + 1, k.n - 2);
            if (!m)
                abort();
            same(&e, m, depth + 1);
            i++;
        }
        if (i != json_object_size(j))
            abort();
        break;
    case PQ_JS_ARRAY:
        if (!json_is_array(j))
            abort();
        pq_js_iter(v, &it);
        while (pq_js_next_elem(&it, &e))
            same(&e, json_array_get(j, i++), depth + 1);
        if (i != json_array_size(j))
            abort();
        break;
    case PQ_JS_STRING:
        if (!json_is_string(j))
            abort();
        if (pq_js_str_plain(v) && (json_string_length(j) != v->n - 2 ||
                                   memcmp(json_string_value(j), v->p + 1, v->n - 2) != 0))
            abort();
        break;
    case PQ_JS_INTEGER:
        if (!json_is_integer(j) || pq_js_int(v, &n) != 0 || n != json_integer_value(j))
            abort();
        break;
    case PQ_JS_REAL:
        if (!json_is_real(j))
            abort();
        break;
    case PQ_JS_TRUE:
        if (!json_is_true(j))
            abort();
        break;
    case PQ_JS_FALSE:
        if (!json_is_false(j))
            abort();
        break;
    case PQ_JS_NULL:
        if (!json_is_null(j))
            abort();
        break;
    default:
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data;
    json_t *j = json_loadb(s, size, JSON_ALLOW_NUL | JSON_DECODE_ANY, NULL);
    pq_js_t v;
    size_t at = 0;
    int ok = pq_js_check(s, size, 2048, &v, &at) == 0;

    if (ok && !j)
        abort(); /* the scanner took what jansson refuses */
    /* refused what jansson reads, and not for a long real or a raw NUL byte (jansson 2.14 drops
     * a NUL between tokens: it marks the end of its read buffer, so "[1\0]" loads) */
    if (!ok && j && size <= 320 && !memchr(data, 0, size))
        abort();
    if (!ok && at > size)
        abort();
    if (ok) {
        if (v.p < s || v.p + v.n > s + size)
            abort();
        same(&v, j, 0);
    }
    json_decref(j);
    return 0;
}
