/* The job envelope (DESIGN.md §3): parse, validate, serialise; job ids.
 * Parsers here are pure: (buf, len) in, result out, no I/O. */
#ifndef PROMPTQ_ENVELOPE_H
#define PROMPTQ_ENVELOPE_H

#include <stddef.h>
#include <stdint.h>
#include <jansson.h>
#include "promptq/err.h"
#include "promptq/hash.h"

#define PQ_ID_MAX     128
#define PQ_TENANT_MAX 64
/* The one definition of a valid tenant, for messages; pq_tenant_valid checks it. The envelope
 * parser and the config loader (broker.api_keys values, broker.admin_tenants) both use it, so a
 * tenant the broker accepts a key for is one the worker accepts in an envelope. */
#define PQ_TENANT_PATTERN "[A-Za-z0-9._-]{1,64}"

/* Caps applied while parsing; a value over a cap is PQ_ERR_TOO_LARGE. 0 means no cap. */
typedef struct pq_envelope_limits_s {
    size_t max_bytes;        /* whole document */
    size_t max_prompt_bytes; /* sum of message content lengths in bytes (string contents and
                                content parts' "text") */
    size_t max_messages;     /* entries in request.messages */
    /* reply_to must start with this (promptq's own reply channels, "<redis prefix>reply:"),
     * so an envelope cannot make a worker publish to any Redis channel; NULL: any.
     * Borrowed: must outlive the limits' use. */
    const char *reply_prefix;
} pq_envelope_limits_t;

/* Defaults: 1 MiB document, 1 MiB prompt, 2048 messages. */
extern const pq_envelope_limits_t pq_envelope_limits_default;

typedef struct pq_envelope_s {
    json_t *root; /* owned; the normalised envelope (a bare chat body is wrapped as "request") */
    /* The fields below are borrowed from root and valid until the next change of root. */
    const char *id;      /* NULL when the producer gave none */
    const char *tenant;  /* "default" when absent */
    json_t *request;     /* the OpenAI chat-completions body */
    const char *model;   /* request.model: the route name */
    json_t *metadata;    /* NULL when absent */
    int64_t deadline_ms; /* 0 = none */
    int cache;           /* -1 unset, 0 false, 1 true */
    const char *callback_url;
    const char *reply_to;
    json_t *park;                             /* "park" object of a parked job, or NULL */
    char request_hash[PQ_SHA256_HEX_LEN + 1]; /* pq_request_hash(request) */
} pq_envelope_t;

/* Parses and validates an envelope (or a bare chat-completions body). Checks: a JSON object
 * without duplicate keys; id, if present, matches [A-Za-z0-9._:-]{1,128} and is not "." or
 * ".."; tenant
 * [A-Za-z0-9._-]{1,64}; request an object with a non-empty string model and a non-empty messages
 * array of objects, each with a string role and a content (a string, an array of content part
 * objects with a string "type", or null; it may be absent when the message has tool_calls or
 * function_call); deadline an RFC 3339 time; cache a boolean; metadata, park and error objects;
 * callback_url http(s); reply_to 1..256 bytes; caps. Other top-level keys are refused
 * ("unknown field \"x\""). A document without "request" but with "model" or "messages" is a
 * bare chat body and is wrapped as {"request": body}. limits: NULL for the defaults.
 * On success fills out (call pq_envelope_clear after) and returns PQ_OK; otherwise returns
 * PQ_ERR_INVALID or PQ_ERR_TOO_LARGE with a message naming the field in errstr (e.g.
 * "request.messages[2].role: must be a string", "... over the limit of N (max_prompt_bytes)"),
 * and out is left cleared. buf: borrowed, need not be NUL-terminated. */
pq_err_t pq_envelope_parse(const char *buf, size_t len, const pq_envelope_limits_t *limits,
                           pq_envelope_t *out, char *errstr, size_t errstr_size);

/* A fixed description of a jansson parse error ("invalid token", "premature end of input",
 * "duplicate object key", ...) without the input bytes jansson quotes in jerr->text, for error
 * texts built from untrusted input (G6: a prompt fragment never reaches a log or a dlq error).
 * Returns a static string. */
const char *pq_json_error_what(const json_error_t *jerr);

/* Frees root and zeroes the struct. Safe on a cleared envelope. */
void pq_envelope_clear(pq_envelope_t *env);

/* Sets "id" (copied) and refreshes the borrowed pointers. Returns 0, -1 if id is invalid. */
int pq_envelope_set_id(pq_envelope_t *env, const char *id);

/* Sets "reply_to" (copied). Returns 0 or -1. */
int pq_envelope_set_reply_to(pq_envelope_t *env, const char *reply_to);

/* Sets "tenant" (copied; e.g. the tenant of the caller's API key) and refreshes the borrowed
 * pointers. Returns 0, -1 if tenant is invalid. */
int pq_envelope_set_tenant(pq_envelope_t *env, const char *tenant);

/* Sets the top-level object "park" or "error" (value taken, also on failure), or removes it
 * when value is NULL (e.g. a DLQ redrive drops "error"); refreshes the borrowed pointers.
 * Returns 0, -1 for another key or a value that is not an object. */
int pq_envelope_set_object(pq_envelope_t *env, const char *key, json_t *value);

/* Compact one-line JSON of the envelope (key order kept, control characters escaped); new
 * string (free()), NULL on failure. len: NULL or receives strlen. */
char *pq_envelope_dump(const pq_envelope_t *env, size_t *len);

/* 1 if id matches [A-Za-z0-9._:-]{1,128} and is not "." or "..". */
int pq_id_valid(const char *id);

/* 1 if tenant matches PQ_TENANT_PATTERN, [A-Za-z0-9._-]{1,64}. */
int pq_tenant_valid(const char *tenant);

/* Writes "job_" + 26 Crockford base32 characters of a time-sortable unique id (48-bit ms time,
 * 80 random bits, monotonic within a process) and a NUL: 31 bytes. Thread-safe. */
#define PQ_JOB_ID_LEN 30
void pq_id_generate(char out[PQ_JOB_ID_LEN + 1]);

/* The id of a job produced without one: "kafka-" + the first 24 lowercase hex digits of
 * SHA-256("clusterid/topic/partition/offset/timestamp_ms"). 31 bytes with the NUL. */
#define PQ_KAFKA_ID_LEN 30
void pq_id_derive_kafka(const char *cluster_id, const char *topic, int32_t partition,
                        int64_t offset, int64_t timestamp_ms, char out[PQ_KAFKA_ID_LEN + 1]);

#endif
