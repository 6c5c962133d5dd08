/* Partitions and backlogs: the bookkeeping the consumer, parking and jobs share (lookups, the
 * backlog ring, offsets done). Lowest of the worker's modules: it calls none of them. */
#ifndef PQ_PARTS_H
#define PQ_PARTS_H

#include "worker_int.h"

/* The route whose retry topic is name, or NULL. Borrowed. */
pq_route_state_t *pq_parts_route_by_topic(const pq_worker_t *w, const char *name);

/* PQ_T_REQUESTS, PQ_T_BULK, PQ_T_RETRY (*rs set) or -1. */
int pq_parts_topic_index(const pq_worker_t *w, const char *name, pq_route_state_t **rs);

/* The assigned partition, or NULL. Borrowed. */
pq_part_t *pq_parts_find(pq_worker_t *w, int topic, pq_route_state_t *rs, int32_t partition);

/* Drops one reference; frees the partition at zero. NULL is a no-op. */
void pq_part_unref(pq_part_t *part);

/* The job at (part, seq) is done (its results are durable): store offsets up to the lowest job
 * still in flight (on the loop, ev_flush). part may be NULL. */
void pq_worker_offset_done(pq_worker_t *w, pq_part_t *part, uint64_t seq);

/* Appends m (taken). Returns 0, -1 when out of memory (m is still the caller's). */
int pq_backlog_push(pq_backlog_t *b, rd_kafka_message_t *m);

/* The oldest message (the caller's now), NULL when empty. */
rd_kafka_message_t *pq_backlog_pop(pq_backlog_t *b);

/* 1 when b holds max messages or max_bytes. */
int pq_backlog_full(const pq_backlog_t *b);

/* Drops the messages of partition p (p NULL: every message); returns how many. They were
 * never taken in: nothing past them was stored, they are fetched again (or by the new owner). */
size_t pq_backlog_purge(pq_backlog_t *b, const pq_part_t *p);

/* Seeks resumed partitions l (borrowed) to where they were polled, which wakes their fetcher. */
void pq_parts_wake_fetch(pq_worker_t *w, rd_kafka_t *rk, rd_kafka_topic_partition_list_t *l);

#endif
