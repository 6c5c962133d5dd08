/* OpenAI Batch API subset (DESIGN.md §4, §5) on the bulk lane.
 *
 * Redis: the batch is the hash <prefix>batch:{tenant}:{id} (id, status, endpoint,
 * input_file_id, completion_window, metadata JSON, errors JSON, the *_at times in unix seconds,
 * total, completed, failed, lines, final, output_file_id, error_file_id), listed in the sorted
 * set <prefix>batches:{tenant} (score 0, lexical order of "batch_" + time-sortable ids) and,
 * while not terminal, in the set <prefix>batches:active ("tenant:id"). The error-file lines of
 * invalid input lines wait in <prefix>batch:{tenant}:{id}:invalid.
 *
 * Create: POST validates, claims the Idempotency-Key (same key space as jobs), checks the file
 * and writes the batch (status validating), answers, then a background task on the loop reads
 * the file and walks its lines in chunks: each valid line becomes the job "{batch id}-{line}"
 * (line = 1-based physical line) whose record is created by one EVAL per chunk with the extra
 * fields batch (the batch key) and custom_id, and is then produced to <prefix>bulk; at most
 * BATCH_WINDOW lines wait for delivery reports at a time. A failed delivery goes to the spool
 * like any job (G1); if the spool refuses it, the line is produced again later. Invalid lines go
 * to the error file and count as failed. When every line is durable the batch moves to
 * in_progress with its total.
 *
 * Counting: the worker's terminal compare-and-set (pq_script_job_finish) and the broker's
 * cancel scripts HINCRBY the batch's completed / failed when they win.
 *
 * Finalize: a GET (or thread 0's timer) that sees completed + failed == total moves the status
 * to finalizing with a compare-and-set (the once-guard: only one caller wins, in any process),
 * then reads the line records in chunks (one EVAL returns a range of HMGETs), writes the output
 * and error files and sets the final status (completed, or cancelled / expired) with its time.
 *
 * Cancel and expiry: status cancelling, then the queued and parked lines are cancelled in
 * chunks (one EVAL per range, counting each as failed); running lines finish on their own; the
 * batch is finalized as cancelled (or expired) once the counters add up. */
#include "broker.h"
#include "api.h"
#include "batch.h"
#include "bspool.h"
#include "files.h"
#include "http.h"
#include "idem.h"
#include "ratelimit.h"
#include "rconn.h"
#include "slot.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>
#include <hiredis/hiredis.h>
#include <jansson.h>

#include "promptq/keys.h"
#include "promptq/log.h"
#include "promptq/scripts.h"
#include "promptq/util.h"

#define BATCH_CHUNK        256  /* lines per record-creating EVAL */
#define BATCH_WINDOW       2048 /* lines waiting for delivery reports */
#define BATCH_READ_CHUNK   256  /* line records per reading EVAL */
#define BATCH_RETRY_MS     200
#define BATCH_TICK_MS      1000
#define BATCH_EXPIRE_S     (24 * 3600)
#define BATCH_META_MAX     16
#define BATCH_LIST_MAX     100
#define BATCH_LIST_DEFAULT 20
#define BATCH_ERRORS_MAX   100
#define BATCH_ID_MAX       63 /* longest batch id */
/* A task holds <batch key>:task while it runs and refreshes it; the timer restarts the work of
 * a batch whose task is gone (its broker stopped or died) once the lock has expired. */
#define BATCH_LOCK_MS    "10000"
#define BATCH_REFRESH_MS 3000
#define BATCH_STALE_S    5

/* Creates the records of a chunk. KEYS[1] batch key; ARGV[1] job key prefix, ARGV[2] now ms,
 * ARGV[3] ttl ms, then (line, request hash, route, custom_id) per line. */
static const char create_script[] =
    "local n = 0\n"
    "for i = 4, #ARGV, 4 do\n"
    "  local k = ARGV[1] .. ARGV[i]\n"
    "  if redis.call('EXISTS', k) == 0 then\n"
    "    redis.call('HSET', k, 'status', 'queued', 'request_hash', ARGV[i + 1], 'created_at',\n"
    "      ARGV[2], 'updated_at', ARGV[2], 'route', ARGV[i + 2], 'attempts', 0,\n"
    "      'deliveries', 0, 'batch', KEYS[1], 'custom_id', ARGV[i + 3])\n"
    "    redis.call('PEXPIRE', k, ARGV[3])\n"
    "    n = n + 1\n"
    "  end\n"
    "end\n"
    "return n\n";

/* Reads lines ARGV[2]..ARGV[3] of prefix ARGV[1]: {status, result, custom_id} each. */
static const char read_script[] =
    "local out = {}\n"
    "for i = tonumber(ARGV[2]), tonumber(ARGV[3]) do\n"
    "  out[#out + 1] = redis.call('HMGET', ARGV[1] .. i, 'status', 'result', 'custom_id')\n"
    "end\n"
    "return out\n";

/* Cancels the queued or parked lines ARGV[2]..ARGV[3] of prefix ARGV[1] with status ARGV[4];
 * result = ARGV[5] .. job id .. ARGV[6]; ARGV[7] error JSON, ARGV[8] now ms. Each one counts
 * as failed in its batch. */
static const char cancel_script[] =
    "local n = 0\n"
    "for i = tonumber(ARGV[2]), tonumber(ARGV[3]) do\n"
    "  local k = ARGV[1] .. i\n"
    "  local v = redis.call('HMGET', k, 'status', 'batch')\n"
    "  if v[1] == 'queued' or v[1] == 'parked' then\n"
    "    redis.call('HSET', k, 'status', ARGV[4], 'result', ARGV[5] .. ARGV[9] .. i .. ARGV[6],\n"
    "      'error', ARGV[7], 'updated_at', ARGV[8])\n"
    "    if v[2] and v[2] ~= '' then redis.call('HINCRBY', v[2], 'failed', 1) end\n"
    "    n = n + 1\n"
    "  end\n"
    "end\n"
    "return n\n";

enum { BT_CREATE = 1, BT_FINAL, BT_CANCEL };

typedef struct bline_s {
    struct pq_btask_s *task;
    struct bline_s *next;
    size_t len;
    char id[PQ_ID_MAX + 1];
    char payload[];
} bline_t;

typedef struct pq_btask_s {
    pq_bthread_t *t;
    struct pq_btask_s *next;
    int kind;
    int pending;  /* Redis replies outstanding */
    int inflight; /* lines produced or spooled, not yet durable */
    int finished; /* nothing more to send; freed when pending and inflight are 0 */
    int busy;     /* a chunk's reply is outstanding */
    int locked;   /* holds <batch key>:task (one task per batch, any process) */
    int locking;  /* the SET NX is on its way */
    struct event *lock_ev;
    char lkey[540];
    struct event *ev;
    char tenant[PQ_TENANT_MAX + 1];
    char id[64];
    char bkey[512];
    char jprefix[512]; /* job key prefix "<prefix>job:{tenant}:{id}-" */
    /* create */
    char fkey[512];
    char endpoint[64];
    char *body;
    size_t len, pos;
    int have_body;
    uint32_t line;
    uint32_t nreq, ninvalid;
    json_t *seen;   /* custom_id set */
    json_t *errors; /* first BATCH_ERRORS_MAX invalid lines for the batch's errors */
    struct evbuffer *invalid;
    bline_t *chunk, *retry; /* lines waiting for their records; lines to produce again */
    json_t *cargs;          /* the chunk's EVAL arguments until its reply */
    /* final / cancel */
    uint32_t lines, cur;
    int step;
    struct evbuffer *out, *err;
    char final[16];
    char cancel_status[16];
} pq_btask_t;

/* ---- keys ---- */

static int bkey_of(pq_bthread_t *t, char *buf, size_t size, const char *tenant, const char *id)
{
    int n = snprintf(buf, size, "%sbatch:%s:%s", t->bc->conf->redis_prefix, tenant, id);

    return n > 0 && (size_t)n < size ? n : -1;
}

static int id_ok(const char *id)
{
    return !strncmp(id, "batch_", 6) && strlen(id) <= BATCH_ID_MAX && pq_id_valid(id);
}

/* ---- tasks ---- */

static void task_step(evutil_socket_t fd, short what, void *arg);

static void lock_owner(pq_bthread_t *t, char *buf, size_t size)
{
    snprintf(buf, size, "%s/%d", t->b->reply_channel, t->no);
}

static void lock_refresh(evutil_socket_t fd, short what, void *arg)
{
    pq_btask_t *bt = arg;
    char owner[600];

    if (!bt->locked)
        return;
    lock_owner(bt->t, owner, sizeof(owner));
    pq_rconn_sendf(bt->t, NULL, NULL, "SET %s %s PX %s", bt->lkey, owner, BATCH_LOCK_MS);
}

