/* promptq-worker: consumes job envelopes from the request topics, leases each job in Redis,
 * calls its route's provider and writes the terminal record (DESIGN.md §2 G2, G3, G5; §8).
 * One libevent loop drives the Kafka consumer and producer queues, libcurl, hiredis and timers. */
#ifndef PQ_WORKER_H
#define PQ_WORKER_H

#include <stddef.h>
#include "promptq/conf.h"

typedef struct pq_worker_s pq_worker_t;

/* Creates the worker: Kafka consumer (subscribed) and producer, Redis connection, HTTP client.
 * conf: borrowed, must outlive the worker. Returns NULL with errstr set. */
pq_worker_t *pq_worker_new(const pq_conf_t *conf, char *errstr, size_t errstr_size);

/* Runs the loop until SIGTERM or SIGINT: then stops taking work, gives jobs in flight a grace
 * period (grace_ms) to finish, hands the rest back (leases released, offsets not stored),
 * commits stored offsets and closes the consumer. Returns 0 on a clean stop. */
int pq_worker_run(pq_worker_t *w, int grace_ms);

/* Frees everything. NULL is a no-op. */
void pq_worker_destroy(pq_worker_t *w);

#endif
