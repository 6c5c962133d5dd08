/* A JSON writer into one growing buffer, for records written on a hot path: members go out as
 * they are known, a JSON text already at hand (a provider's answer) goes in as it is, and a
 * jansson value is dumped straight into the buffer. No tree is built for the record itself.
 *
 * Any failure (out of memory) sticks: the writer keeps going as a no-op and pq_jw_finish gives
 * NULL. The caller writes a well-formed sequence (keys inside objects, one value each). */
#ifndef PROMPTQ_JWRITE_H
#define PROMPTQ_JWRITE_H

#include <stddef.h>
#include <stdint.h>
#include <jansson.h>

typedef struct pq_jw_s {
    char *buf;
    size_t len, cap;
    int failed;
} pq_jw_t;

/* Starts an empty writer with room for about cap bytes (0: a default). */
void pq_jw_init(pq_jw_t *w, size_t cap);

/* Bytes as they are (a JSON text, punctuation). */
void pq_jw_raw(pq_jw_t *w, const char *s, size_t n);

/* A member name: writes ',' first unless it opens the object. name needs no escaping (the
 * caller's own literal). */
void pq_jw_key(pq_jw_t *w, const char *name);

/* A JSON string of s (n bytes; pq_jw_str: up to its NUL), or null when s is NULL. Quote,
 * backslash and control characters are escaped; a byte that does not start a valid UTF-8
 * character becomes '?', so the text is always valid (jansson would refuse the string). */
void pq_jw_strn(pq_jw_t *w, const char *s, size_t n);
void pq_jw_str(pq_jw_t *w, const char *s);

void pq_jw_int(pq_jw_t *w, int64_t v);

/* v dumped compact (JSON_COMPACT; JSON_ENCODE_ANY), or null when v is NULL. */
void pq_jw_json(pq_jw_t *w, const json_t *v);

/* The text (NUL-terminated; the caller frees it) and its length, or NULL when anything failed
 * (the buffer is then freed). The writer is empty afterwards. */
char *pq_jw_finish(pq_jw_t *w, size_t *len);

#endif
