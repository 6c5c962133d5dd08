/* The loop's Redis connection and the broker's scripts (rconn.c). */
#ifndef PQ_BROKER_RCONN_H
#define PQ_BROKER_RCONN_H

#include "slot.h"

/* rconn.c: the thread's Redis connection */
int pq_rconn_start(pq_bthread_t *t);
void pq_rconn_stop(pq_bthread_t *t);
/* 1 if commands may be sent now. */
int pq_rconn_usable(const pq_bthread_t *t);
/* Resolves the configured Redis host without blocking the loop: a numeric host (127.0.0.1,
 * ::1) is handed to fn at once, a name is looked up with evdns (/etc/hosts, then DNS) and fn
 * runs on the loop with a numeric address (IPv4 preferred), or NULL when the lookup failed.
 * *pending (t->dns_rc or t->dns_sub) holds the lookup while it runs. Returns 0, or -1 when no
 * lookup could be started (fn did not run). */
int pq_rconn_resolve(pq_bthread_t *t, struct evdns_getaddrinfo_request **pending,
                     void (*fn)(pq_bthread_t *t, const char *addr));
/* Cancels the lookups still running and frees the loop's evdns base (before the base). */
void pq_rconn_dns_free(pq_bthread_t *t);

/* SHA1 of a script for EVALSHA; the scripts are loaded on every (re)connect. script is one of
 * pq_script_job_create, pq_script_job_drop, pq_bscript_idem_claim, pq_bscript_cancel,
 * pq_bscript_batch_status, pq_bscript_jobs_list. */
const char *pq_rconn_sha(const char *script);
/* The text of job_create_many (rconn.c), or NULL if it could not be built: pq_lua_job_create's
 * job_create once per job of KEYS = (job key, index key)..., ARGV = pq_script_job_create's 7
 * arguments per job; answers an array with job_create's integer, or an error, per job. */
const char *pq_rconn_create_many(void);

/* Broker-only scripts (rconn.c).
 * idem_claim: KEYS[1] idem key; ARGV[1] value "<id> <body hash> p", ARGV[2] ttl ms. Returns nil
 * when this call set the key (first use), else the current value.
 * cancel: KEYS[1] job key, KEYS[2] the callbacks set; ARGV[1] result record JSON, ARGV[2] error
 * JSON, ARGV[3] now ms. Moves queued|parked to cancelled with the result (a batch line also
 * counts as failed in the batch named by its "batch" field; a job created with a callback_url
 * queues its callback); returns 1, or the status it found ("" when the record is absent). */
extern const char pq_bscript_idem_claim[];
extern const char pq_bscript_cancel[];
/* jobs_list (GET /v1/jobs): KEYS[1] the tenant's job index (pq_key_jobs); ARGV[1] job key
 * prefix "<prefix>job:<tenant>:", ARGV[2] after (a job id, "" from the newest), ARGV[3] limit,
 * ARGV[4] status wanted ("" any), ARGV[5] most index entries to scan. Walks the index newest
 * first from after, reads each record, drops entries whose record is gone, and stops after
 * limit + 1 matches or cap entries. Returns {0} if after is not in the index, else {1, more,
 * cursor, id1, status, route, created_at, updated_at, attempts, provider, model, id2, ...}
 * (absent fields ""): more is 1 if entries remain; cursor is "" unless the scan stopped at cap
 * with fewer than limit + 1 matches, then it is the last entry scanned (kept in the index): the
 * next page starts after it. */
extern const char pq_bscript_jobs_list[];

/* Sends a command whose reply goes to cb(t's context, reply, priv), or nowhere when cb is NULL;
 * cb must first call pq_rconn_replied (or pq_slot_replied). Returns 0, or -1 if it could not be
 * sent. */
int pq_rconn_send(pq_bthread_t *t, void (*cb)(redisAsyncContext *, void *, void *), void *priv,
                  int argc, const char **argv, const size_t *argvlen);
int pq_rconn_sendf(pq_bthread_t *t, void (*cb)(redisAsyncContext *, void *, void *), void *priv,
                   const char *fmt, ...);
/* Bookkeeping for a reply of pq_rconn_send: returns the loop. */
pq_bthread_t *pq_rconn_replied(redisAsyncContext *ac, const void *reply);

/* Broker script for batches (rconn.c). batch_status: KEYS[1] batch key; ARGV[1]
 * "|from1|from2|", ARGV[2] new status, ARGV[3] field for the time, ARGV[4] now seconds,
 * ARGV[5..] more field value pairs. Returns 1 if the status was one of from and is now the new
 * one (and the fields are set), else 0: the compare-and-set behind every batch state change,
 * e.g. the once-guard of finalization. */
extern const char pq_bscript_batch_status[];

#endif