static pq_btask_t *task_new(pq_bthread_t *t, int kind, const char *tenant, const char *id)
{
    pq_btask_t *bt = calloc(1, sizeof(*bt));

    if (!bt)
        return NULL;
    bt->t = t;
    bt->kind = kind;
    bt->ev = evtimer_new(t->base, task_step, bt);
    bt->lock_ev = event_new(t->base, -1, EV_PERSIST, lock_refresh, bt);
    if (!bt->ev || !bt->lock_ev) {
        if (bt->ev)
            event_free(bt->ev);
        free(bt);
        return NULL;
    }
    pq_strlcpy(bt->tenant, tenant, sizeof(bt->tenant));
    pq_strlcpy(bt->id, id, sizeof(bt->id));
    bkey_of(t, bt->bkey, sizeof(bt->bkey), tenant, id);
    snprintf(bt->jprefix, sizeof(bt->jprefix), "%sjob:%s:%s-", t->bc->conf->redis_prefix, tenant,
             id);
    snprintf(bt->lkey, sizeof(bt->lkey), "%s:task", bt->bkey);
    bt->next = t->btasks;
    t->btasks = bt;
    return bt;
}

static void lines_free(bline_t *l)
{
    while (l) {
        bline_t *n = l->next;

        free(l);
        l = n;
    }
}

static void task_free(pq_btask_t *bt)
{
    pq_bthread_t *t = bt->t;

    for (pq_btask_t **p = &t->btasks; *p; p = &(*p)->next) {
        if (*p == bt) {
            *p = bt->next;
            break;
        }
    }
    event_free(bt->ev);
    event_free(bt->lock_ev);
    free(bt->body);
    json_decref(bt->seen);
    json_decref(bt->errors);
    json_decref(bt->cargs);
    if (bt->invalid)
        evbuffer_free(bt->invalid);
    if (bt->out)
        evbuffer_free(bt->out);
    if (bt->err)
        evbuffer_free(bt->err);
    lines_free(bt->chunk);
    lines_free(bt->retry);
    free(bt);
}

static void task_check(pq_btask_t *bt)
{
    if (bt->finished && bt->pending == 0 && bt->inflight == 0) {
        if (bt->locked)
            pq_rconn_sendf(bt->t, NULL, NULL, "DEL %s", bt->lkey);
        task_free(bt);
    }
}

static void task_wake(pq_btask_t *bt, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};

    if (!bt->finished && !event_pending(bt->ev, EV_TIMEOUT, NULL))
        event_add(bt->ev, &tv);
}

static int task_send(pq_btask_t *bt, void (*cb)(redisAsyncContext *, void *, void *), int argc,
                     const char **argv, const size_t *lens)
{
    size_t l[32];

    if (!lens) {
        for (int i = 0; i < argc && i < 32; i++)
            l[i] = strlen(argv[i]);
        lens = l;
    }
    if (pq_rconn_send(bt->t, cb, bt, argc, argv, lens))
        return -1;
    bt->pending++;
    return 0;
}

/* A task step's command: sent, the task is busy until the reply; not sent (Redis is down),
 * the step runs again after BATCH_RETRY_MS. */
static void task_send_step(pq_btask_t *bt, void (*cb)(redisAsyncContext *, void *, void *),
                           int argc, const char **argv)
{
    if (task_send(bt, cb, argc, argv, NULL) == 0)
        bt->busy = 1;
    else
        task_wake(bt, BATCH_RETRY_MS);
}

/* The start of every reply to a task step's command: the task is no longer busy. Returns
 * nonzero when the command failed (no reply or an error reply). */
static int task_step_failed(redisAsyncContext *ac, void *r, pq_btask_t *bt)
{
    const redisReply *reply = r;

    pq_rconn_replied(ac, r);
    bt->pending--;
    bt->busy = 0;
    return !reply || reply->type == REDIS_REPLY_ERROR;
}

/* Status change with the batch_status script; cb may be NULL (no interest in the answer). */
static int set_status(pq_bthread_t *t, void (*cb)(redisAsyncContext *, void *, void *), void *priv,
                      const char *bkey, const char *from, const char *to, const char *at_field,
                      int nextra, const char **extra, const size_t *extra_lens)
{
    const char *argv[24];
    size_t lens[24];
    char now[24];
    int n = 0;

    snprintf(now, sizeof(now), "%lld", (long long)(pq_now_ms() / 1000));
    argv[n++] = "EVALSHA";
    argv[n++] = pq_rconn_sha(pq_bscript_batch_status);
    argv[n++] = "1";
    argv[n++] = bkey;
    argv[n++] = from;
    argv[n++] = to;
    argv[n++] = at_field;
    argv[n++] = now;
    for (int i = 0; i < n; i++)
        lens[i] = strlen(argv[i]);
    for (int i = 0; i < nextra && n < 24; i++) {
        argv[n] = extra[i];
        lens[n++] = extra_lens ? extra_lens[i] : strlen(extra[i]);
    }
    return pq_rconn_send(t, cb, priv, n, argv, lens);
}

/* ---- create ---- */

static void line_delivered_or_spooled(bline_t *l, int ok)
{
    pq_btask_t *bt = l->task;

    if (!ok) {
        l->next = bt->retry;
        bt->retry = l;
        task_wake(bt, BATCH_RETRY_MS);
        return;
    }
    bt->inflight--;
    free(l);
    if (bt->inflight < BATCH_WINDOW / 2 || bt->inflight == 0)
        task_wake(bt, 0);
    task_check(bt);
}

static void line_spooled(void *arg, pq_err_t err)
{
    line_delivered_or_spooled(arg, err == PQ_OK);
}

static void line_produce(bline_t *l)
{
    pq_btask_t *bt = l->task;
    pq_bthread_t *t = bt->t;
    rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR__TRANSPORT;

    if (!pq_bspool_kafka_down(t) && !t->kafka_fatal && t->rk && t->rkt_bulk)
        err = rd_kafka_producev(
            t->rk, RD_KAFKA_V_RKT(t->rkt_bulk), RD_KAFKA_V_VALUE(l->payload, l->len),
            RD_KAFKA_V_KEY(l->id, strlen(l->id)), RD_KAFKA_V_OPAQUE(l), RD_KAFKA_V_END);
    if (!err)
        return;
    if (pq_bspool_append_fn(t, t->bc->topic_bulk, l->id, l->payload, l->len, line_spooled, l) ==
        PQ_OK)
        return;
    line_delivered_or_spooled(l, 0);
}

void pq_batch_delivered(pq_bthread_t *t, const rd_kafka_message_t *m)
{
    bline_t *l = m->_private;

    if (!l)
        return;
    if (!m->err) {
        if (atomic_exchange(&t->kafka_up, 1) != 1)
            pq_bspool_kafka_changed(t->b);
        line_delivered_or_spooled(l, 1);
        return;
    }
    PQ_DBG("batch line %s not delivered (%s): spooling", l->id, rd_kafka_err2str(m->err));
    if (pq_bspool_append_fn(t, t->bc->topic_bulk, l->id, l->payload, l->len, line_spooled, l) ==
        PQ_OK)
        return;
    line_delivered_or_spooled(l, 0);
}

