/* Redis Lua scripts that keep G3: one terminal record per job.
 *
 * Job record fields (hash promptq:job:{tenant}:{id}): status, attempts, deliveries, route,
 * provider, model, request_hash, response, error, result (the whole result record JSON,
 * re-published verbatim on redelivery), created_at, updated_at (ms since the epoch as decimal
 * strings). Terminal statuses: succeeded, failed, expired, cancelled. */
#ifndef PROMPTQ_SCRIPTS_H
#define PROMPTQ_SCRIPTS_H

/* Lua: callback_enqueue(z, url, tenant, now) queues the callback of job KEYS[1] on the sorted
 * set z (pq_key_callbacks), due at now: the record gets callback "pending", callback_url,
 * tenant and callback_attempts 0. Prepended to the scripts that end a job. */
#define PQ_LUA_CALLBACK_ENQUEUE                                                                    \
    "local function callback_enqueue(z, url, tenant, now)\n"                                       \
    "  redis.call('HSET', KEYS[1], 'callback', 'pending', 'callback_url', url, 'tenant', "         \
    "tenant,\n"                                                                                    \
    "    'callback_attempts', 0)\n"                                                                \
    "  redis.call('ZADD', z, now, KEYS[1])\n"                                                      \
    "end\n"

/* Broker, before producing. KEYS[1] job key, KEYS[2] the tenant's job index (pq_key_jobs).
 * ARGV[1] request hash, ARGV[2] now ms, ARGV[3] ttl ms, ARGV[4] route, ARGV[5] callback_url or
 * "", ARGV[6] its tenant: kept on the record so a cancel can call back; ARGV[7] job id.
 * A created record's id is added to the index (score now; entries older than ttl are trimmed and
 * the index expires ttl after its last add). KEYS[2] and ARGV[7] are optional (no indexing).
 * Returns 1 created (status queued), 0 exists with the same request hash, -1 exists with another
 * request hash (409 / id_conflict). */
extern const char pq_script_job_create[];

/* Broker, when a job it created could not be made durable. KEYS[1] job key. Deletes the record
 * only if it is still queued and never delivered. Returns 1 deleted, 0 kept. */
extern const char pq_script_job_drop[];

/* Worker, before a provider call. KEYS[1] job key, KEYS[2] lease key, KEYS[3] the tenant's job
 * index (pq_key_jobs). ARGV[1] request hash, ARGV[2] now ms, ARGV[3] ttl ms, ARGV[4] route,
 * ARGV[5] lease owner, ARGV[6] lease ms, ARGV[7] max deliveries, ARGV[8] delivery token:
 * deliveries is incremented only when it differs from the record's "delivery" field (then
 * stored there), so a begin re-issued after a Redis reconnect does not count as another
 * delivery; ARGV[9] job id. When the record is absent (a job produced straight into Kafka) it is
 * created queued and its id added to the index as by pq_script_job_create. KEYS[3] and ARGV[9]
 * are optional (no indexing); ARGV[8] must then be given for ARGV[9] to be seen.
 * Returns an array whose first element says what to do:
 *   {"run", deliveries}      lease taken, status running, deliveries incremented
 *   {"terminal", result}     already terminal: do not call, re-publish result verbatim
 *   {"conflict"}             same id, another request: dlq id_conflict
 *   {"leased", pttl}         another worker holds the lease: try again after pttl ms
 *   {"poison", deliveries}   delivered more than max deliveries times: fail it as poison */
extern const char pq_script_job_begin[];

/* Worker, lease renewal while running. KEYS[1] lease key. ARGV[1] owner, ARGV[2] lease ms.
 * Returns 1 renewed, 0 lost. */
extern const char pq_script_lease_renew[];

/* The compare-and-set terminal write. KEYS[1] job key, KEYS[2] lease key. ARGV[1] status,
 * ARGV[2] result record JSON, ARGV[3] response JSON or "", ARGV[4] error JSON or "",
 * ARGV[5] provider, ARGV[6] model, ARGV[7] attempts, ARGV[8] now ms, ARGV[9] ttl ms,
 * ARGV[10] route, ARGV[11] request hash; KEYS[3] the callbacks set, ARGV[12] callback_url
 * (or ""), ARGV[13] tenant, ARGV[14] why a callback_url is refused (or ""). The winner queues
 * the callback (PQ_LUA_CALLBACK_ENQUEUE) or records callback "refused" and callback_error.
 * Returns {1} if this call wrote the terminal state (the caller publishes), or
 * {0, result, status} if the job was already terminal (the caller re-publishes that result,
 * never its own; a result byte-identical to the caller's own means its earlier call won and the
 * reply was lost).
 * A winner on a record with a "batch" field (a batch line) also HINCRBYs that batch hash's
 * "completed" (status succeeded) or "failed" (any other terminal status) counter. */
extern const char pq_script_job_finish[];

/* Callback dispatch (workers). KEYS[1] the callbacks set. ARGV[1] now ms, ARGV[2] claim ms,
 * ARGV[3] most to take. Takes the due callbacks, each re-scored to now + claim ms (if the
 * claimer dies, another worker takes it then: at least once), and drops entries whose record is
 * gone or no longer pending. Returns {{job key, url, tenant, result record, attempts}, ...}. */
extern const char pq_script_callback_claim[];

/* After a callback POST. KEYS[1] the callbacks set, KEYS[2] job key. ARGV[1] "delivered",
 * "failed" (gave up) or "retry", ARGV[2] attempts so far, ARGV[3] now ms, ARGV[4] when to retry
 * (ms), ARGV[5] the last outcome ("HTTP 500", "connect failed", "" when delivered). Sets
 * callback_attempts, callback_error, callback_at and, unless retrying, callback and leaves the
 * set. Returns 1, or 0 when the callback was no longer pending. */
extern const char pq_script_callback_done[];

/* Non-terminal status change (running -> parked, parked -> queued). KEYS[1] job key.
 * ARGV[1] status, ARGV[2] now ms. Returns 1 set, 0 if the job is terminal or absent. */
extern const char pq_script_job_status[];

/* Worker, after the parked copy of a job is durable on its retry topic (G4). KEYS[1] job key,
 * KEYS[2] lease key. ARGV[1] now ms, ARGV[2] lease owner, ARGV[3] ttl ms, ARGV[4] attempts.
 * Releases the lease if ARGV[2] holds it; unless the record is absent or terminal, sets status
 * parked, attempts, deliveries 0 (a replay counts its own deliveries towards poison) and
 * updated_at, and refreshes the TTL. Returns 1 parked, 0 absent or terminal (untouched). */
extern const char pq_script_job_park[];

#endif
