/* The loop's reply-channel subscriber (rsub.c). */
#ifndef PQ_BROKER_RSUB_H
#define PQ_BROKER_RSUB_H

#include "broker.h"

/* rsub.c: the loop's subscriber connection */
/* Subscribes to the reply channel: each message goes to message(t, payload, len), each
 * (re)confirmed subscription to confirmed(t). */
int pq_rsub_start(pq_bthread_t *t, void (*message)(pq_bthread_t *t, const char *msg, size_t len),
                  void (*confirmed)(pq_bthread_t *t));
void pq_rsub_stop(pq_bthread_t *t);
/* Drops the subscriber connection and reconnects (not from a hiredis callback). */
void pq_rsub_reset(pq_bthread_t *t);

#endif
