/* A job's provider calls (job_int.h): the call, retries, failover over the route's targets and
 * the budget of a waiting client. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "job_int.h"
#include "promptq/log.h"
#include "providers/common.h"
#include "providers/provider.h"

/* ---- provider calls ----
 *
 * Per target: eligibility -> circuit check -> slot (key, concurrency, rpm/tpm) -> [exchanged
 * token] -> build -> HTTP (connect, first byte, idle and total timeouts) -> classify. What a
 * failed attempt does next is its error class (act_of, README "Failover"): retry the same
 * target (backoff with full jitter), try the provider's next key, fail over to the next
 * eligible target, or end the job. A 429 rests that key for that model only. Interactive calls
 * a client waits for run inside the route's budget: no attempt is started or waited for that
 * cannot end before the client gives up. Every attempt and skip lands in the attempt log. */

#define ATTEMPT_LOG_MAX 64
#define MIN_ATTEMPT_MS  500 /* a budget with less left than this is spent */

/* ACT_AFRESH: the same target again at once, not counted as a retry (it refused the assistant
 * prefill of a continuation, not the job). */
typedef enum { ACT_RETRY, ACT_NEXT_KEY, ACT_FAILOVER, ACT_END, ACT_AFRESH } act_t;

static const char *act_name(act_t a)
{
    static const char *const names[] = {"retry", "next_key", "failover", "end", "afresh"};
    return names[a];
}

/* Exponential backoff with full jitter: uniform in [0, min(retry_max_ms, base * 2^(n-1))]. */
int64_t pq_attempt_backoff_ms(const pq_provider_conf_t *p, int n)
{
    int64_t d = pq_backoff_step_ms(p->retry_base_ms > 0 ? p->retry_base_ms : 200,
                                   p->retry_max_ms > 0 ? p->retry_max_ms : 5000, n);

    return (int64_t)(random() % (d + 1));
}

/* ms of the budget left; INT64_MAX without one. A budget with less than MIN_ATTEMPT_MS left is
 * spent: the client has its 504 (and the job id), the job goes on under the ordinary rules. */
static int64_t budget_left(pq_job_t *j)
{
    int64_t left;

    if (j->budget_end_ms == 0)
        return INT64_MAX;
    left = j->budget_end_ms - pq_now_ms();
    if (left >= MIN_ATTEMPT_MS)
        return left;
    PQ_INFO("job %s/%s: the budget of route %s is spent (its client was answered 504): the job "
            "goes on without it",
            tenant_of(j), id_of(j), j->route->name);
    j->budget_end_ms = 0;
    return INT64_MAX;
}

/* A wait of delay ms before trying the same target again fits the budget. */
static int budget_allows_wait(pq_job_t *j, int64_t delay)
{
    int64_t left = budget_left(j);

    return left == INT64_MAX || delay + MIN_ATTEMPT_MS <= left;
}

void pq_attempt_backoff(pq_job_t *j, int64_t delay)
{
    if (deadline_passed(j, delay)) {
        j->hooks->finish(j, "expired", PQ_ERR_EXPIRED, "deadline passed while retrying");
        return;
    }
    j->state = JS_BACKOFF;
    timer_in(j, delay);
}

/* Tokens a call may use, for tpm: prompt bytes / 4 + max_tokens. */
static double job_cost(pq_job_t *j)
{
    const json_t *msgs, *m, *mt;
    size_t i, bytes = 0;

    if (j->cost > 0)
        return j->cost;
    msgs = json_object_get(j->env.request, "messages");
    json_array_foreach(msgs, i, m)
    {
        const json_t *c = json_object_get(m, "content"), *part;
        size_t k;
        if (json_is_string(c))
            bytes += json_string_length(c);
        else
            json_array_foreach(c, k, part) bytes +=
                json_string_length(json_object_get(part, "text"));
    }
    mt = json_object_get(j->env.request, "max_completion_tokens");
    if (!json_is_integer(mt))
        mt = json_object_get(j->env.request, "max_tokens");
    j->cost =
        (double)(bytes + 3) / 4.0 +
        (json_is_integer(mt) && json_integer_value(mt) > 0 ? (double)json_integer_value(mt) : 0.0);
    if (j->cost < 1.0)
        j->cost = 1.0;
    return j->cost;
}

