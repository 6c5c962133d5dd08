/* Redis Lua scripts that keep G3: one terminal record per job.
 *
 * Job record fields (hash promptq:job:{tenant}:{id}): status, attempts, deliveries, route,
 * provider, model, request_hash, response, error, result (the whole result record JSON,
 * re-published verbatim on redelivery), created_at, updated_at (ms since the epoch as decimal
 * strings). Terminal statuses: succeeded, failed, expired, cancelled. */
#ifndef PROMPTQ_SCRIPTS_H
#define PROMPTQ_SCRIPTS_H

#include <stddef.h>
#include <stdint.h>

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
/* The Lua functions behind it, for scripts that create several records (the broker's
 * job_create_many): job_create(k, z, hash, now, ttl, route, cb, tenant, id) returns as
 * pq_script_job_create and adds a created id to z (when z and id) without trimming;
 * index_trim(z, now, ttl) drops z's entries older than ttl and sets its TTL. */
extern const char pq_lua_job_create[];

/* Broker, when a job it created could not be made durable. KEYS[1] job key. Deletes the record
 * only if it is still queued and never delivered. Returns 1 deleted, 0 kept. */
extern const char pq_script_job_drop[];

/* Worker, before a provider call. KEYS[1] job key, KEYS[2] lease key, KEYS[3] the tenant's job
 * index (pq_key_jobs). ARGV[1] request hash, ARGV[2] now ms, ARGV[3] ttl ms, ARGV[4] route,
 * ARGV[5] lease owner, ARGV[6] lease ms, ARGV[7] max deliveries, ARGV[8] delivery token:
 * deliveries is incremented only when it differs from the record's "delivery" field (then
 * stored there), so a begin re-issued after a Redis reconnect does not count as another
 * delivery; ARGV[9] job id. When the record is absent (a job produced straight into Kafka) it is
 * created (its TTL set) and its id added to the index (score now; the index expires ttl after
 * its last add; entries older than ttl are trimmed on about one add in 16: the listing skips
 * ids whose record is gone). A record that exists keeps the TTL it has (every terminal or
 * parked write sets it again). KEYS[3] is optional (no indexing; ARGV[9] is then ""). ARGV[10]
 * "1": the message came from a source topic (requests or bulk), not from a retry topic. Build it
 * with pq_script_job_begin_cmd.
 * Returns an array whose first element says what to do:
 *   {"run", deliveries}      lease taken, status running, deliveries incremented
 *   {"terminal", result}     already terminal: do not call, re-publish result verbatim
 *   {"parked"}               from a source topic, and the record says parked: a copy is
 *                            durable on the route's retry topic (the record says parked only
 *                            after its delivery report) and owns the job; this message is a
 *                            redelivery (an offset commit lost to a rebalance): skip it
 *   {"conflict"}             same id, another request: dlq id_conflict
 *   {"leased", pttl}         another worker holds the lease: try again after pttl ms
 *   {"poison", deliveries}   delivered more than max deliveries times: fail it as poison */
extern const char pq_script_job_begin[];

/* Worker, lease renewal while running. KEYS[1] lease key. ARGV[1] owner, ARGV[2] lease ms.
 * Returns 1 renewed, 2 the lease had expired and nobody held it: taken again (SET PX), 0 another
 * owner holds it (lost). */
extern const char pq_script_lease_renew[];

/* The compare-and-set terminal write. KEYS[1] job key, KEYS[2] lease key. ARGV[1] status,
 * ARGV[2] result record JSON, ARGV[3] response JSON or "", ARGV[4] error JSON or "",
 * ARGV[5] provider, ARGV[6] model, ARGV[7] attempts, ARGV[8] now ms, ARGV[9] ttl ms,
 * ARGV[10] route, ARGV[11] request hash; KEYS[3] the callbacks set, ARGV[12] callback_url
 * (or ""), ARGV[13] tenant, ARGV[14] why a callback_url is refused (or ""). The winner queues
 * the callback (the fields of PQ_LUA_CALLBACK_ENQUEUE, in its one HSET) or records callback
 * "refused" and callback_error, sets the TTL and deletes the lease. Build it with
 * pq_script_job_finish_cmd.
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

/* Worker, handing a job back (shutdown, or a begin that answered after the hand-back). KEYS[1]
 * lease key, KEYS[2] job key. ARGV[1] lease owner, ARGV[2] now ms. If ARGV[1] holds the lease:
 * deletes it and puts a running record back to queued. Returns 1 released, 0 not ours. */
extern const char pq_script_job_release[];

/* ---- calling the scripts by SHA1 ----
 *
 * Every script above has an id. A client sends EVALSHA <sha1> (Redis neither receives nor
 * hashes the text per call); the SHA1 is computed here, once. Redis answers NOSCRIPT when its
 * script cache was emptied (SCRIPT FLUSH, a restart without the cache): the script did not run,
 * so the same command is sent again as EVAL with the text (which also caches it). A connection
 * may SCRIPT LOAD every script of pq_script_text(0 .. PQ_SCRIPT__CNT - 1) when it connects. */