static void invalid_line(pq_btask_t *bt, uint32_t line, const char *custom_id, const char *code,
                         const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void invalid_line(pq_btask_t *bt, uint32_t line, const char *custom_id, const char *code,
                         const char *fmt, ...)
{
    char msg[512], rid[96];
    va_list ap;
    json_t *o;
    char *text;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    bt->ninvalid++;
    snprintf(rid, sizeof(rid), "batch_req_%s_%u", bt->id + 6, line);
    o = json_pack("{s:s, s:o, s:n, s:{s:s, s:s}}", "id", rid, "custom_id",
                  custom_id ? json_string(custom_id) : json_null(), "response", "error", "code",
                  code, "message", msg);
    text = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (text) {
        evbuffer_add_printf(bt->invalid, "%s\n", text);
        free(text);
    }
    if (json_array_size(bt->errors) < BATCH_ERRORS_MAX)
        json_array_append_new(bt->errors, json_pack("{s:s, s:s, s:n, s:i}", "code", code, "message",
                                                    msg, "param", "line", (int)line));
}

/* Validates one line; on success appends a bline_t with its payload to bt->chunk and fills the
 * EVAL arguments. Returns 1 if a job line was added. */
static int line_parse(pq_btask_t *bt, const char *p, size_t n, uint32_t line, json_t *args)
{
    pq_bthread_t *t = bt->t;
    json_error_t jerr;
    json_t *o, *body, *env;
    const char *cid, *method, *url, *model;
    char id[PQ_ID_MAX + 1], errstr[256], lstr[16];
    pq_envelope_t e;
    char *doc, *payload;
    size_t plen;
    bline_t *l;
    int rc = 0;

    o = json_loadb(p, n, JSON_REJECT_DUPLICATES, &jerr);
    if (!o || !json_is_object(o)) {
        invalid_line(bt, line, NULL, "invalid_json_line", "line %u: not a JSON object%s%s", line,
                     o ? "" : ": ", o ? "" : pq_json_error_what(&jerr));
        json_decref(o);
        return 0;
    }
    cid = json_string_value(json_object_get(o, "custom_id"));
    if (!cid || !*cid || strlen(cid) > 512) {
        invalid_line(bt, line, NULL, "missing_custom_id",
                     "line %u: custom_id must be a non-empty string", line);
        goto out;
    }
    if (json_object_get(bt->seen, cid)) {
        invalid_line(bt, line, cid, "duplicate_custom_id",
                     "line %u: the custom_id %s is used by another line", line, cid);
        goto out;
    }
    json_object_set_new(bt->seen, cid, json_true());
    method = json_string_value(json_object_get(o, "method"));
    url = json_string_value(json_object_get(o, "url"));
    if (!method || strcmp(method, "POST") != 0) {
        invalid_line(bt, line, cid, "invalid_method", "line %u: method must be POST", line);
        goto out;
    }
    if (!url || strcmp(url, bt->endpoint) != 0) {
        invalid_line(bt, line, cid, "invalid_url", "line %u: url must be %s, the batch's endpoint",
                     line, bt->endpoint);
        goto out;
    }
    body = json_object_get(o, "body");
    model = json_string_value(json_object_get(body, "model"));
    if (!json_is_object(body) || !model) {
        invalid_line(bt, line, cid, "invalid_request",
                     "line %u: body must be an object with a model", line);
        goto out;
    }
    if (!pq_conf_route(t->bc->conf, model) || strlen(model) > PQ_BROKER_ROUTE_MAX) {
        invalid_line(bt, line, cid, "model_not_found", "line %u: no model (route) named %s", line,
                     model);
        goto out;
    }
    snprintf(id, sizeof(id), "%s-%u", bt->id, line);
    env = json_pack("{s:s, s:s, s:O, s:{s:s, s:s, s:i}}", "id", id, "tenant", bt->tenant, "request",
                    body, "metadata", "batch_id", bt->id, "custom_id", cid, "line", (int)line);
    doc = env ? json_dumps(env, JSON_COMPACT) : NULL;
    json_decref(env);
    if (!doc) {
        invalid_line(bt, line, cid, "internal", "line %u: out of memory", line);
        goto out;
    }
    if (pq_envelope_parse(doc, strlen(doc), &t->bc->limits, &e, errstr, sizeof(errstr)) != PQ_OK) {
        free(doc);
        invalid_line(bt, line, cid, "invalid_request", "line %u: %s", line, errstr);
        goto out;
    }
    free(doc);
    payload = pq_envelope_dump(&e, &plen);
    l = payload ? malloc(sizeof(*l) + plen + 1) : NULL;
    if (!l) {
        free(payload);
        pq_envelope_clear(&e);
        invalid_line(bt, line, cid, "internal", "line %u: out of memory", line);
        goto out;
    }
    l->task = bt;
    l->len = plen;
    pq_strlcpy(l->id, id, sizeof(l->id));
    memcpy(l->payload, payload, plen + 1);
    free(payload);
    l->next = bt->chunk;
    bt->chunk = l;
    snprintf(lstr, sizeof(lstr), "%u", line);
    json_array_append_new(args, json_string(lstr));
    json_array_append_new(args, json_string(e.request_hash));
    json_array_append_new(args, json_string(model));
    json_array_append_new(args, json_string(cid));
    pq_envelope_clear(&e);
    bt->nreq++;
    rc = 1;
out:
    json_decref(o);
    return rc;
}

static void chunk_created(redisAsyncContext *ac, void *r, void *priv)
{
    pq_btask_t *bt = priv;
    bline_t *l, *next;

    if (task_step_failed(ac, r, bt)) {
        /* the records may or may not exist: the script is idempotent, send it again */
        bt->step = 1;
        task_wake(bt, BATCH_RETRY_MS);
        return;
    }
    l = bt->chunk;
    bt->chunk = NULL;
    bt->step = 0;
    json_decref(bt->cargs);
    bt->cargs = NULL;
    for (; l; l = next) {
        next = l->next;
        l->next = NULL;
        bt->inflight++;
        line_produce(l);
    }
    task_wake(bt, 0);
    task_check(bt);
}

static int chunk_send(pq_btask_t *bt)
{
    json_t *args = bt->cargs;
    const pq_conf_t *conf = bt->t->bc->conf;
    size_t n = json_array_size(args), argc = 0;
    const char **argv = malloc((n + 8) * sizeof(*argv));
    char now[24], ttl[24];
    int rc;

    if (!argv)
        return -1;
    snprintf(now, sizeof(now), "%lld", (long long)pq_now_ms());
    snprintf(ttl, sizeof(ttl), "%lld", (long long)conf->result_ttl_s * 1000);
    argv[argc++] = "EVAL";
    argv[argc++] = create_script;
    argv[argc++] = "1";
    argv[argc++] = bt->bkey;
    argv[argc++] = bt->jprefix;
    argv[argc++] = now;
    argv[argc++] = ttl;
    for (size_t i = 0; i < n; i++)
        argv[argc++] = json_string_value(json_array_get(args, i));
    {
        size_t *lens = malloc(argc * sizeof(*lens));

        if (!lens) {
            free(argv);
            return -1;
        }
        for (size_t i = 0; i < argc; i++)
            lens[i] = strlen(argv[i]);
        rc = pq_rconn_send(bt->t, chunk_created, bt, (int)argc, argv, lens);
        free(lens);
    }
    free(argv);
    if (rc == 0) {
        bt->pending++;
        bt->busy = 1;
    }
    return rc;
}

static void start_cancel(pq_bthread_t *t, const char *tenant, const char *id, uint32_t lines,
                         const char *status);

/* The end of the create walk: total, lines, errors, the invalid lines and their failed count,
 * and validating -> in_progress, all at once and only the first time (a walk taken over from a
 * dead broker may reach it again). Returns the status after it. */
static void create_finished_cb(redisAsyncContext *ac, void *r, void *priv)
{
    const redisReply *reply = r;
    pq_btask_t *bt = priv;

    pq_rconn_replied(ac, r);
    bt->pending--;
    if (!reply || reply->type != REDIS_REPLY_STRING) {
        bt->finished = 0; /* send it again */
        bt->step = 2;
        task_wake(bt, BATCH_RETRY_MS);
        return;
    }
    if (!strcmp(reply->str, "cancelling")) {
        /* cancelled while validating: cancel the lines now (the lock goes first, on the same
         * connection, so the cancel task can take it) */
        pq_rconn_sendf(bt->t, NULL, NULL, "DEL %s", bt->lkey);
        bt->locked = 0;
        start_cancel(bt->t, bt->tenant, bt->id, bt->line, "cancelled");
    } else if (!strcmp(reply->str, "failed")) {
        /* every line invalid: terminal now, nothing to finalize */
        PQ_INFO("batch %s/%s: failed validation: all %u lines invalid", bt->tenant, bt->id,
                bt->ninvalid);
        pq_rconn_sendf(bt->t, NULL, NULL, "SREM %sbatches:active %s:%s",
                       bt->t->bc->conf->redis_prefix, bt->tenant, bt->id);
    }
    task_check(bt);
}

/* A batch none of whose lines is valid fails validation as OpenAI's does: status failed with
 * failed_at and the line errors, no in_progress, no output or error file (so no invalid lines
 * kept for one). */
static const char finish_script[] =
    "local s = redis.call('HGET', KEYS[1], 'status')\n"
    "if not s then return '' end\n"
    "if redis.call('HEXISTS', KEYS[1], 'lines') == 1 then return s end\n"
    "local all_bad = s == 'validating' and tonumber(ARGV[1]) > 0 and ARGV[3] == ARGV[1]\n"
    "if ARGV[5] ~= '' and not all_bad then redis.call('SET', KEYS[2], ARGV[5]) end\n"
    "if tonumber(ARGV[3]) > 0 then redis.call('HINCRBY', KEYS[1], 'failed', ARGV[3]) end\n"
    "redis.call('HSET', KEYS[1], 'total', ARGV[1], 'lines', ARGV[2])\n"
    "if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'errors', ARGV[4]) end\n"
    "if all_bad then\n"
    "  redis.call('HSET', KEYS[1], 'status', 'failed', 'failed_at', ARGV[6])\n"
    "  return 'failed'\n"
    "end\n"
    "if s == 'validating' then\n"
    "  redis.call('HSET', KEYS[1], 'status', 'in_progress', 'in_progress_at', ARGV[6])\n"
    "  return 'in_progress'\n"
    "end\n"
    "return s\n";

static void create_finish(pq_btask_t *bt)
{
    char total[24], lines[24], ninv[24], ikey[600], now[24];
    char *errors = NULL;
    const char *argv[11];
    size_t lens[11];

    snprintf(total, sizeof(total), "%u", bt->nreq + bt->ninvalid);
    snprintf(lines, sizeof(lines), "%u", bt->line);
    snprintf(ninv, sizeof(ninv), "%u", bt->ninvalid);
    snprintf(ikey, sizeof(ikey), "%s:invalid", bt->bkey);
    snprintf(now, sizeof(now), "%lld", (long long)(pq_now_ms() / 1000));
    if (bt->ninvalid) {
        json_t *eo = json_pack("{s:s, s:O}", "object", "list", "data", bt->errors);

        errors = eo ? json_dumps(eo, JSON_COMPACT) : NULL;
        json_decref(eo);
    }
    argv[0] = "EVAL";
    argv[1] = finish_script;
    argv[2] = "2";
    argv[3] = bt->bkey;
    argv[4] = ikey;
    argv[5] = total;
    argv[6] = lines;
    argv[7] = ninv;
    argv[8] = errors ? errors : "";
    argv[9] = bt->ninvalid ? (const char *)evbuffer_pullup(bt->invalid, -1) : "";
    argv[10] = now;
    for (int i = 0; i < 11; i++) /* argv[9] is not NUL-terminated */
        lens[i] = i == 9 ? (bt->ninvalid ? evbuffer_get_length(bt->invalid) : 0) : strlen(argv[i]);
    if (task_send(bt, create_finished_cb, 11, argv, lens) != 0) {
        free(errors);
        bt->step = 2;
        task_wake(bt, BATCH_RETRY_MS);
        return;
    }
    free(errors);
    if (bt->step != 2) {
        pq_counter_add(bt->t->b->m_batch_lines, bt->nreq);
        pq_counter_add(bt->t->b->m_batch_invalid, bt->ninvalid);
    }
    if (bt->step != 2)
        PQ_INFO("batch %s/%s: %u lines queued, %u invalid", bt->tenant, bt->id, bt->nreq,
                bt->ninvalid);
    bt->step = 0;
    bt->finished = 1;
}

static void body_read(redisAsyncContext *ac, void *r, void *priv)
{
    const redisReply *reply = r;
    pq_btask_t *bt = priv;

    pq_rconn_replied(ac, r);
    bt->pending--;
    if (!reply || reply->type == REDIS_REPLY_ERROR) {
        task_wake(bt, BATCH_RETRY_MS);
        return;
    }
    if (reply->type != REDIS_REPLY_STRING) {
        const char *extra[2] = {"errors", "{\"object\":\"list\",\"data\":[{\"code\":"
                                          "\"file_not_found\",\"message\":\"the input file is "
                                          "gone\",\"param\":\"input_file_id\",\"line\":null}]}"};

        set_status(bt->t, NULL, NULL, bt->bkey, "|validating|", "failed", "failed_at", 2, extra,
                   NULL);
        bt->finished = 1;
        task_check(bt);
        return;
    }
    bt->body = malloc(reply->len + 1);
    if (!bt->body) {
        task_wake(bt, BATCH_RETRY_MS);
        return;
    }
    memcpy(bt->body, reply->str, reply->len);
    bt->len = reply->len;
    bt->have_body = 1;
    task_wake(bt, 0);
}

static void create_step(pq_btask_t *bt)
{
    json_t *args;

    if (!bt->have_body) {
        const char *argv[3] = {"HGET", bt->fkey, "body"};

        if (task_send(bt, body_read, 3, argv, NULL))
            task_wake(bt, BATCH_RETRY_MS);
        return;
    }
    /* lines whose delivery failed and that the spool refused */
    while (bt->retry) {
        bline_t *l = bt->retry;

        bt->retry = l->next;
        l->next = NULL;
        line_produce(l);
    }
    if (bt->busy)
        return;
    if (bt->step == 2) { /* resend the finish */
        create_finish(bt);
        return;
    }
    if (bt->step == 1) { /* resend the chunk */
        if (chunk_send(bt) != 0)
            task_wake(bt, BATCH_RETRY_MS);
        return;
    }
    if (bt->pos >= bt->len) {
        if (bt->inflight == 0 && !bt->chunk && !bt->retry)
            create_finish(bt);
        return;
    }
    if (bt->inflight >= BATCH_WINDOW)
        return; /* woken by delivery reports */
    if (!pq_rconn_usable(bt->t)) {
        task_wake(bt, BATCH_RETRY_MS);
        return;
    }
    args = json_array();
    while (bt->pos < bt->len && json_array_size(args) < 4 * BATCH_CHUNK) {
        const char *p = bt->body + bt->pos, *nl = memchr(p, '\n', bt->len - bt->pos);
        size_t n = nl ? (size_t)(nl - p) : bt->len - bt->pos;
        size_t k = 0;

        bt->pos += n + (nl ? 1 : 0);
        bt->line++;
        while (k < n && (p[k] == ' ' || p[k] == '\t' || p[k] == '\r'))
            k++;
        if (k == n)
            continue; /* blank line */
        line_parse(bt, p, n, bt->line, args);
    }
    if (json_array_size(args) == 0) {
        json_decref(args);
        task_wake(bt, 0);
        return;
    }
    bt->cargs = args;
    if (chunk_send(bt) != 0) {
        /* keep the chunk and send it again */
        bt->step = 1;
        task_wake(bt, BATCH_RETRY_MS);
    }
}

/* ---- finalize ---- */

static void final_line(pq_btask_t *bt, uint32_t line, const redisReply *v)
{
    const char *status =
        v->elements > 0 && v->element[0]->type == REDIS_REPLY_STRING ? v->element[0]->str : NULL;
    const char *result =
        v->elements > 1 && v->element[1]->type == REDIS_REPLY_STRING ? v->element[1]->str : NULL;
    const char *cid =
        v->elements > 2 && v->element[2]->type == REDIS_REPLY_STRING ? v->element[2]->str : NULL;
    char rid[96], jid[PQ_ID_MAX + 1];
    json_t *res, *o;
    char *text;

    if (!status)
        return; /* an invalid line (already in the error file) */
    /* JSON_ALLOW_NUL: an answer may carry U+0000 (the worker stored it as "\u0000") */
    res = result ? json_loads(result, JSON_ALLOW_NUL, NULL) : NULL;
    snprintf(rid, sizeof(rid), "batch_req_%s_%u", bt->id + 6, line);
    snprintf(jid, sizeof(jid), "%s-%u", bt->id, line);
    if (!strcmp(status, "succeeded") && json_object_get(res, "response")) {
        o = json_pack("{s:s, s:s?, s:{s:i, s:s, s:O}, s:n}", "id", rid, "custom_id", cid,
                      "response", "status_code", 200, "request_id", jid, "body",
                      json_object_get(res, "response"), "error");
        text = o ? json_dumps(o, JSON_COMPACT) : NULL;
        if (text)
            evbuffer_add_printf(bt->out, "%s\n", text);
    } else {
        json_t *e = json_object_get(res, "error");
        const char *code = json_string_value(json_object_get(e, "type"));
        const char *msg = json_string_value(json_object_get(e, "message"));

        o = json_pack("{s:s, s:s?, s:n, s:{s:s, s:s}}", "id", rid, "custom_id", cid, "response",
                      "error", "code", code ? code : status, "message", msg ? msg : status);
        text = o ? json_dumps(o, JSON_COMPACT) : NULL;
        if (text)
            evbuffer_add_printf(bt->err, "%s\n", text);
    }
    free(text);
    json_decref(o);
    json_decref(res);
}

static void final_read(redisAsyncContext *ac, void *r, void *priv)
{
    const redisReply *reply = r;
    pq_btask_t *bt = priv;

    if (task_step_failed(ac, r, bt)) {
        task_wake(bt, BATCH_RETRY_MS);
        return;
    }
    if (bt->step == 0) { /* the invalid lines */
        if (reply->type == REDIS_REPLY_STRING)
            evbuffer_add(bt->err, reply->str, reply->len);
        bt->step = 1;
        bt->cur = 1;
    } else if (reply->type == REDIS_REPLY_ARRAY) {
        for (size_t i = 0; i < reply->elements; i++)
            if (reply->element[i]->type == REDIS_REPLY_ARRAY)
                final_line(bt, bt->cur + (uint32_t)i, reply->element[i]);
        bt->cur += (uint32_t)reply->elements;
        if (reply->elements == 0)
            bt->cur = bt->lines + 1;
    }
    task_wake(bt, 0);
}

/* Stores buf (when not empty) as the batch's file <batch id>_<kind>.jsonl with a new id
 * (id: 64 bytes) and adds field, id to extra at *n. Returns 0, or -1 when the file could not
 * be sent (the caller retries the whole step). */
static int result_file_store(pq_btask_t *bt, struct evbuffer *buf, const char *kind,
                             const char *field, char *id, const char **extra, int *n)
{
    size_t len = evbuffer_get_length(buf);
    char name[128];

    if (!len)
        return 0;
    pq_files_new_id(id, 64);
    snprintf(name, sizeof(name), "%s_%s.jsonl", bt->id, kind);
    if (pq_files_store(bt->t, bt->tenant, id, name, "batch_output",
                       (const char *)evbuffer_pullup(buf, -1), len, 0))
        return -1;
    extra[(*n)++] = field;
    extra[(*n)++] = id;
    return 0;
}

static void final_step(pq_btask_t *bt)
{
    pq_bthread_t *t = bt->t;
    char from[16], to[16], ikey[600];

    if (bt->busy)
        return;
    if (bt->step == 0) {
        const char *argv[2] = {"GET", ikey};

        snprintf(ikey, sizeof(ikey), "%s:invalid", bt->bkey);
        task_send_step(bt, final_read, 2, argv);
        return;
    }
    if (bt->cur <= bt->lines) {
        uint32_t last = bt->cur + BATCH_READ_CHUNK - 1;
        const char *argv[6] = {"EVAL", read_script, "0", bt->jprefix, from, to};

        if (last > bt->lines)
            last = bt->lines;
        snprintf(from, sizeof(from), "%u", bt->cur);
        snprintf(to, sizeof(to), "%u", last);
        task_send_step(bt, final_read, 6, argv);
        return;
    }
    /* all read: store the files, then the final status */
    {
        char out_id[64] = "", err_id[64] = "", active[600];
        const char *extra[4];
        size_t olen = evbuffer_get_length(bt->out), elen = evbuffer_get_length(bt->err);
        int n = 0;
        char at[32];

        if (!pq_rconn_usable(t)) {
            task_wake(bt, BATCH_RETRY_MS);
            return;
        }
        if (result_file_store(bt, bt->out, "output", "output_file_id", out_id, extra, &n) ||
            result_file_store(bt, bt->err, "error", "error_file_id", err_id, extra, &n)) {
            task_wake(bt, BATCH_RETRY_MS);
            return;
        }
        snprintf(at, sizeof(at), "%s_at", bt->final);
        set_status(t, NULL, NULL, bt->bkey, "|finalizing|", bt->final, at, n, extra, NULL);
        snprintf(active, sizeof(active), "%s:%s", bt->tenant, bt->id);
        pq_rconn_sendf(t, NULL, NULL, "SREM %sbatches:active %s", t->bc->conf->redis_prefix,
                       active);
        pq_counter_add(t->b->m_batches_finalized, 1);
        PQ_INFO("batch %s/%s %s: output %zu bytes, errors %zu bytes", bt->tenant, bt->id, bt->final,
                olen, elen);
        bt->finished = 1;
        task_check(bt);
    }
}

/* ---- cancel ---- */

static void cancel_read(redisAsyncContext *ac, void *r, void *priv)
{
    pq_btask_t *bt = priv;

    if (task_step_failed(ac, r, bt)) {
        task_wake(bt, BATCH_RETRY_MS);
        return;
    }
    bt->cur += BATCH_READ_CHUNK;
    if (bt->cur > bt->lines) {
        /* the timer restarts a cancel only while this mark is missing */
        pq_rconn_sendf(bt->t, NULL, NULL, "HSET %s cancel_done 1", bt->bkey);
        bt->finished = 1;
    }
    task_wake(bt, 0);
    task_check(bt);
}

static void cancel_step(pq_btask_t *bt)
{
    char from[16], to[16], now[24], ts[40], pre[160], post[600], err[200], idp[80];
    uint32_t last = bt->cur + BATCH_READ_CHUNK - 1;
    int expired = !strcmp(bt->cancel_status, "expired");
    const char *argv[12];

    if (bt->busy || bt->finished)
        return;
    if (last > bt->lines)
        last = bt->lines;
    snprintf(from, sizeof(from), "%u", bt->cur);
    snprintf(to, sizeof(to), "%u", last);
    snprintf(now, sizeof(now), "%lld", (long long)pq_now_ms());
    pq_time_format(pq_now_ms(), ts, sizeof(ts));
    snprintf(pre, sizeof(pre), "{\"id\":\"");
    snprintf(err, sizeof(err),
             "{\"type\":\"%s\",\"message\":\"batch %s\",\"provider\":null,\"status\":null}",
             bt->cancel_status, expired ? "expired" : "cancelled");
    snprintf(post, sizeof(post),
             "\",\"tenant\":\"%s\",\"status\":\"%s\",\"route\":null,\"provider\":null,"
             "\"model\":null,\"attempts\":0,\"error\":%s,\"metadata\":null,\"latency_ms\":0,"
             "\"created_at\":\"%s\",\"completed_at\":\"%s\",\"source\":null}",
             bt->tenant, bt->cancel_status, err, ts, ts);
    snprintf(idp, sizeof(idp), "%s-", bt->id);
    argv[0] = "EVAL";
    argv[1] = cancel_script;
    argv[2] = "0";
    argv[3] = bt->jprefix;
    argv[4] = from;
    argv[5] = to;
    argv[6] = bt->cancel_status;
    argv[7] = pre;
    argv[8] = post;
    argv[9] = err;
    argv[10] = now;
    argv[11] = idp;
    task_send_step(bt, cancel_read, 12, argv);
}

static void lock_cb(redisAsyncContext *ac, void *r, void *priv)
{
    const redisReply *reply = r;
    pq_btask_t *bt = priv;
    struct timeval tv = {BATCH_REFRESH_MS / 1000, (BATCH_REFRESH_MS % 1000) * 1000};

    pq_rconn_replied(ac, r);
    bt->pending--;
    bt->locking = 0;
    if (reply && reply->type == REDIS_REPLY_STATUS) {
        bt->locked = 1;
        event_add(bt->lock_ev, &tv);
        task_wake(bt, 0);
    } else if (reply && reply->type == REDIS_REPLY_NIL) {
        bt->finished = 1; /* another task runs this batch */
    } else {
        task_wake(bt, BATCH_RETRY_MS);
    }
    task_check(bt);
}

static void task_step(evutil_socket_t fd, short what, void *arg)
{
    pq_btask_t *bt = arg;

    if (bt->finished) {
        task_check(bt);
        return;
    }
    if (!bt->locked) {
        char owner[600];
        const char *argv[6] = {"SET", bt->lkey, owner, "NX", "PX", BATCH_LOCK_MS};

        lock_owner(bt->t, owner, sizeof(owner));
        if (!bt->locking && task_send(bt, lock_cb, 6, argv, NULL) == 0)
            bt->locking = 1;
        else if (!bt->locking)
            task_wake(bt, BATCH_RETRY_MS);
        return;
    }
    if (bt->kind == BT_CREATE)
        create_step(bt);
    else if (bt->kind == BT_FINAL)
        final_step(bt);
    else
        cancel_step(bt);
}

static void start_final(pq_bthread_t *t, const char *tenant, const char *id, uint32_t lines,
                        const char *final)
{
    pq_btask_t *bt = task_new(t, BT_FINAL, tenant, id);

    if (!bt)
        return;
    bt->lines = lines;
    bt->out = evbuffer_new();
    bt->err = evbuffer_new();
    pq_strlcpy(bt->final, final, sizeof(bt->final));
    task_wake(bt, 0);
}

static void start_cancel(pq_bthread_t *t, const char *tenant, const char *id, uint32_t lines,
                         const char *status)
{
    pq_btask_t *bt = task_new(t, BT_CANCEL, tenant, id);

    if (!bt)
        return;
    bt->lines = lines;
    bt->cur = 1;
    pq_strlcpy(bt->cancel_status, status, sizeof(bt->cancel_status));
    if (lines == 0)
        bt->finished = 1;
    task_wake(bt, 0);
    task_check(bt);
}

static void start_create(pq_bthread_t *t, const char *tenant, const char *id, const char *file_id,
                         const char *endpoint)
{
    pq_btask_t *bt = task_new(t, BT_CREATE, tenant, id);

    if (!bt)
        return;
    snprintf(bt->fkey, sizeof(bt->fkey), "%sfile:%s:%s", t->bc->conf->redis_prefix, tenant,
             file_id);
    pq_strlcpy(bt->endpoint, endpoint, sizeof(bt->endpoint));
    bt->seen = json_object();
    bt->errors = json_array();
    bt->invalid = evbuffer_new();
    task_wake(bt, 0);
}

/* A finalize guard reply: priv is a small heap record naming the batch. */
typedef struct {
    char tenant[PQ_TENANT_MAX + 1];
    char id[64];
    char final[16];
    uint32_t lines;
} fin_req_t;

static void final_guard_cb(redisAsyncContext *ac, void *r, void *priv)
{
    const redisReply *reply = r;
    pq_bthread_t *t = pq_rconn_replied(ac, r);
    fin_req_t *f = priv;

    if (reply && reply->type == REDIS_REPLY_INTEGER && reply->integer == 1)
        start_final(t, f->tenant, f->id, f->lines, f->final);
    free(f);
}

/* Tries to take the batch into finalizing (once, whoever wins). */
static void try_finalize(pq_bthread_t *t, const char *tenant, const char *id, uint32_t lines,
                         const char *final)
{
    fin_req_t *f = calloc(1, sizeof(*f));
    char bkey[512];
    const char *extra[2] = {"final", final};

    if (!f)
        return;
    pq_strlcpy(f->tenant, tenant, sizeof(f->tenant));
    pq_strlcpy(f->id, id, sizeof(f->id));
    pq_strlcpy(f->final, final, sizeof(f->final));
    f->lines = lines;
    bkey_of(t, bkey, sizeof(bkey), tenant, id);
    if (set_status(t, final_guard_cb, f, bkey, "|in_progress|cancelling|", "finalizing",
                   "finalizing_at", 2, extra, NULL))
        free(f);
}

/* ---- rendering ---- */

typedef struct {
    const char *f[32];
    const char *v[32];
    int n;
} fields_t;

static void fields_of(const redisReply *r, fields_t *fs)
{
    fs->n = 0;
    for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && i + 1 < r->elements && fs->n < 32;
         i += 2) {
        if (r->element[i]->type != REDIS_REPLY_STRING ||
            r->element[i + 1]->type != REDIS_REPLY_STRING)
            continue;
        fs->f[fs->n] = r->element[i]->str;
        fs->v[fs->n++] = r->element[i + 1]->str;
    }
}