/* One line of the attempt log, the attempt metric and the attempt's log line. status: HTTP
 * status or 0; latency_ms < 0 for a skip (no call made); act: what the job did next (NULL for
 * a success or a skip); timeout: which timeout class ended the call ("" for none). */
static void attempt_note(pq_job_t *j, const pq_target_t *t, pq_err_t outcome, long status,
                         int64_t latency_ms, const char *msg, const char *act, const char *timeout)
{
    json_t *e;

    if (j->circ)
        pq_circuit_count(j->circ, outcome, latency_ms);
    if (outcome == PQ_OK)
        PQ_DBG("job %s/%s: %s/%s HTTP %ld ok in %" PRId64 " ms", tenant_of(j), id_of(j),
               t->provider, t->model, status, latency_ms);
    else if (latency_ms >= 0)
        PQ_INFO("job %s/%s: attempt %d on %s/%s: HTTP %ld %s in %" PRId64 " ms (%s): %s",
                tenant_of(j), id_of(j), j->attempts, t->provider, t->model, status,
                pq_err_name(outcome), latency_ms, act ? act : "", msg ? msg : "");
    else if (outcome == PQ_ERR_CIRCUIT_OPEN)
        PQ_DBG("job %s/%s: %s/%s skipped: %s", tenant_of(j), id_of(j), t->provider, t->model,
               msg ? msg : "");
    else
        PQ_INFO("job %s/%s: %s/%s skipped: %s: %s", tenant_of(j), id_of(j), t->provider, t->model,
                pq_err_name(outcome), msg ? msg : "");
    if (!j->alog)
        j->alog = json_array();
    if (!j->alog || json_array_size(j->alog) >= ATTEMPT_LOG_MAX)
        return;
    e = json_pack("{s:s, s:s, s:o, s:s, s:o, s:s}", "provider", t->provider, "model", t->model,
                  "status", status > 0 ? json_integer(status) : json_null(), "outcome",
                  outcome == PQ_OK ? "ok" : pq_err_name(outcome), "latency_ms",
                  latency_ms >= 0 ? json_integer(latency_ms) : json_null(), "class",
                  outcome == PQ_OK ? "ok"
                  : latency_ms < 0 ? "skip"
                  : act            ? act
                                   : "failover");
    if (e && timeout && timeout[0])
        json_object_set_new(e, "timeout", json_string(timeout));
    if (e)
        json_array_append_new(j->alog, e);
}

/* Records why the current target did not serve the job. fault: the provider's code and
 * reason, or NULL. */
static void note_error(pq_job_t *j, const pq_target_t *t, pq_err_t err, long status,
                       const char *msg, const pq_provider_fault_t *fault)
{
    j->err = err;
    j->http_status = status;
    j->last_target = t;
    pq_strlcpy(j->errmsg, msg, sizeof(j->errmsg));
    if (fault)
        j->fault = *fault;
    else
        memset(&j->fault, 0, sizeof(j->fault));
    if (pq_err_is_retryable(err))
        j->any_retryable = 1;
}

/* The error classes: what a failed call on t does next. */
static act_t act_of(const pq_job_t *j, const pq_target_t *t, pq_err_t err, long status,
                    pq_http_timeout_t timeout)
{
    if (err == PQ_ERR_REFUSED && j->continuing)
        return ACT_AFRESH; /* it refused the continuation's prefill, not the job */
    switch (err) {
    case PQ_ERR_TIMEOUT:
        /* a provider's 408 is worth a retry; our own timeouts move on unless asked not to */
        if (status == 408 || timeout == PQ_HTTP_TIMEOUT_NONE)
            return ACT_RETRY;
        return t->p->retry_on_timeout ? ACT_RETRY : ACT_FAILOVER;
    case PQ_ERR_CONNECT:
    case PQ_ERR_SERVER:
    case PQ_ERR_OVERLOADED:
    case PQ_ERR_MALFORMED:
    case PQ_ERR_RATE_LIMITED: /* the key+model rests; another key, a wait, or the next target */
        return ACT_RETRY;
    case PQ_ERR_AUTH:
        return ACT_NEXT_KEY;
    case PQ_ERR_REFUSED:
        return j->route->on_bad_request == PQ_BAD_REQUEST_END ? ACT_END : ACT_FAILOVER;
    case PQ_ERR_CONTENT_FILTER:
    case PQ_ERR_TOO_LARGE: /* the answer is over max_response_bytes */
        return ACT_END;
    default: /* NOT_FOUND, CONTEXT_LENGTH (to a larger target only), UNSUPPORTED, ... */
        return ACT_FAILOVER;
    }
}

