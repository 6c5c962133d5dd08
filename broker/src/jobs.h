/* GET/DELETE /v1/jobs/{id}, GET /v1/jobs (jobs.c). */
#ifndef PQ_BROKER_JOBS_H
#define PQ_BROKER_JOBS_H

#include "slot.h"

/* jobs.c: GET /v1/jobs/{id} */
void pq_jobs_get(pq_bthread_t *t, struct evhttp_request *req, const char *id);
/* GET /v1/jobs?status=&after=&limit=: the tenant's jobs, newest first (OpenAI list shape). */
void pq_jobs_list(pq_bthread_t *t, struct evhttp_request *req);
void pq_jobs_redis_reply(pq_slot_t *s, const void *reply);
void pq_jobs_timeout(pq_slot_t *s);
/* DELETE /v1/jobs/{id}: cancels a queued or parked job. */
void pq_jobs_delete(pq_bthread_t *t, struct evhttp_request *req, const char *id);
void pq_jobs_cancel_reply(pq_slot_t *s, const void *reply);
void pq_jobs_cancel_delivered(pq_bthread_t *t, const rd_kafka_message_t *m);
void pq_jobs_cancel_timeout(pq_slot_t *s);

#endif
