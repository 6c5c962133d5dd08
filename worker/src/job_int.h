/* Internals shared by the job's modules, from the top: job.c (state machine, in-flight table,
 * intake, parking a job, publishing, lanes, shutdown), jobredis.c (Redis steps: begin and finish
 * scripts, release, park write, cache; leases), attempt.c (provider calls, retries, failover,
 * budget), jobstream.c (the live-streaming relay) and jobrec.c (the job's records, jobdoc.h).
 * A lower one reaches job.c (or jobredis.c) only through j->hooks. */
#ifndef PQ_JOB_INT_H
#define PQ_JOB_INT_H

#include <stdint.h>
#include <time.h>
#include "jobdoc.h"
#include "promptq/util.h"
#include "providers/provider.h"
#include "stream/stream.h"
#include "worker_int.h"

#define KEY_MAX              320
#define LOCAL_WAIT_MS        100
#define LANE_MAX_WAIT_MS     1000 /* bulk: longest wait for the interactive lane */
#define REDIS_ERROR_RETRY_MS 1000
#define PRODUCE_RETRY_MS     100
#define DELIVERY_RETRY_MS    500

typedef enum {
    JS_BEGIN,
    JS_WAIT_LOCAL,
    JS_WAIT_LEASE,
    JS_CACHE,  /* cache lookup */
    JS_QUEUED, /* waiting for a provider slot (concurrency, rpm/tpm) */
    JS_TOKEN,  /* waiting for a watsonx IAM token */
    JS_CALL,
    JS_BACKOFF,
    JS_FINISH,
    JS_PUBLISH,
    JS_PARK, /* produced to the retry topic, then the parked write */
    JS_GONE,
} job_state_t;

typedef enum {
    RS_NONE,
    RS_BEGIN,
    RS_FINISH,
    RS_RELEASE,
    RS_CACHE_GET,
    RS_PARK,
} redis_step_t;

typedef struct pub_s {
    pq_job_t *job;
    int topic;
    int pending; /* produced, report not yet in */
    int done;
} pub_t;

struct pq_job_s {
    pq_worker_t *w;
    const struct pq_job_hooks_s *hooks; /* job.c's functions, for attempt.c and jobstream.c */
    pq_gen_t *gen;                      /* the providers and routes it runs with */
    pq_route_state_t *rs;               /* its route's parking state, NULL for an unknown route */
    pq_route_state_t *retry_rs;         /* read from this route's retry topic */
    const char *src_topic;
    pq_part_t *part;
    uint64_t seq;
    int topic;
    int32_t partition;
    int64_t offset;
    char *msg_key; /* invalid jobs only */

    pq_envelope_t env;
    const pq_route_t *route;
    char job_key[KEY_MAX];
    char lease_key[KEY_MAX];

    job_state_t state;
    redis_step_t rstep;
    int in_lane;   /* bulk: on w->lane_wait (state JS_BACKOFF) while interactive work runs */
    int lane_pass; /* bulk: waited LANE_MAX_WAIT_MS, the next attempt goes ahead anyway */
    int in_wait, in_table, lease_held, handed_back, nredis;
    int eval_text; /* the next script step goes as EVAL with the text (after a NOSCRIPT) */
    int slim;      /* result record without attempt log and metadata (too large otherwise) */
    int dlq_small; /* the dlq record is the small stand-in (the full one was too large) */
    struct event timer, renew;

    pq_http_req_t *http;
    /* live streaming (the request has "stream": true): each attempt's decoder and assembler,
     * the relay into the job's Redis Stream (stream_key) */
    int stream_usage;   /* ... and for the usage chunk (stream_options.include_usage) */
    int stream_xadds;   /* XADDs sent to stream_key (the first one sets its TTL) */
    int stream_relayed; /* chunks relayed since the last restart entry (what the client has) */
    /* an assistant prefill: what the client has of an answer cut mid-stream, pending for the
     * next attempt (continued on a target that takes it, else a restart entry) */
    char *prefill;        /* the text relayed so far, or NULL */
    size_t prefill_len;   /* its bytes */
    size_t prefill_sent;  /* ... sent to the provider (trailing whitespace left out) */
    size_t prefill_skip;  /* whitespace the continuation may repeat, dropped from it */
    pq_err_t prefill_err; /* why the cut attempt failed (the restart's reason) */
    int continuing;       /* the current attempt continues a prefill */
    pq_stream_t *st;      /* the current attempt's decoder, NULL when it does not stream */
    pq_stream_asm_t *sa;  /* its assembler */
    char stream_key[KEY_MAX + 80];
    size_t target;
    int tries;  /* retryable failures on the current target */
    int rounds; /* passes over all targets */
    int any_retryable;
    int attempts;      /* provider calls */
    int pass_attempts; /* provider calls in this pass over the route (worker.max_attempts) */
    pq_prov_t *prov;   /* the current target's provider state */
    pq_circuit_t *circ;
    pq_slot_wait_t sw;
    pq_token_wait_t tw;
    int key;            /* key index of the slot held */
    int slot_held;      /* a provider slot is ours (released when the call ends) */
    int probe;          /* this call is the half-open probe of circ */
    int refreshed;      /* exchanged token refreshed after a 401 on this target */
    uint64_t excluded;  /* keys of the current target that refused this job */
    double cost;        /* estimated tokens (tpm) */
    uint64_t token_gen; /* which exchanged token the call carried (pq_prov_token_gen) */
    json_t *alog;       /* attempt log */
    int cacheable;
    char cache_key[KEY_MAX + 80];
    json_t *cached; /* the cache entry that answered, or NULL */
    int64_t deliveries;
    const pq_target_t *last_target;
    pq_err_t err;
    char errmsg[256];
    long http_status;
    pq_provider_fault_t fault; /* the provider's code and reason of the error in err */
    int64_t budget_end_ms;     /* wall ms: a waiting client gives up then; 0 = no budget */
    int64_t ctx_floor;         /* after a context_length_exceeded: only targets with a larger
                                  max_context_tokens; -1 = any */
    const pq_provider_conf_t *refused[8]; /* providers that refused the request (400/422) */
    int nrefused;
    json_t *response;
    /* response's JSON text (pq_jobrec_response_text): a copy of the provider's bytes when its
     * adapter took them unchanged, else response serialised once; NULL until needed */
    char *response_text;
    size_t response_len;
    int64_t created_ms;
    int64_t start_mono;
    const char *status;