/* Whether target t may still serve this job: after a context_length_exceeded only targets
 * with a larger max_context_tokens; after a 400/422 refusal never a target of the provider
 * that refused. Sets why when not. */
static int target_eligible(const pq_job_t *j, const pq_target_t *t, pq_err_t *why)
{
    if (j->ctx_floor >= 0 && t->max_context_tokens <= j->ctx_floor) {
        *why = PQ_ERR_CONTEXT_LENGTH;
        return 0;
    }
    for (int i = 0; i < j->nrefused; i++)
        if (j->refused[i] == t->p) {
            *why = PQ_ERR_REFUSED;
            return 0;
        }
    return 1;
}

/* Some target after the current one may still serve this job. */
static int later_target(const pq_job_t *j)
{
    pq_err_t why;

    for (size_t i = j->target + 1; i < j->route->ntargets; i++)
        if (target_eligible(j, &j->route->targets[i], &why))
            return 1;
    return 0;
}

/* Some later eligible target may take a call now (circuit, keys). */
static int later_target_ready(const pq_job_t *j)
{
    pq_err_t why;

    for (size_t i = j->target + 1; i < j->route->ntargets; i++) {
        const pq_target_t *t = &j->route->targets[i];
        if (target_eligible(j, t, &why) && pq_provs_target_available(j->gen->provs, t))
            return 1;
    }
    return 0;
}

void pq_attempt_give_back_probe(pq_job_t *j)
{
    if (j->probe && j->circ)
        pq_circuit_probe_abort(j->circ);
    j->probe = 0;
}

void pq_attempt_release_slot(pq_job_t *j, int64_t tokens, int refund)
{
    if (!j->slot_held)
        return;
    j->slot_held = 0;
    pq_prov_release(j->prov, j->key, j->cost, tokens, refund);
}

static void next_target(pq_job_t *j)
{
    pq_attempt_give_back_probe(j);
    j->target++;
    j->tries = 0;
    j->excluded = 0;
    j->refreshed = 0;
    pq_attempt_run(j);
}

/* The job ends with the error noted last (a refusal the provider explained). */
static void job_end(pq_job_t *j)
{
    pq_attempt_give_back_probe(j);
    j->hooks->finish(j, "failed", j->err ? j->err : PQ_ERR_REFUSED, NULL);
}

/* Every target was tried (or the attempt budget of this pass is spent). */
static void job_exhausted(pq_job_t *j)
{
    char msg[sizeof(j->errmsg)];

    pq_attempt_give_back_probe(j);
    if (j->any_retryable) {
        j->hooks->all_targets_down(j);
        return;
    }
    /* every target refused (or could not express the request) */
    if (j->errmsg[0])
        snprintf(msg, sizeof(msg), "every target refused the request; last: %.200s", j->errmsg);
    else
        snprintf(msg, sizeof(msg), "no target could serve the request");
    j->hooks->finish(j, "failed", j->err ? j->err : PQ_ERR_UNSUPPORTED, msg);
}

/* A 429 on the current target: rest that key for that model (or the whole key for a quota
 * error about it), then try again at once (another key may be free; job_no_key waits or moves
 * on when none is). A Retry-After beyond max_rest_ms moves on now. */
static void rate_limited(pq_job_t *j, const pq_target_t *t, int64_t retry_after,
                         const pq_provider_fault_t *fault)
{
    const pq_provider_conf_t *p = t->p;

    if (fault && fault->key_wide)
        pq_prov_key_rest(j->prov, j->key,
                         retry_after >= 0 && retry_after < p->max_rest_ms ? retry_after
                         : retry_after >= 0                               ? p->max_rest_ms
                                                                          : p->key_rest_ms,
                         0);
    else if (j->circ)
        pq_circuit_rate_limited(j->circ, j->key, retry_after);
    if (retry_after > p->max_rest_ms) {
        next_target(j);
        return;
    }
    pq_attempt_run(j);
}

