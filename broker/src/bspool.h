/* The broker's side of the local spool (bspool.c). */
#ifndef PQ_BROKER_BSPOOL_H
#define PQ_BROKER_BSPOOL_H

#include "slot.h"

/* bspool.c: the broker's side of the spool */
/* Opens the spool (conf->spool_dir; fails if another process holds it). Returns 0, or -1 with
 * errstr set. */
int pq_bspool_open(pq_broker_t *b, char *errstr, size_t errstr_size);
/* Starts the drainer thread (after the loops are initialised, before they run). */
int pq_bspool_start(pq_broker_t *b, char *errstr, size_t errstr_size);
/* Stops the drainer (what it holds goes back to the spool), then closes the spool. Every
 * pending callback has run when this returns. NULL-safe on a broker without a spool. */
void pq_bspool_close(pq_broker_t *b);
/* Per-loop completion queue: set up before the loop runs, freed after pq_bspool_close. */
int pq_bspool_thread_init(pq_bthread_t *t);
void pq_bspool_thread_free(pq_bthread_t *t);
/* Hands the slot's payload to the spool (slot state becomes PQ_SLOT_SPOOLING on PQ_OK; the
 * answer comes through done(s, err) on the slot's loop). Returns PQ_OK, PQ_ERR_UNAVAILABLE (full or
 * closing), PQ_ERR_TOO_LARGE or another error; on error the slot is untouched. */
pq_err_t pq_bspool_append(pq_slot_t *s, void (*done)(pq_slot_t *s, pq_err_t err));
/* 1 if the spool has no room for more jobs (readiness). */
int pq_bspool_full(pq_broker_t *b);
/* 1 if any producer of the process (a loop's or the drainer's) reaches Kafka. */
int pq_bspool_kafka_up(pq_broker_t *b);
/* 1 if Kafka is known to be unreachable for this loop: its jobs are spooled at once. */
int pq_bspool_kafka_down(pq_bthread_t *t);
/* Recomputes the process-wide Kafka state and logs a change (any thread). */
void pq_bspool_kafka_changed(pq_broker_t *b);
/* Refreshes the spool gauges and counters before /metrics is rendered. */
void pq_bspool_metrics(pq_broker_t *b);

/* bspool.c: appends a record for a caller that is not a slot; fn(arg, err) runs on t's loop. */
pq_err_t pq_bspool_append_fn(pq_bthread_t *t, const char *topic, const char *key,
                             const void *payload, size_t len, void (*fn)(void *, pq_err_t),
                             void *arg);

#endif
