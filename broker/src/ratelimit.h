/* Per-tenant rate limits (ratelimit.c). */
#ifndef PQ_BROKER_RATELIMIT_H
#define PQ_BROKER_RATELIMIT_H

#include "broker.h"

/* ratelimit.c: per-tenant token buckets, process-wide */
struct pq_ratelimit_s *pq_ratelimit_new(void);
void pq_ratelimit_destroy(struct pq_ratelimit_s *rl);
/* Takes one token for tenant. Returns 0, or the seconds to wait (>= 1) when limited. */
int pq_ratelimit_take(struct pq_ratelimit_s *rl, const char *tenant, double rps, int burst);
/* Answers 429 + Retry-After when tenant is over its rate; returns -1 then, else 0. */
int pq_http_ratelimit(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                      const char *tenant);

#endif
