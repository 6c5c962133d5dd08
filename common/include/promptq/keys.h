/* Redis key names (DESIGN.md §4). Each writes into buf and returns the length, or -1 when it
 * does not fit. prefix is the configured redis prefix ("promptq:"). */
#ifndef PROMPTQ_KEYS_H
#define PROMPTQ_KEYS_H

#include <stddef.h>

int pq_key_job(char *buf, size_t size, const char *prefix, const char *tenant, const char *id);
int pq_key_lease(char *buf, size_t size, const char *prefix, const char *tenant, const char *id);
int pq_key_cache(char *buf, size_t size, const char *prefix, const char *tenant, const char *hash);
int pq_key_idem(char *buf, size_t size, const char *prefix, const char *tenant, const char *key);
int pq_key_reply(char *buf, size_t size, const char *prefix, const char *instance);
int pq_key_health(char *buf, size_t size, const char *prefix, const char *instance);
/* Sorted set of job keys whose callback is due, scored by the time (ms) it is due. */
int pq_key_callbacks(char *buf, size_t size, const char *prefix);
/* Hash of operator requests for a route's parked jobs, read by every worker: "replay_at" (ms of
 * the last POST /v1/parked/{route}/replay) and "drop:<tenant>" (ms of the last DELETE
 * /v1/parked/{route} by that tenant: its jobs parked before then are dropped). */
int pq_key_route_ops(char *buf, size_t size, const char *prefix, const char *route);
/* The tenant's job index for GET /v1/jobs: sorted set <prefix>jobs:<tenant>, member job id,
 * score created_at (ms). Filled by pq_script_job_create and pq_script_job_begin. */
int pq_key_jobs(char *buf, size_t size, const char *prefix, const char *tenant);
/* The Redis Stream of a streamed job's relayed events, <prefix>stream:<tenant>:<id>: entries
 * {"t": "chunk" | "restart" | "end", "d": data}; see docs/protocol.md. */
int pq_key_stream(char *buf, size_t size, const char *prefix, const char *tenant, const char *id);

#endif