/* A failed call or a failed step before it, on the current target. */
static void attempt_failed(pq_job_t *j, act_t act, pq_err_t err, long status, int64_t retry_after,
                           const char *msg, const pq_provider_fault_t *fault)
{
    pq_worker_t *w = j->w;
    const pq_target_t *t = &j->route->targets[j->target];
    int64_t delay;

    note_error(j, t, err, status, msg, fault);
    switch (act) {
    case ACT_END:
        job_end(j);
        return;
    case ACT_NEXT_KEY:
        /* an exchanged token (watsonx IAM) may have expired: refresh it once before moving on */
        if (pq_prov_uses_tokens(j->prov) && status == 401 && !j->refreshed) {
            j->refreshed = 1;
            j->state = JS_BACKOFF;
            timer_in(j, 0);
            return;
        }
        if (status == 401 || status == 0)
            pq_prov_key_rest(j->prov, j->key, t->p->key_rest_ms, 1);
        if (j->key < 64)
            j->excluded |= 1ULL << j->key;
        j->refreshed = 0;
        pq_attempt_run(j); /* the next key, or the next target when none is left */
        return;
    case ACT_FAILOVER:
        if (err == PQ_ERR_CONTEXT_LENGTH)
            j->ctx_floor =
                t->max_context_tokens > j->ctx_floor ? t->max_context_tokens : j->ctx_floor;
        else if (err == PQ_ERR_REFUSED &&
                 j->nrefused < (int)(sizeof(j->refused) / sizeof(j->refused[0])))
            j->refused[j->nrefused++] = t->p;
        next_target(j);
        return;
    case ACT_AFRESH:
        pq_attempt_run(j);
        return;
    case ACT_RETRY:
        break;
    }
    pq_counter_add(w->m.retries, 1);
    if (err == PQ_ERR_RATE_LIMITED && (status == 429 || fault)) {
        rate_limited(j, t, retry_after, fault);
        return;
    }
    j->tries++;
    if (j->tries > t->p->retries_per_target) {
        next_target(j);
        return;
    }
    delay = pq_attempt_backoff_ms(t->p, j->tries);
    if (!budget_allows_wait(j, delay) && later_target(j)) {
        next_target(j); /* the client would give up before the retry ends: the next target now */
        return;
    }
    pq_attempt_backoff(j, delay);
}

/* How a streamed 2xx answer ended: PQ_OK with *completion (new) for a clean stream, else the
 * class (a cut stream is PQ_ERR_CONNECT; a provider error event its own) with msg and fault. */
static pq_err_t stream_outcome(pq_job_t *j, const pq_target_t *t, json_t **completion,
                               pq_provider_fault_t *fault, char *msg, size_t msg_size)
{
    const char *code = "", *text = "";
    pq_err_t err;
    json_t *v;

    pq_stream_finish(j->st);
    if (pq_stream_skipped(j->st) > 0)
        PQ_WARN("job %s/%s: %s/%s: %" PRIu64 " malformed stream events skipped "
                "(stream_malformed \"skip\")",
                tenant_of(j), id_of(j), t->provider, t->model, pq_stream_skipped(j->st));
    switch (pq_stream_asm_end(j->sa)) {
    case PQ_STREAM_END_CLEAN:
        *completion = pq_stream_asm_completion(j->sa, t->model, (int64_t)(pq_now_ms() / 1000));
        if (!*completion) {
            snprintf(msg, msg_size, "out of memory assembling the stream");
            return PQ_ERR_NOMEM;
        }
        return PQ_OK;
    case PQ_STREAM_END_ERROR:
        err = pq_stream_asm_error(j->sa, &code, &text);
        v = json_string(code);
        pq_provider_safe_token(v, fault->code, sizeof(fault->code));
        json_decref(v);
        if (err == PQ_ERR_CONTEXT_LENGTH || err == PQ_ERR_CONTENT_FILTER || err == PQ_ERR_REFUSED)
            pq_provider_reason_sanitize(text, strlen(text), t->p, fault->reason,
                                        sizeof(fault->reason));
        snprintf(msg, msg_size, "%s: error event in the stream (%s%s%s)", t->provider,
                 pq_err_name(err), fault->code[0] ? ": " : "", fault->code);
        return err == PQ_OK ? PQ_ERR_SERVER : err;
    default:
        snprintf(msg, msg_size, "%s: the stream ended before the answer did", t->provider);
        return PQ_ERR_CONNECT;
    }
}