    char *result; /* value for promptq.results, or NULL */
    size_t result_len;
    char *dlq; /* value for promptq.dlq, or NULL */
    size_t dlq_len;
    pub_t pubs[2];
    pub_t park_pub;
    char *parked; /* value for the retry topic, or NULL */
    size_t parked_len;

    pq_job_t *hnext;
    pq_job_t *pool_next; /* in w->job_pool */
    TAILQ_ENTRY(pq_job_s) link;
    TAILQ_ENTRY(pq_job_s) wait_link;
    TAILQ_ENTRY(pq_job_s) lane_link;
};

/* What the lower job modules call above them (set by job.c at intake; static, never NULL). */
typedef struct pq_job_hooks_s {
    /* Terminal write: status with err (msg: NULL keeps errmsg). */
    void (*finish)(pq_job_t *j, const char *status, pq_err_t err, const char *msg);
    /* Every target is down (retryable failures or open circuits): park, or expire. */
    void (*all_targets_down)(pq_job_t *j);
    /* A bulk job stops waiting for the interactive lane. */
    void (*lane_leave)(pq_job_t *j);
    /* Stores a fresh answer in the cache (best effort). */
    void (*cache_store)(pq_job_t *j);
    /* pq_redis_command's callback for a best-effort command of j (opaque: j). */
    pq_redis_reply_cb *aux_reply;
    /* for jobredis.c: */
    void (*publish)(pq_job_t *j);      /* produce the result (and dlq) records */
    void (*done)(pq_job_t *j);         /* the job is over (offset done unless handed back) */
    void (*free)(pq_job_t *j);         /* its last Redis reply came in after it was over */
    void (*stop_calls)(pq_job_t *j);   /* cancel its provider call or wait */
    void (*table_remove)(pq_job_t *j); /* it no longer holds its id in this process */
} pq_job_hooks_t;

/* Interactive jobs talk to Redis over their own connection: the server serves connections in
 * turn, so a bulk job's burst of commands never queues in front of theirs. */
static inline pq_redis_t *job_redis(const pq_job_t *j)
{
    return j->topic == PQ_T_REQUESTS && j->w->iredis ? j->w->iredis : j->w->redis;
}

/* The interactive lane's calls go through their own HTTP client (priority 0 events). */
static inline pq_http_t *job_http(const pq_job_t *j)
{
    return j->topic == PQ_T_REQUESTS && j->w->ihttp ? j->w->ihttp : j->w->http;
}

static inline void timer_in(pq_job_t *j, int64_t ms)
{
    struct timeval tv;
    if (ms < 0)
        ms = 0;
    tv.tv_sec = (time_t)(ms / 1000);
    tv.tv_usec = (suseconds_t)((ms % 1000) * 1000);
    evtimer_add(&j->timer, &tv);
}

static inline const char *tenant_of(const pq_job_t *j)
{
    return j->env.tenant ? j->env.tenant : "default";
}

static inline const char *id_of(const pq_job_t *j)
{
    return j->env.id ? j->env.id : "-";
}

static inline int deadline_passed(const pq_job_t *j, int64_t extra_ms)
{
    return j->env.deadline_ms > 0 && pq_now_ms() + extra_ms >= j->env.deadline_ms;
}

static inline int job_cacheable(const pq_job_t *j)
{
    const json_t *temp;

    if (j->env.cache == 1)
        return 1;
    if (j->env.cache == 0 || !j->w->conf->cache_temperature_zero)
        return 0;
    temp = json_object_get(j->env.request, "temperature");
    return json_is_number(temp) && json_number_value(temp) == 0.0;
}

