/* What the OpenAI-shaped endpoints share (api.c). */
#ifndef PQ_BROKER_API_H
#define PQ_BROKER_API_H

#include "slot.h"

/* api.c: what the OpenAI-shaped endpoints share */
/* Tenant of a request: the API key's, or in open mode ?tenant= (default "default"). Returns 0,
 * or -1 after answering. */
int pq_api_tenant(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, char *out,
                  size_t size);
/* 503 "store (Redis) unavailable" with Retry-After: 1, for the files and batches paths. */
void pq_api_unavailable(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path);
/* Slot ops of the files, batches, list and ops requests: a timeout in PQ_SLOT_API is
 * pq_api_timeout. */
extern const pq_slot_ops_t pq_api_ops;
/* 503 for a slot in PQ_SLOT_API whose Redis reply did not come. */
void pq_api_timeout(pq_slot_t *s);
/* Starts a list request: takes a slot (s->ctx = limit) and sends the list script for set skey
 * (members' hashes prefixed pfx), newest first after `after` ("" from the top), limit + 1
 * entries with up to 9 named fields each (nfields 0: every field); the reply goes to fn(s,
 * reply). Answers 503 itself when no slot is free or Redis is down. */
void pq_api_list(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                 void (*fn)(pq_slot_t *, const void *), const char *skey, const char *pfx,
                 const char *after, long limit, int nfields, const char **fields);
/* The id of a files or batches path, rest "/{id}" or "/{id}{sub}": copies it into id
 * (PQ_ID_MAX + 1 bytes; max_len <= PQ_ID_MAX) and returns 0 (no sub path) or 1 (sub). Returns
 * -1 after answering 404 for another sub path, an id longer than max_len or one ok rejects;
 * object names the kind in the message ("No such Batch object"). */
int pq_api_path_id(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, const char *rest,
                   const char *sub, size_t max_len, int (*ok)(const char *), const char *object,
                   char *id);
/* The limit and after query parameters of a list request: returns limit (dflt when absent) or
 * -1 when it is not 1 to max; after is set to the after parameter if after_ok accepts it, else
 * "". */
long pq_api_query_limit(struct evhttp_request *req, char *after, size_t after_size, long dflt,
                        long max, int (*after_ok)(const char *));
/* Sends a command for slot s in PQ_SLOT_API; the reply goes to the slot's step handler
 * fn(s, reply). Arms the Redis timer. Returns 0 or -1 (nothing sent). */
int pq_api_send(pq_slot_t *s, void (*fn)(pq_slot_t *, const void *), int argc, const char **argv,
                const size_t *argvlen);
/* pq_api_send for NUL-terminated arguments (at most 16). */
int pq_api_sendv(pq_slot_t *s, void (*fn)(pq_slot_t *, const void *), int argc, const char **argv);

#endif
