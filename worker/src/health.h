/* The worker's health: the health key in Redis (every PQ_HEALTH_MS) and the metrics endpoint
 * (worker.metrics_listen: GET /metrics, /healthz). */
#ifndef PQ_HEALTH_H
#define PQ_HEALTH_H

#include "worker_int.h"

#define PQ_HEALTH_MS 5000

/* ev_health's callback (arg: the worker): SETs the health key unless the last SET is pending. */
void pq_health_on_tick(evutil_socket_t fd, short what, void *arg);

/* Binds worker.metrics_listen ("HOST:PORT") on the worker's loop. Returns 0 or -1 (errstr). */
int pq_health_metrics_listen(pq_worker_t *w, const char *spec, char *errstr, size_t errstr_size);

#endif
