/* SHA-256 and HMAC-SHA256 as lowercase hex, and the canonical request hash. */
#ifndef PROMPTQ_HASH_H
#define PROMPTQ_HASH_H

#include <stddef.h>
#include <jansson.h>

#define PQ_SHA256_HEX_LEN 64

/* out receives 64 hex digits and a NUL. */
void pq_sha256_hex(const void *data, size_t len, char out[PQ_SHA256_HEX_LEN + 1]);

/* HMAC-SHA256(key, msg) as hex (callback signatures). */
void pq_hmac_sha256_hex(const void *key, size_t keylen, const void *msg, size_t msglen,
                        char out[PQ_SHA256_HEX_LEN + 1]);

/* HMAC-SHA256(key, head || msg) as hex, without joining the two (a callback body is signed with
 * its "<t>." prefix). */
void pq_hmac_sha256_hex2(const void *key, size_t keylen, const void *head, size_t headlen,
                         const void *msg, size_t msglen, char out[PQ_SHA256_HEX_LEN + 1]);

/* Hash of the canonical form of a request object: compact JSON with keys sorted at every level,
 * so key order and whitespace do not change it. Returns 0, or -1 if it cannot be serialised.
 * request: borrowed. */
int pq_request_hash(const json_t *request, char out[PQ_SHA256_HEX_LEN + 1]);

/* The response cache's hash of request: pq_request_hash without "stream" and "stream_options"
 * (they change how the answer is delivered, not the answer), so a streamed and a plain call
 * share cached answers. request_hash: the request's pq_request_hash, returned as it is when
 * neither member is there. 0, or -1 (out of memory). */
int pq_request_cache_hash(const json_t *request, const char *request_hash,
                          char out[PQ_SHA256_HEX_LEN + 1]);

#endif
