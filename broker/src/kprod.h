/* The loop's Kafka producer (kprod.c). */
#ifndef PQ_BROKER_KPROD_H
#define PQ_BROKER_KPROD_H

#include "broker.h"

/* kprod.c: the thread's producer */
/* Creates the loop's producer; a message's delivery report goes to the member of dr for the
 * topic it was produced to (dr is copied). */
int pq_kprod_start(pq_bthread_t *t, const pq_kprod_dr_t *dr, char *errstr, size_t errstr_size);
/* Flushes for at most timeout_ms, then destroys the producer. */
void pq_kprod_stop(pq_bthread_t *t, int timeout_ms);
/* A producer configuration with the broker's defaults (statistics for up/down, reconnect
 * backoff, message timeout). Returns a new conf or NULL with errstr set. */
rd_kafka_conf_t *pq_kprod_conf(const pq_conf_t *conf, char *errstr, size_t errstr_size);
/* 1 if a statistics JSON shows a broker connection in state UP. */
int pq_kprod_stats_up(const char *json, size_t len);

#endif
