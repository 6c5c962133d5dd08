/* The loop threads (loop.c): start, listen, stop. */
#ifndef PQ_BROKER_LOOP_H
#define PQ_BROKER_LOOP_H

#include "broker.h"

/* loop.c */
int pq_bthread_start(pq_bthread_t *t, char *errstr, size_t errstr_size);
void pq_bthread_free(pq_bthread_t *t);
/* Binds this thread's listener; port 0 binds any port and writes it to *port. */
int pq_bthread_listen(pq_bthread_t *t, int *port, char *errstr, size_t errstr_size);
int pq_bthread_init(pq_bthread_t *t, pq_broker_t *b, int no, char *errstr, size_t errstr_size);
/* Thread-safe: asks the loop to look at stop / next_bc. */
void pq_bthread_poke(pq_bthread_t *t);

#endif
