/* Small helpers shared by the provider adapters (pure, no I/O). Internal to the worker. */
#ifndef PQ_PROVIDER_COMMON_H
#define PQ_PROVIDER_COMMON_H

#include <stddef.h>
#include <curl/curl.h>
#include <jansson.h>

/* Appends "name: value" to *list. The temporary line (it may hold a key) is wiped. Returns 0,
 * or -1 when out of memory (*list unchanged). */
int pq_provider_header_add(struct curl_slist **list, const char *name, const char *value);

/* Copies an error type or code into buf when it is a word of letters and underscores (at most
 * 64 and shorter than size): such vocabulary ("rate_limit_error", "RESOURCE_EXHAUSTED") cannot
 * be a key, which always has digits or dashes. Anything else leaves buf empty: error bodies may
 * echo keys (G6). */
void pq_provider_safe_token(const json_t *v, char *buf, size_t size);

/* 1 when an optional request field is present with a value that asks for something (not null,
 * false, 0, "" or an empty array/object). */
int pq_provider_field_set(const json_t *v);

/* Percent-encodes s (unreserved characters A-Z a-z 0-9 - . _ ~ kept, the rest %XX): a URL path
 * segment, a query value or an application/x-www-form-urlencoded value. New string (free()),
 * NULL when out of memory. */
char *pq_provider_escape(const char *s);

#endif
