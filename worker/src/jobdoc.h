/* Job documents: the records a job writes (result, dlq, its small stand-in, invalid-job dlq,
 * cache entry), built from plain inputs. Pure functions: no worker state, no I/O, no clock (the
 * caller passes the time), so they are unit-tested directly (tests/unit/test_jobdoc.c).
 * The envelope -> provider request direction is the provider table's build_request
 * (providers/provider.h), pure as well. */
#ifndef PQ_JOBDOC_H
#define PQ_JOBDOC_H

#include <stddef.h>
#include <stdint.h>
#include <jansson.h>
#include "promptq/envelope.h"
#include "promptq/err.h"

/* What a job's records are made of. Every pointer is borrowed (NULL allowed unless noted). */
typedef struct pq_jobdoc_s {
    const pq_envelope_t *env; /* not NULL; env->root NULL for an unreadable (invalid) job */
    const char *status;       /* "succeeded", "failed", "expired", ... */
    const char *provider;     /* the target that answered (or failed) last */
    const char *model;
    int attempts;
    json_t *alog;     /* attempt log */
    int slim;         /* without attempt log and metadata (the full record is too large) */
    json_t *cached;   /* the cache entry that answered: {"provider","model","response"} */
    json_t *response; /* the provider's completion; NULL: the record carries "error" */
    /* response's JSON text, spliced into the records as it is (the provider's own bytes when
     * it sent them unchanged); NULL: response is serialised */
    const char *response_text;
    size_t response_len;
    pq_err_t err;
    const char *errmsg;                    /* NULL or "": pq_err2str(err) */
    long http_status;                      /* <= 0: none */
    const char *fault_code, *fault_reason; /* the provider's code and reason; NULL or "": none */
    int64_t created_ms;
    int64_t now_ms;
    const char *src_topic; /* not NULL */
    int32_t partition;
    int64_t offset;
} pq_jobdoc_t;

/* The id and tenant a record names: "-" and "default" when the envelope has none. */
const char *pq_jobdoc_id(const pq_jobdoc_t *d);
const char *pq_jobdoc_tenant(const pq_jobdoc_t *d);

/* The provider and model of the result: "cache" and the cached answer's model for a cache hit,
 * else the last target's. Borrowed from d, NULL when there is none. */
const char *pq_jobdoc_result_provider(const pq_jobdoc_t *d);
const char *pq_jobdoc_result_model(const pq_jobdoc_t *d);

/* The "error" object {type, message, provider, status[, code][, reason]}. New reference. */
json_t *pq_jobdoc_error(const pq_jobdoc_t *d);

/* The result record of DESIGN.md §3, plus "attempt_log" (unless slim) and, for a cache hit,
 * "cached_from" {provider, model}. New string (free()), NULL on failure; *len its length. */
char *pq_jobdoc_result(const pq_jobdoc_t *d, size_t *len);

/* The stand-in for a dlq record too large for Kafka: id, tenant, model, the error and
 * "truncated": true. New string (free()), NULL on failure. */
char *pq_jobdoc_dlq_small(const pq_jobdoc_t *d, size_t *len);

/* The envelope + "error" (taken, also on failure) for the dlq; its small stand-in when that is
 * over max_msg (then *small = 1, else untouched). New string (free()); NULL (and *len 0) when
 * the envelope has no document or on failure. */
char *pq_jobdoc_dlq(const pq_jobdoc_t *d, json_t *error, size_t max_msg, int *small, size_t *len);

/* The dlq record of a message that is no job: its JSON object (or {"raw": the bytes as a
 * string, invalid bytes as '?'}) + "error" {"type": "invalid", "message": why}. buf: borrowed,
 * need not be NUL-terminated. New string (free()), NULL on failure. */
char *pq_jobdoc_invalid(const char *buf, size_t len, const char *why, size_t *out_len);

/* A JSON string of bytes that may not be UTF-8: NUL and bytes >= 0x80 become '?' when the
 * bytes are not valid UTF-8. New reference (an empty string when out of memory). */
json_t *pq_jobdoc_raw_string(const char *buf, size_t len);

/* A cache entry {"provider","model","response"}, response being the JSON text of the answer
 * (spliced in as it is). New string (free()), NULL on failure. */
char *pq_jobdoc_cache_entry(const char *provider, const char *model, const char *response,
                            size_t response_len, size_t *len);

/* Reads a cache entry: the document when it is an object with an object "response" and string
 * "provider" and "model", else NULL. New reference. buf: borrowed. */
json_t *pq_jobdoc_cache_parse(const char *buf, size_t len);

/* parked_at of a park object (ms since the epoch), 0 when absent or unreadable. */
int64_t pq_jobdoc_park_since(const json_t *park);

/* Whether a parked job of tenant, parked at parked_at (wall ms; 0 unknown), was dropped by an
 * operator. opaque: the caller's. */
typedef int pq_jobdoc_dropped_fn(const char *tenant, int64_t parked_at, void *opaque);

/* A parked job read from a retry topic (buf: its envelope, borrowed, need not be
 * NUL-terminated): its expiry time (wall ms), the earlier of its deadline and parked_at +
 * park_ttl_ms, INT64_MAX when it has neither; 0 when buf is not a JSON object. *dropped:
 * dropped_fn's answer for its tenant ("default" when it has none) and parked_at; 0 when
 * dropped_fn is NULL or buf is not an object. */
int64_t pq_jobdoc_parked_expiry(const char *buf, size_t len, int64_t park_ttl_ms,
                                pq_jobdoc_dropped_fn *dropped_fn, void *opaque, int *dropped);

/* Compact JSON of o; new string (free()), NULL when o is NULL or on failure; *len its length. */
char *pq_jobdoc_dump(const json_t *o, size_t *len);

#endif
