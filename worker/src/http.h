/* Outbound HTTP on a libevent loop: libcurl's multi socket API driven by libevent events and a
 * libevent timer. No threads; thousands of transfers in flight; HTTP/2 where the server speaks
 * it; TLS verification on; easy handles are reused. */
#ifndef PQ_WORKER_HTTP_H
#define PQ_WORKER_HTTP_H

#include <stddef.h>
#include <stdint.h>
#include <event2/event.h>
#include <curl/curl.h>
#include "promptq/conf.h"
#include "promptq/err.h"

typedef struct pq_http_s pq_http_t;
typedef struct pq_http_req_s pq_http_req_t;

/* Which timeout ended a transfer (err PQ_ERR_TIMEOUT). */
typedef enum {
    PQ_HTTP_TIMEOUT_NONE = 0,
    PQ_HTTP_TIMEOUT_CONNECT,    /* no connection in connect_ms */
    PQ_HTTP_TIMEOUT_FIRST_BYTE, /* connected, no byte of the answer in first_byte_ms */
    PQ_HTTP_TIMEOUT_IDLE,       /* the answer started, then nothing for idle_ms */
    PQ_HTTP_TIMEOUT_TOTAL,      /* the whole transfer passed total_ms */
} pq_http_timeout_t;

/* "connect", "first_byte", "idle", "total" ("" for NONE). */
const char *pq_http_timeout_name(pq_http_timeout_t t);

typedef struct pq_http_result_s {
    pq_err_t err;     /* PQ_OK when an HTTP answer arrived; else CONNECT, TIMEOUT,
                         TOO_LARGE (body over the cap), NOMEM, INTERNAL */
    long status;      /* HTTP status, 0 without an answer */
    const char *body; /* borrowed until the callback returns; NUL-terminated */
    size_t body_len;
    /* err may also be the code an on_data callback (pq_http_post_stream) returned to stop */
    int64_t retry_after_ms; /* the wait the answer asks for (rate_hints.h: retry-after-ms,
                               Retry-After, else the x-ratelimit / anthropic-ratelimit reset of
                               the limit used up), -1 when it says nothing */
    const char *detail;     /* libcurl's error text (no URL, no headers), "" if none */
    int64_t elapsed_ms;
    pq_http_timeout_t timeout; /* with err PQ_ERR_TIMEOUT: which one */
    int streamed;              /* pq_http_post_stream: the (2xx) body went to on_data, body is "" */
} pq_http_result_t;

/* Called once per request that was not cancelled, on the loop. */
typedef void(pq_http_done_cb)(void *opaque, const pq_http_result_t *res);

/* max_host_conns: connections per host (0 = unlimited); transfers beyond it wait inside
 * libcurl. Returns NULL with errstr set. base: borrowed. */
pq_http_t *pq_http_new(struct event_base *base, long max_host_conns, char *errstr,
                       size_t errstr_size);

/* The libevent priority of its sockets' and timers' events (the base must have priorities);
 * call before the first request. */
void pq_http_set_priority(pq_http_t *h, int priority);

/* Trusts the CA certificates in ca_file (PEM), instead of the system's, for every URL that
 * starts with url_prefix at a path boundary (the longest such prefix wins). Verification of
 * the peer and its host name stays on. Strings copied. Returns 0, -1 out of memory. */
int pq_http_trust(pq_http_t *h, const char *url_prefix, const char *ca_file);

/* Cancels every transfer (no callbacks) and frees everything. NULL is a no-op. */
void pq_http_destroy(pq_http_t *h);

/* Starts a POST. url: borrowed (copied by libcurl). headers and body: taken (freed when the
 * request ends, also on failure). timeout_ms: whole transfer; max_response: body cap in bytes.
 * Returns a handle valid until the callback runs or pq_http_cancel, or NULL on failure. */
pq_http_req_t *pq_http_post(pq_http_t *h, const char *url, struct curl_slist *headers, char *body,
                            size_t body_len, long timeout_ms, size_t max_response,
                            pq_http_done_cb *cb, void *opaque);

/* Same with each timeout class (to: borrowed for the call; 0 = none for first_byte_ms and
 * idle_ms; total_ms > 0). first_byte_ms counts from the start of the transfer (connecting
 * included) to the first byte of the answer; idle_ms is the longest gap between received
 * parts once the answer started. */
pq_http_req_t *pq_http_post_timed(pq_http_t *h, const char *url, struct curl_slist *headers,
                                  char *body, size_t body_len, const pq_timeouts_t *to,
                                  size_t max_response, pq_http_done_cb *cb, void *opaque);

/* Called on the loop, inside libcurl's processing, with each part of a 2xx answer's body as it
 * arrives (buf: borrowed for the call, len bytes, not NUL-terminated). It must not cancel the
 * request. Returning anything but PQ_OK ends the transfer; the done callback then runs with
 * that code as err. */
typedef pq_err_t(pq_http_data_cb)(void *opaque, const char *buf, size_t len);

/* pq_http_post_timed for a streamed answer: a 2xx body goes to on_data as it arrives (not
 * buffered; the done callback then has streamed 1 and an empty body), any other status is
 * buffered and reported whole as by pq_http_post_timed, so parse_response classifies it.
 * max_response caps the bytes given to on_data too (PQ_ERR_TOO_LARGE beyond). The first-byte
 * and idle timeouts apply as they are. on_data: called with opaque. */
pq_http_req_t *pq_http_post_stream(pq_http_t *h, const char *url, struct curl_slist *headers,
                                   char *body, size_t body_len, const pq_timeouts_t *to,
                                   size_t max_response, pq_http_data_cb *on_data,
                                   pq_http_done_cb *cb, void *opaque);

/* Starts a GET (probes); like pq_http_post without a body. headers: taken. */
pq_http_req_t *pq_http_get(pq_http_t *h, const char *url, struct curl_slist *headers,
                           long timeout_ms, size_t max_response, pq_http_done_cb *cb, void *opaque);

/* Stops a request; its callback will not run. */
void pq_http_cancel(pq_http_t *h, pq_http_req_t *req);

/* Transfers in flight. */
size_t pq_http_active(const pq_http_t *h);

#endif
