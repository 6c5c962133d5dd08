/* The consumer: partitions (assignment, revocation), offsets storing (G5: only past finished
 * jobs), each lane's backlog and flow control, the rebalance callback. Calls down into the job
 * (pq_job_intake) and parking (pq_park_admit); jobs reach it back through w->job_gone. */
#ifndef PQ_CONSUMER_H
#define PQ_CONSUMER_H

#include "worker_int.h"

/* Sizes the lanes' backlogs and the interactive reserve from w->max_inflight and sets
 * w->job_gone. */
void pq_consumer_init(pq_worker_t *w);

/* Pauses or resumes each lane as its backlog, Redis and stopping require. */
void pq_consumer_update_flow(pq_worker_t *w);

/* Stores the offsets that advanced (offset + 1 semantics: the next one to read). */
void pq_consumer_flush_offsets(pq_worker_t *w);

/* One lane (1: interactive, 0: bulk): starts jobs from its backlog while slots are free and
 * polls into it until it is full. */
void pq_consumer_drain(pq_worker_t *w, int lane);

/* Empties a queue's io-event pipe. */
void pq_consumer_drain_pipe(int fd);

/* rd_kafka_conf_set_rebalance_cb's callback; opaque: the worker. */
void pq_consumer_on_rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                              rd_kafka_topic_partition_list_t *parts, void *opaque);

/* Event callbacks (arg: the worker): ev_cqueue and ev_iqueue (the queues' pipes), ev_drain and
 * ev_idrain (a lane drains again), ev_flush (offsets store). */
void pq_consumer_on_cqueue(evutil_socket_t fd, short what, void *arg);
void pq_consumer_on_iqueue(evutil_socket_t fd, short what, void *arg);
void pq_consumer_on_drain(evutil_socket_t fd, short what, void *arg);
void pq_consumer_on_idrain(evutil_socket_t fd, short what, void *arg);
void pq_consumer_on_flush(evutil_socket_t fd, short what, void *arg);

#endif
