/* /v1/batches (batch.c). */
#ifndef PQ_BROKER_BATCH_H
#define PQ_BROKER_BATCH_H

#include "broker.h"

/* batch.c: /v1/batches */
void pq_batch_serve(pq_bthread_t *t, struct evhttp_request *req, const char *rest);
void pq_batch_delivered(pq_bthread_t *t, const rd_kafka_message_t *m);
int pq_batch_thread_init(pq_bthread_t *t);
void pq_batch_thread_free(pq_bthread_t *t);

#endif