static void on_http_done(void *opaque, const pq_http_result_t *res)
{
    pq_job_t *j = opaque;
    pq_worker_t *w = j->w;
    const pq_target_t *t = &j->route->targets[j->target];
    const pq_provider_ops_t *ops = pq_provider_find(t->p->type);
    json_t *completion = NULL, *total;
    pq_provider_fault_t fault;
    char msg[256];
    pq_err_t err;
    act_t act;
    int64_t tokens = -1;
    int probe = j->probe, failure, verbatim = 0;

    memset(&fault, 0, sizeof(fault));
    j->http = NULL;
    msg[0] = '\0';
    if (res->err == PQ_OK && res->streamed && j->st) {
        err = stream_outcome(j, t, &completion, &fault, msg, sizeof(msg));
    } else if (res->err == PQ_OK && !j->st && ops->answer_as_is &&
               pq_err_from_http_status(res->status) == PQ_OK &&
               ops->answer_as_is(t, res->body, res->body_len, &tokens)) {
        err = PQ_OK; /* the answer is taken as it is: no completion object is built */
        verbatim = 1;
    } else if (res->err == PQ_OK) {
        /* no verbatim flag: for an adapter with answer_as_is it would repeat the check that
         * just said no, and the others never set it */
        err = ops->parse_response(t, res->status, res->body, res->body_len, &completion, NULL,
                                  &fault, msg, sizeof(msg));
    } else if (res->streamed && j->st && res->err != PQ_ERR_TIMEOUT && res->err != PQ_ERR_CONNECT &&
               pq_stream_errstr(j->st)[0]) {
        err = res->err; /* the decoder stopped the transfer: malformed, too large */
        snprintf(msg, sizeof(msg), "%s: stream: %s", t->provider, pq_stream_errstr(j->st));
    } else {
        err = res->err;
        if (err == PQ_ERR_TOO_LARGE)
            snprintf(msg, sizeof(msg), "%s answered more than max_response_bytes", t->provider);
        else
            snprintf(msg, sizeof(msg), "%s: %s", t->provider, res->detail);
    }
    if (pq_prov_uses_tokens(j->prov) && err == PQ_ERR_AUTH)
        pq_prov_token_invalidate(j->prov, j->key, j->token_gen);
    if (completion) {
        total = json_object_get(json_object_get(completion, "usage"), "total_tokens");
        if (json_is_integer(total))
            tokens = json_integer_value(total);
    }
    pq_attempt_release_slot(j, tokens, 0);
    j->probe = 0;
    /* health: connect, timeouts, 5xx, malformed and 429s without Retry-After fail the circuit;
     * a 429 with Retry-After and refusals prove the provider answers */
    failure = pq_err_is_retryable(err) && !(err == PQ_ERR_RATE_LIMITED && res->retry_after_ms >= 0);
    if (j->circ)
        pq_circuit_record(j->circ, failure, probe);
    if (err == PQ_OK) {
        attempt_note(j, t, err, res->status, res->elapsed_ms, msg, NULL, NULL);
        if (j->circ)
            pq_circuit_key_ok(j->circ, j->key);
        /* the provider's own bytes go into the records when the adapter took them unchanged */
        pq_jobrec_set_response(j, completion, verbatim ? res->body : NULL, res->body_len);
        j->err = PQ_OK;
        j->http_status = res->status;
        j->last_target = t;
        if (j->st)
            pq_jobstream_relay_usage(j, completion);
        pq_jobstream_clear(j);
        pq_jobstream_prefill_drop(j);
        j->hooks->cache_store(j);
        j->hooks->finish(j, "succeeded", PQ_OK, NULL);
        return;
    }
    act = act_of(j, t, err, res->status, res->timeout);
    if (act == ACT_AFRESH)
        pq_jobstream_flush(j); /* the restart entry; the same target is called without it */
    else
        pq_jobstream_failed(j, err);
    pq_jobstream_clear(j);
    pq_counter_add(w->m.provider_errors, 1);
    attempt_note(j, t, err, res->status, res->elapsed_ms, msg, act_name(act),
                 err == PQ_ERR_TIMEOUT ? pq_http_timeout_name(res->timeout) : NULL);
    attempt_failed(j, act, err, res->status, res->retry_after_ms, msg,
                   fault.code[0] || fault.reason[0] || fault.key_wide ? &fault : NULL);
}

