/* POST /v1/dlq/redrive (redrive.c). */
#ifndef PQ_BROKER_REDRIVE_H
#define PQ_BROKER_REDRIVE_H

#include "broker.h"

/* redrive.c: POST /v1/dlq/redrive. The scan of promptq.dlq runs on the broker's redrive thread
 * (Kafka reads block); the answer comes back to the loop that owns the request. */
void pq_redrive_serve(pq_bthread_t *t, struct evhttp_request *req);
/* Starts the redrive thread with its own consumer, producer and Redis connection (main
 * thread, before the HTTP threads run). Returns 0, or -1 with errstr set. */
int pq_redrive_start(pq_broker_t *b, char *errstr, size_t errstr_size);
/* Stops the redrive thread: queued redrives are answered 503 through their loops, a running
 * scan ends after its delivery reports. Call it while the loops still run (before stopping
 * them) so those answers are served; later redrive requests get 503. NULL-safe, repeatable. */
void pq_redrive_stop(pq_broker_t *b);
/* Frees what pq_redrive_start made (stops first if needed); after the loops are joined. */
void pq_redrive_free(pq_broker_t *b);

#endif