static const char *fget(const fields_t *fs, const char *name)
{
    for (int i = 0; i < fs->n; i++)
        if (!strcmp(fs->f[i], name))
            return fs->v[i];
    return NULL;
}

static long long fint(const fields_t *fs, const char *name)
{
    const char *v = fget(fs, name);

    return v ? strtoll(v, NULL, 10) : 0;
}

static json_t *batch_object(const fields_t *fs, const char *status_override)
{
    static const char *const times[] = {"created_at",    "in_progress_at", "expires_at",
                                        "finalizing_at", "completed_at",   "failed_at",
                                        "expired_at",    "cancelling_at",  "cancelled_at"};
    static const char *const strs[] = {"endpoint", "input_file_id", "completion_window",
                                       "output_file_id", "error_file_id"};
    json_t *o = json_object(), *j;
    const char *v;

    json_object_set_new(o, "id", json_string(fget(fs, "id") ? fget(fs, "id") : ""));
    json_object_set_new(o, "object", json_string("batch"));
    for (size_t i = 0; i < sizeof(strs) / sizeof(strs[0]); i++) {
        v = fget(fs, strs[i]);
        json_object_set_new(o, strs[i], v && *v ? json_string(v) : json_null());
    }
    v = status_override ? status_override : fget(fs, "status");
    json_object_set_new(o, "status", json_string(v ? v : "failed"));
    v = fget(fs, "errors");
    j = v ? json_loads(v, 0, NULL) : NULL;
    json_object_set_new(o, "errors", j ? j : json_null());
    for (size_t i = 0; i < sizeof(times) / sizeof(times[0]); i++) {
        v = fget(fs, times[i]);
        json_object_set_new(o, times[i],
                            v && *v ? json_integer(strtoll(v, NULL, 10)) : json_null());
    }
    if (status_override && !fget(fs, "finalizing_at"))
        json_object_set_new(o, "finalizing_at", json_integer(pq_now_ms() / 1000));
    json_object_set_new(o, "request_counts",
                        json_pack("{s:I, s:I, s:I}", "total", (json_int_t)fint(fs, "total"),
                                  "completed", (json_int_t)fint(fs, "completed"), "failed",
                                  (json_int_t)fint(fs, "failed")));
    v = fget(fs, "metadata");
    j = v ? json_loads(v, 0, NULL) : NULL;
    json_object_set_new(o, "metadata", j ? j : json_null());
    return o;
}