/* The timeouts of the next call on t: the target's, the total cut to the budget left (less
 * reserve_ms while later targets remain, but at least half of what is left). Returns 0, or -1
 * when the budget cannot hold an attempt on t (then the next target gets the rest). */
static int attempt_timeouts(pq_job_t *j, const pq_target_t *t, pq_timeouts_t *to)
{
    int64_t left = budget_left(j), cap;

    *to = t->timeouts;
    if (left == INT64_MAX)
        return 0;
    cap = left;
    if (later_target(j)) {
        cap = left - j->route->reserve_ms;
        if (cap < left / 2)
            cap = left / 2;
    }
    if (cap < MIN_ATTEMPT_MS)
        return -1;
    if (cap < to->total_ms)
        to->total_ms = (int)cap;
    return 0;
}

/* Builds and sends the call with key (an API key, an exchanged token, or NULL). */
static void job_send(pq_job_t *j, const char *key)
{
    pq_worker_t *w = j->w;
    const pq_target_t *t = &j->route->targets[j->target];
    const pq_provider_ops_t *ops = pq_provider_find(t->p->type);
    pq_provider_req_t req;
    pq_timeouts_t to;
    char msg[256] = "";
    pq_err_t err;

    if (attempt_timeouts(j, t, &to) != 0) {
        pq_attempt_release_slot(j, -1, 1);
        pq_attempt_give_back_probe(j);
        snprintf(msg, sizeof(msg), "the route's budget left is kept for its later targets");
        attempt_note(j, t, PQ_ERR_TIMEOUT, 0, -1, msg, NULL, NULL);
        next_target(j);
        return;
    }
    memset(&req, 0, sizeof(req));
    pq_jobstream_clear(j);
    j->stream_usage = json_is_true(
        json_object_get(json_object_get(j->env.request, "stream_options"), "include_usage"));
    if (json_is_true(json_object_get(j->env.request, "stream")) && ops->build_stream_request) {
        /* a cut answer the client has part of: continued here, or it restarts now */
        json_t *with = NULL;

        if (!pq_target_prefill(t))
            pq_jobstream_flush(j);
        else
            with = pq_jobstream_prefill_request(j, j->env.request);
        err =
            ops->build_stream_request(t, with ? with : j->env.request, key, &req, msg, sizeof(msg));
        json_decref(with);
        if (err == PQ_OK &&
            (!(j->st = pq_stream_new(pq_stream_format_for(t->p->type), 0, msg, sizeof(msg))) ||
             !(j->sa = pq_stream_asm_new(w->max_response)))) {
            pq_provider_req_clear(&req);
            pq_jobstream_clear(j);
            snprintf(msg, sizeof(msg), "out of memory for the stream decoder");
            err = PQ_ERR_NOMEM;
        } else if (err == PQ_OK && with && pq_jobstream_prefill_seed(j) != 0) {
            /* the request carries the prefill: never sent without its assembler seeded */
            pq_provider_req_clear(&req);
            pq_jobstream_clear(j);
            snprintf(msg, sizeof(msg), "out of memory for the continued stream");
            err = PQ_ERR_NOMEM;
        } else if (err == PQ_OK) {
            pq_stream_skip_malformed(j->st, t->p->stream_malformed &&
                                                strcmp(t->p->stream_malformed, "skip") == 0);
        }
    } else {
        pq_jobstream_flush(j);
        err = ops->build_request(t, j->env.request, key, &req, msg, sizeof(msg));
    }
    if (err != PQ_OK) {
        /* the target cannot express the request (or its config is unusable): skip it */
        pq_attempt_release_slot(j, -1, 1);
        pq_attempt_give_back_probe(j);
        if (err == PQ_ERR_UNSUPPORTED)
            pq_counter_add(w->m.skips, 1);
        attempt_note(j, t, err, 0, -1, msg, NULL, NULL);
        note_error(j, t, err, 0, msg, NULL);
        next_target(j);
        return;
    }
    if (pq_prov_uses_tokens(j->prov))
        j->token_gen = pq_prov_token_gen(j->prov, j->key);
    j->attempts++;
    j->pass_attempts++;
    pq_counter_add(w->m.provider_calls, 1);
    if (j->st)
        j->http = pq_http_post_stream(job_http(j), req.url, req.headers, req.body, req.body_len,
                                      &to, w->max_response, pq_jobstream_on_data, on_http_done, j);
    else
        j->http = pq_http_post_timed(job_http(j), req.url, req.headers, req.body, req.body_len, &to,
                                     w->max_response, on_http_done, j);
    req.headers = NULL;
    req.body = NULL;
    pq_provider_req_clear(&req);
    if (!j->http) {
        pq_jobstream_clear(j);
        pq_attempt_release_slot(j, -1, 1);
        pq_attempt_give_back_probe(j);
        note_error(j, t, PQ_ERR_INTERNAL, 0, "could not start the HTTP request", NULL);
        j->any_retryable = 1;
        pq_attempt_backoff(j, pq_attempt_backoff_ms(t->p, ++j->tries));
        return;
    }
    j->state = JS_CALL;
}

