/* Producing records to Kafka (results, dlq, retry topics): used by jobs, set up by worker.c. */
#ifndef PQ_PRODUCE_H
#define PQ_PRODUCE_H

#include "worker_int.h"

/* Produces value to topic (PQ_T_RESULTS / PQ_T_DLQ) with key; msg_opaque comes back in the
 * delivery report. value: borrowed, must stay valid until the report. Returns 0 or the error. */
rd_kafka_resp_err_t pq_worker_produce(pq_worker_t *w, int topic, const char *key, const char *value,
                                      size_t len, void *msg_opaque);

/* Same as pq_worker_produce, to a topic by name (retry topics). */
rd_kafka_resp_err_t pq_worker_produce_to(pq_worker_t *w, const char *topic, const char *key,
                                         const char *value, size_t len, void *msg_opaque);

#endif