/* What a read of the batch means: the final status to aim for once the counters add up, or
 * NULL when nothing is due. */
static const char *due_final(const fields_t *fs)
{
    const char *st = fget(fs, "status");
    long long total = fint(fs, "total");

    if (!st || total <= 0 || fint(fs, "completed") + fint(fs, "failed") < total)
        return NULL;
    if (!strcmp(st, "in_progress"))
        return "completed";
    if (!strcmp(st, "cancelling")) {
        const char *f = fget(fs, "final");

        return f && *f ? f : "cancelled";
    }
    return NULL;
}

/* ---- GET /v1/batches/{id} ---- */

static void get_reply(pq_slot_t *s, const void *r)
{
    fields_t fs;
    const char *final;

    fields_of(r, &fs);
    if (!fget(&fs, "status")) {
        pq_http_error(s->t, s->req, s->path, 404, "invalid_request_error",
                      "No such Batch object: %s", s->id);
        pq_slot_release(s);
        return;
    }
    final = due_final(&fs);
    if (final)
        try_finalize(s->t, s->tenant, s->id, (uint32_t)fint(&fs, "lines"), final);
    pq_http_reply_json(s, 200, batch_object(&fs, final ? "finalizing" : NULL));
    pq_slot_release(s);
}

/* ---- POST /v1/batches/{id}/cancel ---- */

