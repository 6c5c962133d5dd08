/* Generations: the providers, routes and retry topics of one config (SIGHUP loads a new one; jobs
 * hold a reference, so a retired generation lives until its last job ends). */
#ifndef PQ_GEN_H
#define PQ_GEN_H

#include "worker_int.h"

/* A generation of conf (owned: freed with it) with its providers, circuits listened to by
 * parking. NULL with errstr filled on failure. New, one reference. */
pq_gen_t *pq_gen_new(pq_worker_t *w, pq_conf_t *conf, int owned, char *errstr, size_t errstr_size);

/* Frees g (its providers and, when owned, its config). */
void pq_gen_free(pq_gen_t *g);

/* Drops a job's reference on a generation; frees a retired one at zero. */
void pq_gen_unref(pq_worker_t *w, pq_gen_t *g);

/* Marks the routes of the current config active (creating their parking states). */
void pq_gen_routes_refresh(pq_worker_t *w);

/* Creates every route's retry topic (CreateTopics, or metadata auto-creation when the cluster
 * does not support it). Blocks up to a few seconds. Returns how many could not be created. */
int pq_gen_retry_topics_create(pq_worker_t *w);

#endif