static void on_token(void *opaque, const char *token, pq_err_t err)
{
    pq_job_t *j = opaque;
    const pq_target_t *t = &j->route->targets[j->target];
    char msg[160];
    act_t act;

    if (token) {
        job_send(j, token);
        return;
    }
    pq_attempt_release_slot(j, -1, 1);
    pq_attempt_give_back_probe(j);
    snprintf(msg, sizeof(msg), "%s: token exchange failed (%s)", t->provider, pq_err_name(err));
    act = act_of(j, t, err, 0, PQ_HTTP_TIMEOUT_NONE);
    attempt_note(j, t, err, 0, -1, msg, act_name(act), NULL);
    j->refreshed = 1; /* a fresh token was just asked for */
    attempt_failed(j, act, err, 0, -1, msg, NULL);
}

/* A slot (and key) is ours. */
static void job_granted(pq_job_t *j, int key)
{
    const char *token = NULL;
    pq_err_t err = PQ_OK;

    j->slot_held = 1;
    j->key = key;
    if (!pq_prov_uses_tokens(j->prov)) {
        job_send(j, pq_prov_key(j->prov, key));
        return;
    }
    j->tw.cb = on_token;
    j->tw.opaque = j;
    switch (pq_prov_token(j->prov, key, &j->tw, &token, &err)) {
    case 0:
        job_send(j, token);
        break;
    case 1:
        j->state = JS_TOKEN;
        break;
    default:
        on_token(j, NULL, err);
        break;
    }
}

/* No key of the target is usable for this job right now. */
static void job_no_key(pq_job_t *j, pq_err_t err, int64_t wake)
{
    const pq_target_t *t = &j->route->targets[j->target];
    int64_t wait = wake - pq_mono_ms();
    char msg[200];

    pq_attempt_give_back_probe(j);
    if (err == PQ_ERR_RATE_LIMITED) {
        if (wait < 0)
            wait = 0;
        /* wait for the key only when no later target can take the call now */
        if (wait <= t->p->max_retry_wait_ms && j->tries < t->p->retries_per_target &&
            !deadline_passed(j, wait) && budget_allows_wait(j, wait) && !later_target_ready(j)) {
            j->tries++;
            pq_attempt_backoff(j, wait);
            return;
        }
        snprintf(msg, sizeof(msg), "every key of %s is resting after rate limits for %s",
                 t->provider, t->model);
    } else {
        snprintf(msg, sizeof(msg), "every key of %s was refused", t->provider);
    }
    attempt_note(j, t, err, 0, -1, msg, NULL, NULL);
    if (err == PQ_ERR_RATE_LIMITED || j->err == PQ_OK || j->last_target != t)
        note_error(j, t, err, 0, msg, NULL); /* else keep the refusal this target answered */
    next_target(j);
}

static void on_slot(void *opaque, int key, pq_err_t err, int64_t wake_ms)
{
    pq_job_t *j = opaque;

    evtimer_del(&j->timer); /* the deadline watch */
    if (key < 0)
        job_no_key(j, err, wake_ms);
    else
        job_granted(j, key);
}

