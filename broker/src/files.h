/* /v1/files (files.c). */
#ifndef PQ_BROKER_FILES_H
#define PQ_BROKER_FILES_H

#include "broker.h"

/* files.c: /v1/files */
void pq_files_serve(pq_bthread_t *t, struct evhttp_request *req, const char *rest);
/* Stores a file (fields id, object..., body) for tenant: HSET + ZADD, no reply wanted. Returns
 * 0 if sent. */
int pq_files_store(pq_bthread_t *t, const char *tenant, const char *id, const char *filename,
                   const char *purpose, const char *body, size_t len, int64_t lines);
void pq_files_new_id(char *out, size_t size);

#endif
