/* Replies and request checks (http.c). */
#ifndef PQ_BROKER_HTTP_H
#define PQ_BROKER_HTTP_H

#include "slot.h"

/* http.c: replies. Every reply goes through pq_http_reply so it is counted. Errors on the
 * OpenAI-compatible paths (chat, models) also carry "param": null and "code" (= type). */
void pq_http_reply(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, int code,
                   const char *body, size_t len);
/* Starts a chunked reply (headers now, the body in evhttp_send_reply_chunk calls, then
 * evhttp_send_reply_end), counted as pq_http_reply counts. */
void pq_http_reply_start(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, int code);
void pq_http_error(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, int code,
                   const char *type, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* Writes s JSON-escaped (without quotes) into out (size >= 1, always NUL-terminated); truncates at
 * a character boundary. Returns the length written. Shared by the error bodies of http.c and
 * chat.c. */
size_t pq_http_json_escape(char *out, size_t size, const char *s);
/* 503 "job not accepted: <why>; retry" with Retry-After (counted as unavailable). */
void pq_http_unavailable(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                         const char *retry_after, const char *why);
/* Answers s's request with o as compact JSON (500 when it cannot be written); takes o (NULL:
 * out of memory). The slot stays the caller's. */
void pq_http_reply_json(pq_slot_t *s, int code, json_t *o);
/* Authenticates a request. Returns 0 and sets *tenant (borrowed from the config, NULL in open
 * mode), or -1 after answering 401. */
int pq_http_auth(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, const char **tenant);

/* Refuses a request whose head RFC 9112 says to refuse and libevent lets through: a header
 * name with whitespace or another non-token character (also "Name : value"), Content-Length
 * given twice or not plain digits ("+5"), HTTP/1.1 without exactly one Host, and a NUL byte in
 * the request line or a header (libevent cuts the value there: an Idempotency-Key "a\0b" would
 * be "a"). Returns 0, or -1 after answering 400 (JSON error naming what is wrong) with
 * Connection: close, since the bytes after a head like that cannot be trusted to start the
 * next request. Called once per request, before any handler. */
int pq_http_check_head(pq_bthread_t *t, struct evhttp_request *req);

/* 405 with Allow. */
void pq_http_method_not_allowed(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                                const char *allow);

#endif