/* The current target t cannot take this job (no call made): recorded in the attempt log and,
 * when noted, as the job's last error; the walk goes on with the next target. */
static void skip_target(pq_job_t *j, const pq_target_t *t, pq_err_t why, const char *msg, int noted)
{
    if (why != PQ_ERR_CONTEXT_LENGTH && why != PQ_ERR_REFUSED)
        pq_counter_add(j->w->m.skips, 1);
    attempt_note(j, t, why, 0, -1, msg, NULL, NULL);
    if (noted)
        note_error(j, t, why, 0, msg, NULL);
    j->target++;
    j->tries = 0;
    j->excluded = 0;
}

void pq_attempt_run(pq_job_t *j)
{
    pq_worker_t *w = j->w;
    char msg[256];

    /* Lanes: a bulk job asks for a provider slot only while no interactive job is in flight
     * (they share the provider's slots, the sim/provider and this loop); it waits at most
     * LANE_MAX_WAIT_MS, so steady interactive traffic cannot starve the bulk lane. */
    j->hooks->lane_leave(j); /* its wait timer fired, or the lane was released */
    if (j->topic == PQ_T_BULK && w->iinflight > 0 && !j->lane_pass && !w->stopping) {
        j->state = JS_BACKOFF; /* the timer (or pq_job_lanes_release) attempts again */
        TAILQ_INSERT_TAIL(&w->lane_wait, j, lane_link);
        j->in_lane = 1;
        j->lane_pass = 1;
        timer_in(j, LANE_MAX_WAIT_MS);
        return;
    }
    j->lane_pass = 0;

    for (;;) {
        const pq_target_t *t;
        int a, key = -1, rc;
        int64_t wake = 0;
        pq_err_t err = PQ_OK;

        if (deadline_passed(j, 0)) {
            j->hooks->finish(j, "expired", PQ_ERR_EXPIRED, "deadline passed while retrying");
            return;
        }
        if (j->target >= j->route->ntargets || j->pass_attempts >= w->conf->max_attempts) {
            job_exhausted(j);
            return;
        }
        t = &j->route->targets[j->target];
        j->prov = pq_provs_get(j->gen->provs, t->p);
        j->circ = j->prov ? pq_prov_circuit(j->prov, t) : NULL;
        if (!pq_provider_find(t->p->type) || !j->prov) {
            snprintf(msg, sizeof(msg), "provider type \"%s\" (%s) is not supported", t->p->type,
                     t->provider);
            skip_target(j, t, PQ_ERR_UNSUPPORTED, msg, 1);
            continue;
        }
        if (!j->probe && !target_eligible(j, t, &err)) {
            /* not an error of its own: the refusal that made it ineligible stays the job's */
            skip_target(j, t, err,
                        err == PQ_ERR_CONTEXT_LENGTH
                            ? "its max_context_tokens is not larger than the target that refused "
                              "the prompt's length"
                            : "its provider refused the request already",
                        0);
            continue;
        }
        if (!j->probe) {
            a = j->circ ? pq_circuit_allow(j->circ) : 1;
            if (a == 0) {
                snprintf(msg, sizeof(msg), "circuit of %s/%s is open", t->provider, t->model);
                skip_target(j, t, PQ_ERR_CIRCUIT_OPEN, msg, 1);
                continue;
            }
            j->probe = a == 2;
        }
        j->sw.cost = j->prov && pq_prov_conf(j->prov)->tpm > 0 ? job_cost(j) : 1.0;
        j->cost = j->sw.cost;
        j->sw.excluded = j->excluded;
        j->sw.circ = j->circ;
        j->sw.cb = on_slot;
        j->sw.opaque = j;
        j->sw.priority = j->topic == PQ_T_REQUESTS; /* the interactive lane goes first */
        rc = pq_prov_acquire(j->prov, &j->sw, &key, &err, &wake);
        if (rc == 0) {
            job_granted(j, key);
        } else if (rc == 1) {
            j->state = JS_QUEUED;
            if (j->env.deadline_ms > 0)
                timer_in(j, j->env.deadline_ms - pq_now_ms());
        } else {
            job_no_key(j, err, wake);
        }
        return;
    }
}