typedef enum {
    PQ_SCRIPT_JOB_CREATE,
    PQ_SCRIPT_JOB_DROP,
    PQ_SCRIPT_JOB_BEGIN,
    PQ_SCRIPT_LEASE_RENEW,
    PQ_SCRIPT_JOB_FINISH,
    PQ_SCRIPT_CALLBACK_CLAIM,
    PQ_SCRIPT_CALLBACK_DONE,
    PQ_SCRIPT_JOB_STATUS,
    PQ_SCRIPT_JOB_PARK,
    PQ_SCRIPT_JOB_RELEASE,
    PQ_SCRIPT__CNT
} pq_script_id_t;

/* The script's Lua text (static, borrowed), or NULL for an unknown id. */
const char *pq_script_text(pq_script_id_t id);

/* Its SHA1, 40 lowercase hex digits (static, borrowed; computed once, thread-safe), or NULL. */
const char *pq_script_sha1(pq_script_id_t id);

/* 1 when a Redis error reply (str, len: borrowed) is NOSCRIPT. */
int pq_script_noscript(const char *str, size_t len);

/* One EVALSHA (or EVAL) command with its KEYS and ARGV, on the caller's stack: argv/lens are
 * what pq_redis_command / redisAsyncCommandArgv take. The strings it points at are borrowed
 * (they must outlive the send), except numbers, which it formats into its own storage. A
 * builder that would pass PQ_SCRIPT_ARGV_MAX arguments or PQ_SCRIPT_NUM_MAX numbers sets
 * overflow and returns -1: nothing is written past the arrays. */
#define PQ_SCRIPT_ARGV_MAX 24
#define PQ_SCRIPT_NUM_MAX  8

typedef struct pq_script_cmd_s {
    const char *argv[PQ_SCRIPT_ARGV_MAX];
    size_t lens[PQ_SCRIPT_ARGV_MAX];
    int argc;
    int overflow;
    int nnum;
    char nkeys[8];
    char num[PQ_SCRIPT_NUM_MAX][24];
} pq_script_cmd_t;

/* Starts the command of script id with nkeys KEYS: EVALSHA <sha1> (eval 0) or EVAL <text>
 * (eval 1, after a NOSCRIPT). Returns 0, -1 for an unknown id. */
int pq_script_cmd_init(pq_script_cmd_t *c, pq_script_id_t id, int eval, int nkeys);

/* Starts a plain command (no script): the same bounded argv for a GET or SET. */
void pq_script_cmd_clear(pq_script_cmd_t *c);

/* Appends a string (NULL: ""), a string of len bytes, a decimal number. 0 or -1 (overflow). */
int pq_script_cmd_str(pq_script_cmd_t *c, const char *s);
int pq_script_cmd_strn(pq_script_cmd_t *c, const char *s, size_t len);
int pq_script_cmd_int(pq_script_cmd_t *c, int64_t v);

/* The KEYS and ARGV of pq_script_job_begin. index_key and id: NULL for no indexing. Strings
 * borrowed. */
typedef struct pq_job_begin_args_s {
    const char *job_key, *lease_key, *index_key;
    const char *request_hash, *route, *owner, *delivery, *id;
    int64_t now_ms, ttl_ms;
    int lease_ms, max_deliveries;
    int from_source; /* read from requests or bulk (not a retry topic): ARGV[10] */
} pq_job_begin_args_t;

/* The KEYS and ARGV of pq_script_job_finish. result, response, error: with their lengths
 * (NULL: ""). callback_url NULL or "" when none is queued; callback_refused the reason it is
 * refused, or NULL. Strings borrowed. */
typedef struct pq_job_finish_args_s {
    const char *job_key, *lease_key, *callbacks_key;
    const char *status;
    const char *result, *response, *error;
    size_t result_len, response_len, error_len;
    const char *provider, *model, *route, *request_hash;
    const char *callback_url, *tenant, *callback_refused;
    int attempts;
    int64_t now_ms, ttl_ms;
} pq_job_finish_args_t;

/* Each builds the whole command of its script into c (pq_script_cmd_init included). Returns 0,
 * -1 on overflow (a bug: the arity is fixed). */
int pq_script_job_begin_cmd(pq_script_cmd_t *c, int eval, const pq_job_begin_args_t *a);
int pq_script_job_finish_cmd(pq_script_cmd_t *c, int eval, const pq_job_finish_args_t *a);
int pq_script_job_park_cmd(pq_script_cmd_t *c, int eval, const char *job_key, const char *lease_key,
                           int64_t now_ms, const char *owner, int64_t ttl_ms, int attempts);
int pq_script_job_release_cmd(pq_script_cmd_t *c, int eval, const char *lease_key,
                              const char *job_key, const char *owner, int64_t now_ms);
int pq_script_lease_renew_cmd(pq_script_cmd_t *c, int eval, const char *lease_key,
                              const char *owner, int lease_ms);
int pq_script_callback_claim_cmd(pq_script_cmd_t *c, int eval, const char *zkey, int64_t now_ms,
                                 int64_t claim_ms, int64_t most);
int pq_script_callback_done_cmd(pq_script_cmd_t *c, int eval, const char *zkey, const char *job_key,
                                const char *outcome, int attempts, int64_t now_ms, int64_t due_ms,
                                const char *why);

#endif