static inline int park_expired(const pq_job_t *j)
{
    int64_t at = pq_jobdoc_park_since(j->env.park);
    return at > 0 && pq_now_ms() - at >= j->w->conf->park_ttl_s * 1000;
}

/* jobrec.c: the job's records (jobdoc.h) from its state; the time is now */

/* The inputs of j's records, borrowed from j. */
void pq_jobrec_doc(const pq_job_t *j, pq_jobdoc_t *d);
/* Gives j its answer: completion (taken), and when raw is not NULL its JSON text as the
 * provider sent it (raw_len bytes, copied without the whitespace around it). */
void pq_jobrec_set_response(pq_job_t *j, json_t *completion, const char *raw, size_t raw_len);
/* Drops j's answer. */
void pq_jobrec_clear_response(pq_job_t *j);
/* The JSON text of j's answer, made once (the records splice it in); NULL when j has none or
 * out of memory. */
const char *pq_jobrec_response_text(pq_job_t *j, size_t *len);
/* The "error" object. New reference. */
json_t *pq_jobrec_error(const pq_job_t *j);
/* The result record. New string, NULL on failure. */
char *pq_jobrec_result(pq_job_t *j, size_t *len);
/* The dlq record's small stand-in (sets j->dlq_small). New string, NULL on failure. */
char *pq_jobrec_dlq_small(pq_job_t *j, size_t *len);
/* Envelope + error (taken) for the dlq; the small stand-in when that is over max_msg. */
char *pq_jobrec_dlq(pq_job_t *j, json_t *error, size_t *len);

/* jobredis.c: the Redis steps (begin and finish scripts, release, park, cache), leases */

/* Issues j's current Redis step (j->rstep); waits on w->redis_wait while Redis is down. */
void pq_jobredis_issue(pq_job_t *j);
/* The job runs: the cache first when it is cacheable, else its provider calls. */
void pq_jobredis_run(pq_job_t *j);
/* PUBLISH <reply_to> "<tenant>:<id>" when the envelope asks for it (best effort). */
void pq_jobredis_reply(pq_job_t *j);
/* Stores a fresh answer in the cache (best effort). */
void pq_jobredis_cache_store(pq_job_t *j);
/* Renews the lease (eval: EVAL with the script text, after a NOSCRIPT). */
void pq_jobredis_renew_send(pq_job_t *j, int eval);
/* j->renew's callback (arg: the job). */
void pq_jobredis_on_renew_tick(evutil_socket_t fd, short what, void *arg);
/* pq_redis_command's callback of a best-effort command (opaque: the job). */
void pq_jobredis_aux_reply(void *opaque, redisReply *reply);

/* attempt.c */

/* Calls the route's next target that may take the job (or ends, parks or waits). */
void pq_attempt_run(pq_job_t *j);

/* The backoff (ms, full jitter) before retry n on provider p. */
int64_t pq_attempt_backoff_ms(const pq_provider_conf_t *p, int n);

/* Waits delay ms, then attempts again (expires the job when its deadline passes first). */
void pq_attempt_backoff(pq_job_t *j, int64_t delay);

/* A half-open probe not used gives its circuit's probe back. */
void pq_attempt_give_back_probe(pq_job_t *j);

/* Releases the provider slot held (tokens used, -1 unknown; refund: the call never ran). */
void pq_attempt_release_slot(pq_job_t *j, int64_t tokens, int refund);

/* jobstream.c */

/* Frees the current attempt's stream decoder and assembler. */
void pq_jobstream_clear(pq_job_t *j);

/* Relays one event (type "chunk", "restart", "end"; data borrowed) into the job's stream. */
void pq_jobstream_xadd(pq_job_t *j, const char *type, const char *data, size_t len);

/* pq_http's data callback of a streamed call (opaque: the job). */
pq_err_t pq_jobstream_on_data(void *opaque, const char *buf, size_t len);

/* Relays the usage chunk of completion when the client asked for it. */
void pq_jobstream_relay_usage(pq_job_t *j, const json_t *completion);

/* The current streamed attempt failed with err. Nothing relayed: nothing to do. Else what the
 * client has is kept as a prefill for the next attempt when a target of the route continues
 * one (pq_target_prefill), or a restart entry goes out now. */
void pq_jobstream_failed(pq_job_t *j, pq_err_t err);

/* A pending prefill that a target cannot continue (or a call that does not stream): its restart
 * entry now. The job's end (finish, park) flushes it too. A target skipped (it cannot express
 * the request) or an attempt that fails before its call leaves it pending for the next. */
void pq_jobstream_flush(pq_job_t *j);

/* A new reference: request with the pending prefill as a trailing assistant message, or NULL
 * when there is none (or out of memory: then the prefill is flushed). */
json_t *pq_jobstream_prefill_request(pq_job_t *j, const json_t *request);

/* The new attempt's assembler takes the prefill, so its answer is the whole text. 0, or -1 (out
 * of memory; the prefill stays pending): the call must not go out with it then. */
int pq_jobstream_prefill_seed(pq_job_t *j);

/* Forgets the pending prefill (a clean answer). */
void pq_jobstream_prefill_drop(pq_job_t *j);

#endif