static void cancel_cas_reply(pq_slot_t *s, const void *r)
{
    const redisReply *reply = r;
    const char *argv[2];

    /* whatever the outcome, answer with the batch as it is now; a batch still validating is
     * cancelled by its create walk when it ends (step -1) */
    if (reply->type == REDIS_REPLY_INTEGER && reply->integer == 1 && s->api.step >= 0)
        start_cancel(s->t, s->tenant, s->id, (uint32_t)s->api.step, "cancelled");
    argv[0] = "HGETALL";
    argv[1] = s->route; /* the batch key was kept here */
    {
        size_t lens[2] = {7, strlen(s->route)};

        if (pq_api_send(s, get_reply, 2, argv, lens)) {
            pq_api_unavailable(s->t, s->req, s->path);
            pq_slot_release(s);
        }
    }
}

static void cancel_reply(pq_slot_t *s, const void *r)
{
    fields_t fs;
    const char *st;
    const char *extra[2] = {"final", "cancelled"};

    fields_of(r, &fs);
    st = fget(&fs, "status");
    if (!st) {
        pq_http_error(s->t, s->req, s->path, 404, "invalid_request_error",
                      "No such Batch object: %s", s->id);
        pq_slot_release(s);
        return;
    }
    if (!strcmp(st, "cancelling") || !strcmp(st, "cancelled")) {
        pq_http_reply_json(s, 200, batch_object(&fs, NULL));
        pq_slot_release(s);
        return;
    }
    if (strcmp(st, "in_progress") != 0 && strcmp(st, "validating") != 0) {
        pq_http_error(s->t, s->req, s->path, 409, "invalid_request_error",
                      "batch %s is %s: it cannot be cancelled", s->id, st);
        pq_slot_release(s);
        return;
    }
    s->api.step = strcmp(st, "validating") ? (int)fint(&fs, "lines") : -1;
    bkey_of(s->t, s->route, sizeof(s->route), s->tenant, s->id);
    {
        const char *argv[16];
        size_t lens[16];
        char now[24];
        int n = 0;

        snprintf(now, sizeof(now), "%lld", (long long)(pq_now_ms() / 1000));
        argv[n++] = "EVALSHA";
        argv[n++] = pq_rconn_sha(pq_bscript_batch_status);
        argv[n++] = "1";
        argv[n++] = s->route;
        argv[n++] = "|validating|in_progress|";
        argv[n++] = "cancelling";
        argv[n++] = "cancelling_at";
        argv[n++] = now;
        argv[n++] = extra[0];
        argv[n++] = extra[1];
        for (int i = 0; i < n; i++)
            lens[i] = strlen(argv[i]);
        if (pq_api_send(s, cancel_cas_reply, n, argv, lens)) {
            pq_api_unavailable(s->t, s->req, s->path);
            pq_slot_release(s);
        }
    }
}

/* ---- GET /v1/batches ---- */

static void list_reply(pq_slot_t *s, const void *r)
{
    const redisReply *reply = r;
    long limit = (long)(intptr_t)s->ctx;
    json_t *data = json_array(), *o;
    size_t n = reply->type == REDIS_REPLY_ARRAY ? reply->elements / 2 : 0;
    size_t k;

    s->ctx = NULL;
    for (size_t i = 0; i < n && (long)i < limit; i++) {
        fields_t fs;

        fields_of(reply->element[2 * i + 1], &fs);
        if (fget(&fs, "status"))
            json_array_append_new(data, batch_object(&fs, NULL));
    }
    k = json_array_size(data);
    o = json_pack("{s:s, s:o, s:b}", "object", "list", "data", data, "has_more", (long)n > limit);
    json_object_set_new(o, "first_id",
                        k ? json_deep_copy(json_object_get(json_array_get(data, 0), "id"))
                          : json_null());
    json_object_set_new(o, "last_id",
                        k ? json_deep_copy(json_object_get(json_array_get(data, k - 1), "id"))
                          : json_null());
    pq_http_reply_json(s, 200, o);
    pq_slot_release(s);
}

/* ---- POST /v1/batches ---- */

typedef struct {
    char input_file_id[PQ_ID_MAX + 1];
    char endpoint[64];
    char *metadata; /* JSON or NULL */
    char idem[512];
    char fkey[512];
    int64_t created_s;
    int64_t lines;
} post_t;

static void post_free(void *p)
{
    post_t *c = p;

    free(c->metadata);
    free(c);
}

static void idem_forget(pq_slot_t *s)
{
    post_t *c = s->ctx;

    if (c->idem[0])
        pq_rconn_sendf(s->t, NULL, NULL, "DEL %s", c->idem);
}

static void post_written(pq_slot_t *s, const void *r)
{
    post_t *c = s->ctx;
    fields_t fs;
    char created[24], expires[24];

    (void)r;
    snprintf(created, sizeof(created), "%lld", (long long)c->created_s);
    snprintf(expires, sizeof(expires), "%lld", (long long)(c->created_s + BATCH_EXPIRE_S));
    fs.n = 0;
#define F(k, val)                                                                                  \
    do {                                                                                           \
        fs.f[fs.n] = k;                                                                            \
        fs.v[fs.n++] = val;                                                                        \
    } while (0)
    F("id", s->id);
    F("status", "validating");
    F("endpoint", c->endpoint);
    F("input_file_id", c->input_file_id);
    F("completion_window", "24h");
    F("created_at", created);
    F("expires_at", expires);
    if (c->metadata)
        F("metadata", c->metadata);
#undef F
    pq_counter_add(s->t->b->m_batches_created, 1);
    start_create(s->t, s->tenant, s->id, c->input_file_id, c->endpoint);
    pq_http_reply_json(s, 200, batch_object(&fs, NULL));
    pq_slot_release(s);
}

