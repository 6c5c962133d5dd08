/* Server-Sent Events decoder (WHATWG HTML "event stream interpretation"), byte level and
 * incremental: bytes go in split anywhere, whole events come out through a callback.
 *
 * Lines end with LF, CRLF or CR (a CR at the end of one chunk and an LF at the start of the next
 * are one line end). A leading UTF-8 BOM is skipped. Fields: "data" (values joined with LF),
 * "event" (the type, "message" when none), "id" (the last event id; kept across events, ignored
 * when it holds a NUL), "retry" (ASCII digits only); a line starting with ':' is a comment
 * (keep-alive) and ignored, as are unknown fields. One space after the colon is dropped. A blank
 * line dispatches the event, unless its data buffer is empty (then only the type is reset). An
 * event not ended by a blank line when the stream ends is discarded (per the spec).
 *
 * Pure: no I/O, no logging, no globals. Every buffer is capped (STYLE item 7). */
#ifndef PQ_STREAM_SSE_H
#define PQ_STREAM_SSE_H

#include <stddef.h>
#include <stdint.h>

#include "promptq/err.h"

typedef struct pq_sse_s pq_sse_t;

/* One dispatched event. Every pointer is borrowed from the decoder and valid only during the
 * callback; the strings are NUL-terminated as well as counted (data may hold NUL bytes: use
 * data_len). */
typedef struct {
    const char *type; /* "message" when the event named none */
    size_t type_len;
    const char *data; /* the data lines joined with LF, without the final LF */
    size_t data_len;
    const char *id; /* the last event id so far, "" when none */
    size_t id_len;
    int64_t retry_ms; /* the last "retry" value so far, -1 when none */
    uint64_t seq;     /* 1 for the first event dispatched, 2 for the next, ... */
} pq_sse_event_t;

/* Called once per dispatched event. ev: borrowed. opaque: the caller's pointer. Returning
 * anything but PQ_OK stops the decoder: pq_sse_feed returns that code, now and on every later
 * call. */
typedef pq_err_t (*pq_sse_event_cb)(const pq_sse_event_t *ev, void *opaque);

/* Default cap on a pending line and on a pending event's data (bytes). */
#define PQ_SSE_DEFAULT_MAX (1u << 20)

/* A new decoder (free with pq_sse_destroy). max_bytes caps both the line being read and the
 * data of the event being built (0: PQ_SSE_DEFAULT_MAX); over it pq_sse_feed fails with
 * PQ_ERR_TOO_LARGE. Returns NULL when out of memory. */
pq_sse_t *pq_sse_new(size_t max_bytes);

/* Frees the decoder. NULL is a no-op. */
void pq_sse_destroy(pq_sse_t *sse);

/* Feeds len bytes (buf: borrowed; any split, not NUL-terminated), calling cb for every event
 * they complete. Returns PQ_OK; PQ_ERR_TOO_LARGE (a line or an event's data over the cap); or
 * the callback's code. Errors are sticky: once failed, every later call returns the same code
 * without reading. */
pq_err_t pq_sse_feed(pq_sse_t *sse, const char *buf, size_t len, pq_sse_event_cb cb, void *opaque);

/* The end of the stream: a last line without its line end and an event not yet dispatched by a
 * blank line are discarded (per the spec). Returns 1 when something was discarded (the stream
 * was cut inside an event), else 0. The decoder may then be fed again as a new stream (the last
 * event id, the retry value and the event count are kept; a failed decoder stays failed). */
int pq_sse_finish(pq_sse_t *sse);

/* Events dispatched so far. */
uint64_t pq_sse_count(const pq_sse_t *sse);

#endif
