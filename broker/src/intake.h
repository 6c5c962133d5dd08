/* POST /v1/jobs and the way every job becomes durable (intake.c). */
#ifndef PQ_BROKER_INTAKE_H
#define PQ_BROKER_INTAKE_H

#include "slot.h"

/* intake.c: POST /v1/jobs */
/* The loop's batching of job_create (its event and scratch); -1 when out of memory. free also
 * frees the spare batches (after the Redis connection, whose callbacks recycle them). */
int pq_intake_thread_init(pq_bthread_t *t);
void pq_intake_thread_free(pq_bthread_t *t);
void pq_intake_post(pq_bthread_t *t, struct evhttp_request *req);
/* Queues the job of a slot whose id, tenant, route, hash and payload are set (job_create, then
 * produce or spool). The answer comes through pq_intake_durable or an error reply. */
void pq_intake_submit(pq_slot_t *s);
/* A slot for the new job of env (id, model and request hash set) holding its id, tenant,
 * route and hash; the caller owns it. NULL after answering 503 (no slot free). Shared by
 * POST /v1/jobs and chat completions. */
pq_slot_t *pq_intake_slot_get(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                              const pq_envelope_t *env, const char *tenant,
                              const pq_slot_ops_t *ops);
/* Slot ops of POST /v1/jobs: the timeouts of the idempotency claim and of intake (Redis
 * create, ack deadline); at stop what still waits for Kafka goes to the spool; on release an
 * idempotency claim whose job never became durable is given up. */
extern const pq_slot_ops_t pq_intake_ops;
/* Takes over a slot whose job is ready (as for pq_intake_submit): with an Idempotency-Key
 * (idem, not NULL) it goes through pq_idem_start with the hash of the request body, else
 * straight to pq_intake_submit. Once the job is durable, durable(s, spooled) answers or waits;
 * an idempotent repeat of a durable job goes to repeat(s, spooled) instead. */
void pq_intake_start(pq_slot_t *s, const char *idem, const void *body, size_t len,
                     void (*durable)(pq_slot_t *s, int spooled),
                     void (*repeat)(pq_slot_t *s, int spooled));
/* 503 + Retry-After for a job that could not be accepted. */
void pq_intake_unavailable(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                           const char *why);
/* 202 for POST /v1/jobs (releases the slot). */
void pq_intake_accepted(pq_slot_t *s, int spooled);
void pq_intake_redis_reply(pq_slot_t *s, long long result, int ok);
void pq_intake_delivered(pq_bthread_t *t, const rd_kafka_message_t *m);
void pq_intake_timeout(pq_slot_t *s);
/* Every job that could not be made durable in time ends here (ack deadline passed, Kafka known
 * down, delivery failed retryably, producer recreated, shutting down): the job goes to the
 * spool and is answered 202 "spooled" once it is fsync'd, or 503 + Retry-After if the spool
 * cannot take it. */
void pq_intake_not_durable(pq_slot_t *s, const char *why);
/* The spool's answer for a slot in PQ_SLOT_SPOOLING (on the slot's loop). */
void pq_intake_spooled(pq_slot_t *s, pq_err_t err);

/* The EVALSHA of pq_script_job_create for a new job (tenant, id) with its request hash, route
 * and callback_url (NULL: none), the one layout of its KEYS and ARGV: fills argv/lens
 * (PQ_JOB_CREATE_ARGC entries), the keys and numbers kept in b, the strings borrowed. Returns
 * 0, or -1 when a key does not fit. (intake.c) */
#define PQ_JOB_CREATE_ARGC 12
typedef struct {
    char key[512], ikey[512], now[24], ttl[24];
} pq_job_create_buf_t;
int pq_job_create_argv(const pq_conf_t *conf, const char *tenant, const char *id, const char *hash,
                       const char *route, const char *callback_url, pq_job_create_buf_t *b,
                       const char **argv, size_t *lens);

#endif