static void post_file_reply(pq_slot_t *s, const void *r)
{
    const redisReply *reply = r;
    post_t *c = s->ctx;
    pq_bthread_t *t = s->t;
    const char *purpose = NULL, *lines = NULL;
    char bkey[512], created[24], expires[24], active[600];
    const char *argv[24];
    int n = 0;

    if (reply->type == REDIS_REPLY_ARRAY && reply->elements >= 2) {
        if (reply->element[0]->type == REDIS_REPLY_STRING)
            purpose = reply->element[0]->str;
        if (reply->element[1]->type == REDIS_REPLY_STRING)
            lines = reply->element[1]->str;
    }
    if (!purpose) {
        idem_forget(s);
        pq_http_error(t, s->req, s->path, 404, "invalid_request_error",
                      "input_file_id: no such file %s", c->input_file_id);
        pq_slot_release(s);
        return;
    }
    if (strcmp(purpose, "batch") != 0) {
        idem_forget(s);
        pq_http_error(t, s->req, s->path, 400, "invalid_request_error",
                      "input_file_id: file %s has purpose %s, not batch", c->input_file_id,
                      purpose);
        pq_slot_release(s);
        return;
    }
    c->lines = lines ? strtoll(lines, NULL, 10) : 0;
    if (c->lines > t->bc->conf->max_batch_lines) {
        idem_forget(s);
        pq_http_error(t, s->req, s->path, 400, "invalid_request_error",
                      "input_file_id: %lld lines exceed the limit of %d lines per batch "
                      "(broker.max_batch_lines)",
                      (long long)c->lines, t->bc->conf->max_batch_lines);
        pq_slot_release(s);
        return;
    }
    if (c->lines == 0) {
        idem_forget(s);
        pq_http_error(t, s->req, s->path, 400, "invalid_request_error",
                      "input_file_id: the file is empty");
        pq_slot_release(s);
        return;
    }
    bkey_of(t, bkey, sizeof(bkey), s->tenant, s->id);
    c->created_s = pq_now_ms() / 1000;
    snprintf(created, sizeof(created), "%lld", (long long)c->created_s);
    snprintf(expires, sizeof(expires), "%lld", (long long)(c->created_s + BATCH_EXPIRE_S));
    snprintf(active, sizeof(active), "%s:%s", s->tenant, s->id);
    pq_rconn_sendf(t, NULL, NULL, "ZADD %sbatches:%s 0 %s", t->bc->conf->redis_prefix, s->tenant,
                   s->id);
    pq_rconn_sendf(t, NULL, NULL, "SADD %sbatches:active %s", t->bc->conf->redis_prefix, active);
    argv[n++] = "HSET";
    argv[n++] = bkey;
    argv[n++] = "id";
    argv[n++] = s->id;
    argv[n++] = "status";
    argv[n++] = "validating";
    argv[n++] = "endpoint";
    argv[n++] = c->endpoint;
    argv[n++] = "input_file_id";
    argv[n++] = c->input_file_id;
    argv[n++] = "completion_window";
    argv[n++] = "24h";
    argv[n++] = "created_at";
    argv[n++] = created;
    argv[n++] = "expires_at";
    argv[n++] = expires;
    argv[n++] = "total";
    argv[n++] = "0";
    argv[n++] = "metadata";
    argv[n++] = c->metadata ? c->metadata : "null";
    {
        size_t lens[24];

        for (int i = 0; i < n; i++)
            lens[i] = strlen(argv[i]);
        if (pq_api_send(s, post_written, n, argv, lens)) {
            pq_api_unavailable(t, s->req, s->path);
            pq_slot_release(s);
        }
    }
}

static void post_check_file(pq_slot_t *s)
{
    post_t *c = s->ctx;
    const char *argv[4] = {"HMGET", c->fkey, "purpose", "lines"};
    size_t lens[4] = {5, strlen(c->fkey), 7, 5};

    if (pq_api_send(s, post_file_reply, 4, argv, lens)) {
        idem_forget(s);
        pq_api_unavailable(s->t, s->req, s->path);
        pq_slot_release(s);
    }
}

static void post_idem_reply(pq_slot_t *s, const void *r)
{
    const redisReply *reply = r;
    char prev_id[PQ_ID_MAX + 1], prev_hash[PQ_SHA256_HEX_LEN + 1], bkey[512];
    post_t *c = s->ctx;

    if (reply->type == REDIS_REPLY_NIL) {
        post_check_file(s);
        return;
    }
    c->idem[0] = '\0'; /* not ours to forget */
    if (reply->type != REDIS_REPLY_STRING ||
        sscanf(reply->str, "%128s %64s", prev_id, prev_hash) != 2 || !id_ok(prev_id)) {
        pq_http_error(s->t, s->req, s->path, 422, "invalid_request_error",
                      "Idempotency-Key was used with another request");
        pq_slot_release(s);
        return;
    }
    if (strcmp(prev_hash, s->body_hash) != 0) {
        pq_http_error(s->t, s->req, s->path, 422, "invalid_request_error",
                      "Idempotency-Key was used with another request body");
        pq_slot_release(s);
        return;
    }
    /* a repeat: answer the first use's batch */
    pq_strlcpy(s->id, prev_id, sizeof(s->id));
    bkey_of(s->t, bkey, sizeof(bkey), s->tenant, prev_id);
    {
        const char *argv[2] = {"HGETALL", bkey};
        size_t lens[2] = {7, strlen(bkey)};

        if (pq_api_send(s, get_reply, 2, argv, lens)) {
            pq_api_unavailable(s->t, s->req, s->path);
            pq_slot_release(s);
        }
    }
}

static void batch_post(pq_bthread_t *t, struct evhttp_request *req, const char *tenant)
{
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    const char *body, *idem = NULL, *fid, *ep, *win;
    json_t *o = NULL, *meta;
    json_error_t jerr;
    post_t *c = NULL;
    pq_slot_t *s;
    char bid[PQ_JOB_ID_LEN + 1];

    if (pq_idem_header(t, req, PQ_PATH_BATCHES, &idem))
        return;
    if (len > 65536) {
        pq_http_error(t, req, PQ_PATH_BATCHES, 413, "invalid_request_error", "body too large");
        return;
    }
    body = len ? (const char *)evbuffer_pullup(in, -1) : "";
    o = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!json_is_object(o)) {
        pq_http_error(t, req, PQ_PATH_BATCHES, 400, "invalid_request_error",
                      "body must be a JSON object");
        goto out;
    }
    fid = json_string_value(json_object_get(o, "input_file_id"));
    ep = json_string_value(json_object_get(o, "endpoint"));
    win = json_string_value(json_object_get(o, "completion_window"));
    meta = json_object_get(o, "metadata");
    if (!fid || !*fid) {
        pq_http_error(t, req, PQ_PATH_BATCHES, 400, "invalid_request_error",
                      "input_file_id: required string");
        goto out;
    }
    if (!ep || strcmp(ep, "/v1/chat/completions") != 0) {
        pq_http_error(t, req, PQ_PATH_BATCHES, 400, "invalid_request_error",
                      "endpoint: only /v1/chat/completions is supported");
        goto out;
    }
    if (!win || strcmp(win, "24h") != 0) {
        pq_http_error(t, req, PQ_PATH_BATCHES, 400, "invalid_request_error",
                      "completion_window: only 24h is supported");
        goto out;
    }
    if (meta && !json_is_null(meta)) {
        const char *k;
        json_t *v;

        if (!json_is_object(meta) || json_object_size(meta) > BATCH_META_MAX) {
            pq_http_error(t, req, PQ_PATH_BATCHES, 400, "invalid_request_error",
                          "metadata: an object of at most %d pairs", BATCH_META_MAX);
            goto out;
        }
        json_object_foreach(meta, k, v)
        {
            if (strlen(k) > 64 || !json_is_string(v) || strlen(json_string_value(v)) > 512) {
                pq_http_error(t, req, PQ_PATH_BATCHES, 400, "invalid_request_error",
                              "metadata: keys up to 64 characters, string values up to 512");
                goto out;
            }
        }
    }
    if (strlen(fid) > PQ_ID_MAX || strncmp(fid, "file-", 5) != 0 || !pq_id_valid(fid)) {
        pq_http_error(t, req, PQ_PATH_BATCHES, 404, "invalid_request_error",
                      "input_file_id: no such file %s", fid);
        goto out;
    }
    if (!pq_rconn_usable(t)) {
        pq_api_unavailable(t, req, PQ_PATH_BATCHES);
        goto out;
    }
    s = pq_slot_get(t, PQ_PATH_BATCHES, req, &pq_api_ops);
    c = calloc(1, sizeof(*c));
    if (!s || !c) {
        free(c);
        if (s)
            pq_slot_release(s);
        pq_api_unavailable(t, req, PQ_PATH_BATCHES);
        goto out;
    }
    s->ctx = c;
    s->ctx_free = post_free;
    pq_strlcpy(s->tenant, tenant, sizeof(s->tenant));
    pq_id_generate(bid);
    snprintf(s->id, sizeof(s->id), "batch_%s", bid + 4);
    pq_strlcpy(c->input_file_id, fid, sizeof(c->input_file_id));
    pq_strlcpy(c->endpoint, ep, sizeof(c->endpoint));
    if (meta && json_is_object(meta))
        c->metadata = json_dumps(meta, JSON_COMPACT);
    snprintf(c->fkey, sizeof(c->fkey), "%sfile:%s:%s", t->bc->conf->redis_prefix, tenant, fid);
    if (idem) {
        char val[256], ttl[24];
        const char *argv[6];
        size_t lens[6];

        pq_sha256_hex(body, len, s->body_hash);
        if (pq_key_idem(c->idem, sizeof(c->idem), t->bc->conf->redis_prefix, tenant, idem) < 0) {
            c->idem[0] = '\0';
            pq_http_error(t, req, PQ_PATH_BATCHES, 400, "invalid_request_error",
                          "Idempotency-Key too long");
            pq_slot_release(s);
            goto out;
        }
        snprintf(val, sizeof(val), "%s %s b", s->id, s->body_hash);
        snprintf(ttl, sizeof(ttl), "%lld", (long long)t->bc->conf->idempotency_ttl_s * 1000);
        argv[0] = "EVALSHA";
        argv[1] = pq_rconn_sha(pq_bscript_idem_claim);
        argv[2] = "1";
        argv[3] = c->idem;
        argv[4] = val;
        argv[5] = ttl;
        for (int i = 0; i < 6; i++)
            lens[i] = strlen(argv[i]);
        if (pq_api_send(s, post_idem_reply, 6, argv, lens)) {
            c->idem[0] = '\0';
            pq_api_unavailable(t, req, PQ_PATH_BATCHES);
            pq_slot_release(s);
        }
        goto out;
    }
    post_check_file(s);
