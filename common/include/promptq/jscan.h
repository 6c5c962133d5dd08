/* A strict JSON scanner that builds nothing: it checks a text once and then walks it in place,
 * so a hot path can look at a few members of a large document (a provider's answer, a stored
 * result) and pass the document's own bytes on without parsing it into a tree and serialising
 * it again.
 *
 * What it accepts is what jansson's json_loadb(JSON_ALLOW_NUL) accepts, never more: RFC 8259
 * values with whitespace around them, strings of valid UTF-8 (no overlong forms, surrogates or
 * code points above U+10FFFF) without raw control characters, escapes with \u surrogates in
 * pairs, integers that fit int64_t and reals that do not overflow a double. It may refuse a
 * little more: raw NUL bytes (jansson 2.14 skips one between tokens, the end mark of its read
 * buffer), object keys holding \u0000, reals written in more than 320 characters, and
 * nesting deeper than the caller's limit (jansson's own is 2048). At the top level it takes any
 * value, as jansson does with JSON_DECODE_ANY. A text
 * pq_js_check accepts therefore loads in jansson, and reads there as the scanner walks it
 * (except that jansson keeps the last of two members with one name: pq_js_unique_names tells
 * whether an object has any).
 *
 * Spans point into the caller's buffer, which must outlive them. Pure: no allocation, no I/O. */
#ifndef PROMPTQ_JSCAN_H
#define PROMPTQ_JSCAN_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    PQ_JS_NONE = 0,
    PQ_JS_OBJECT,
    PQ_JS_ARRAY,
    PQ_JS_STRING,
    PQ_JS_INTEGER, /* a number without fraction or exponent */
    PQ_JS_REAL,
    PQ_JS_TRUE,
    PQ_JS_FALSE,
    PQ_JS_NULL
} pq_js_type_t;

/* One value of a checked text: its bytes (a string's with its quotes) and its type. */
typedef struct pq_js_s {
    const char *p;
    size_t n;
    pq_js_type_t type;
} pq_js_t;

/* The members of an object or the elements of an array, in order. */
typedef struct pq_js_iter_s {
    const char *p, *end;
} pq_js_iter_t;

/* Checks that buf[0..len) is one JSON value with only whitespace around it, nested at most
 * max_depth deep (objects and arrays; 0 allows scalars only). Returns 0 and the value in *root,
 * or -1 (*root type PQ_JS_NONE) with the byte offset of the first fault in *fault_at when it is
 * not NULL. */
int pq_js_check(const char *buf, size_t len, int max_depth, pq_js_t *root, size_t *fault_at);

/* Starts an iteration over v's members (an object) or elements (an array). */
void pq_js_iter(const pq_js_t *v, pq_js_iter_t *it);

/* The next member: its name (a PQ_JS_STRING span, quotes included) and value. Returns 1, or 0
 * at the end. */
int pq_js_next_member(pq_js_iter_t *it, pq_js_t *name, pq_js_t *value);

/* The next element. Returns 1, or 0 at the end. */
int pq_js_next_elem(pq_js_iter_t *it, pq_js_t *value);

/* The first member of object obj whose name is written exactly name (bytes between the quotes
 * compared as they are: a name spelled with escapes does not match). Returns 1 and *out, or 0
 * (*out type PQ_JS_NONE) when obj has none or is no object. */
int pq_js_get(const pq_js_t *obj, const char *name, pq_js_t *out);

/* 1 when no two members of object obj have the same name and no name holds an escape (so
 * names compare as written, and every reader sees each member once); 0 otherwise, also when
 * obj has more than max_members members (at most 256; the names are compared pairwise). */
int pq_js_unique_names(const pq_js_t *obj, size_t max_members);

/* 1 when v is a string written exactly s between its quotes (no escapes in v). */
int pq_js_str_is(const pq_js_t *v, const char *s);

/* 1 when v is a string without escapes: its text is then v->p + 1, v->n - 2 bytes. */
int pq_js_str_plain(const pq_js_t *v);

/* An integer's value. Returns 0, or -1 when v is no integer. */
int pq_js_int(const pq_js_t *v, int64_t *out);

/* The length of the UTF-8 character of 2 to 4 bytes at p (p < end, p[0] >= 0x80) as jansson
 * takes it, or 0 when it is not one (overlong, a surrogate, above U+10FFFF, cut short). */
size_t pq_js_utf8_len(const unsigned char *p, const unsigned char *end);

#endif