out:
    json_decref(o);
}

/* ---- routing ---- */

void pq_batch_serve(pq_bthread_t *t, struct evhttp_request *req, const char *rest)
{
    enum evhttp_cmd_type m = evhttp_request_get_command(req);
    pq_path_t path = rest[0] ? PQ_PATH_BATCH : PQ_PATH_BATCHES;
    char tenant[PQ_TENANT_MAX + 1], id[PQ_ID_MAX + 1], key[512];
    int cancel;
    pq_slot_t *s;

    if (pq_api_tenant(t, req, path, tenant, sizeof(tenant)))
        return;
    if (path == PQ_PATH_BATCHES) {
        if (m == EVHTTP_REQ_POST) {
            if (pq_http_ratelimit(t, req, path, tenant))
                return;
            batch_post(t, req, tenant);
        } else if (m == EVHTTP_REQ_GET) {
            char after[PQ_ID_MAX + 1], skey[512], pfx[512];
            long limit = pq_api_query_limit(req, after, sizeof(after), BATCH_LIST_DEFAULT,
                                            BATCH_LIST_MAX, id_ok);

            if (limit < 0) {
                pq_http_error(t, req, path, 400, "invalid_request_error", "limit: must be 1 to %d",
                              BATCH_LIST_MAX);
                return;
            }
            snprintf(skey, sizeof(skey), "%sbatches:%s", t->bc->conf->redis_prefix, tenant);
            snprintf(pfx, sizeof(pfx), "%sbatch:%s:", t->bc->conf->redis_prefix, tenant);
            pq_api_list(t, req, path, list_reply, skey, pfx, after, limit, 0, NULL);
        } else {
            evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET, POST");
            pq_http_error(t, req, path, 405, "invalid_request_error", "method not allowed");
        }
        return;
    }
    cancel = pq_api_path_id(t, req, path, rest, "/cancel", BATCH_ID_MAX, id_ok, "Batch", id);
    if (cancel < 0)
        return;
    if (cancel ? m != EVHTTP_REQ_POST : m != EVHTTP_REQ_GET) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", cancel ? "POST" : "GET");
        pq_http_error(t, req, path, 405, "invalid_request_error", "method not allowed");
        return;
    }
    if (cancel && pq_http_ratelimit(t, req, path, tenant))
        return;
    bkey_of(t, key, sizeof(key), tenant, id);
    s = pq_slot_get(t, path, req, &pq_api_ops);
    if (!s) {
        pq_api_unavailable(t, req, path);
        return;
    }
    pq_strlcpy(s->id, id, sizeof(s->id));
    pq_strlcpy(s->tenant, tenant, sizeof(s->tenant));
    {
        const char *argv[2] = {"HGETALL", key};
        size_t lens[2] = {7, strlen(key)};

        if (pq_api_send(s, cancel ? cancel_reply : get_reply, 2, argv, lens)) {
            pq_api_unavailable(t, req, path);
            pq_slot_release(s);
        }
    }
}

/* ---- thread 0's timer: finalize what is due, expire what is late ---- */

typedef struct {
    char member[PQ_TENANT_MAX + 80];
} tick_req_t;

/* A batch in a state some task works on, entered long enough ago that the task would hold
 * (or have held) the batch's task lock. */
static int stale(const fields_t *fs, const char *st)
{
    const char *at = !strcmp(st, "validating")   ? "created_at"
                     : !strcmp(st, "finalizing") ? "finalizing_at"
                     : !strcmp(st, "cancelling") ? "cancelling_at"
                                                 : NULL;

    return at && fint(fs, at) > 0 && pq_now_ms() / 1000 - fint(fs, at) >= BATCH_STALE_S;
}

static void tick_batch_cb(redisAsyncContext *ac, void *r, void *priv)
{
    pq_bthread_t *t = pq_rconn_replied(ac, r);
    tick_req_t *q = priv;
    char *colon = strchr(q->member, ':');
    const char *final;
    fields_t fs;
    const char *st;

    if (!r || ((const redisReply *)r)->type != REDIS_REPLY_ARRAY || !colon) {
        free(q);
        return;
    }
    *colon = '\0';
    fields_of(r, &fs);
    st = fget(&fs, "status");
    if (!st || !strcmp(st, "completed") || !strcmp(st, "failed") || !strcmp(st, "expired") ||
        !strcmp(st, "cancelled")) {
        *colon = ':';
        pq_rconn_sendf(t, NULL, NULL, "SREM %sbatches:active %s", t->bc->conf->redis_prefix,
                       q->member);
        free(q);
        return;
    }
    final = due_final(&fs);
    if (final) {
        try_finalize(t, q->member, colon + 1, (uint32_t)fint(&fs, "lines"), final);
    } else if (stale(&fs, st)) {
        /* its task is gone (a stopped or dead broker) or still running: a new task takes the
         * batch's task lock first, so at most one runs */
        const char *f = fget(&fs, "final");

        if (!strcmp(st, "validating") && fget(&fs, "input_file_id") && fget(&fs, "endpoint"))
            start_create(t, q->member, colon + 1, fget(&fs, "input_file_id"),
                         fget(&fs, "endpoint"));
        else if (!strcmp(st, "finalizing"))
            start_final(t, q->member, colon + 1, (uint32_t)fint(&fs, "lines"),
                        f && *f ? f : "completed");
        else if (!strcmp(st, "cancelling") && !fget(&fs, "lines") && fget(&fs, "input_file_id") &&
                 fget(&fs, "endpoint"))
            start_create(t, q->member, colon + 1, fget(&fs, "input_file_id"),
                         fget(&fs, "endpoint"));
        else if (!strcmp(st, "cancelling") && !fget(&fs, "cancel_done"))
            start_cancel(t, q->member, colon + 1, (uint32_t)fint(&fs, "lines"),
                         f && !strcmp(f, "expired") ? "expired" : "cancelled");
    } else if (!strcmp(st, "in_progress") && fint(&fs, "expires_at") > 0 &&
               pq_now_ms() / 1000 >= fint(&fs, "expires_at")) {
        char bkey[512];
        const char *extra[2] = {"final", "expired"};

        bkey_of(t, bkey, sizeof(bkey), q->member, colon + 1);
        if (set_status(t, NULL, NULL, bkey, "|in_progress|", "cancelling", "cancelling_at", 2,
                       extra, NULL) == 0)
            start_cancel(t, q->member, colon + 1, (uint32_t)fint(&fs, "lines"), "expired");
        PQ_INFO("batch %s/%s expired", q->member, colon + 1);
    }
    free(q);
}

static void tick_members_cb(redisAsyncContext *ac, void *r, void *priv)
{
    const redisReply *reply = r;
    pq_bthread_t *t = pq_rconn_replied(ac, r);

    if (!reply || reply->type != REDIS_REPLY_ARRAY)
        return;
    for (size_t i = 0; i < reply->elements && i < 1000; i++) {
        const redisReply *m = reply->element[i];
        tick_req_t *q;
        char *colon;
        char bkey[600];

        if (m->type != REDIS_REPLY_STRING || m->len >= sizeof(q->member))
            continue;
        q = calloc(1, sizeof(*q));
        if (!q)
            return;
        memcpy(q->member, m->str, m->len);
        colon = strchr(q->member, ':');
        if (!colon) {
            free(q);
            continue;
        }
        snprintf(bkey, sizeof(bkey), "%sbatch:%.*s:%s", t->bc->conf->redis_prefix,
                 (int)(colon - q->member), q->member, colon + 1);
        if (pq_rconn_sendf(t, tick_batch_cb, q, "HGETALL %s", bkey))
            free(q);
    }
}

static void batch_tick(evutil_socket_t fd, short what, void *arg)
{
    pq_bthread_t *t = arg;

    if (t->stopping || !pq_rconn_usable(t))
        return;
    pq_rconn_sendf(t, tick_members_cb, NULL, "SRANDMEMBER %sbatches:active 1000",
                   t->bc->conf->redis_prefix);
}

int pq_batch_thread_init(pq_bthread_t *t)
{
    struct timeval tv = {BATCH_TICK_MS / 1000, (BATCH_TICK_MS % 1000) * 1000};

    if (t->no != 0)
        return 0;
    t->batch_timer = event_new(t->base, -1, EV_PERSIST, batch_tick, t);
    if (!t->batch_timer)
        return -1;
    event_add(t->batch_timer, &tv);
    return 0;
}

void pq_batch_thread_free(pq_bthread_t *t)
{
    if (t->batch_timer)
        event_free(t->batch_timer);
    t->batch_timer = NULL;
    while (t->btasks)
        task_free(t->btasks);
}
