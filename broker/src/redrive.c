/* POST /v1/dlq/redrive: re-queues dead-lettered jobs of the caller's tenant as new jobs.
 *
 * G3 holds: a dead-lettered job is terminal and stays so. Each redriven dlq record becomes a
 * NEW job on the bulk lane with the deterministic id "<orig id>.r<dlq partition>-<dlq offset>",
 * the same tenant and request, without error, park, reply_to and deadline (an expired job
 * would expire again at once), and with metadata.redriven_from {id, error, partition, offset}
 * (in metadata because the envelope refuses unknown top-level keys; the worker echoes metadata
 * in the result). The new job's record is created with pq_script_job_create first: when it
 * exists already (the same record was redriven before) nothing is produced and the record
 * counts as "already", so redriving twice runs nothing twice. A created job counts as
 * redriven only once its delivery report says it is in Kafka (G1); a job Kafka refused has
 * its record dropped again (pq_script_job_drop) and the call answers 503.
 *
 * The scan reads every partition of promptq.dlq from its low watermark to the high watermark
 * taken when the scan starts (it never waits for new records) and stops once `limit` jobs were
 * redriven (has_more then says whether records were left unread). Kafka reads block, so scans
 * run on one redrive thread with its own consumer (legacy per-partition API: no group, no
 * commits), its own idempotent producer and its own synchronous Redis connection. The loop
 * that got the request parses the body, holds the request in a slot and queues the scan; the
 * redrive thread serves one scan at a time (REDRIVE_QUEUE_MAX may wait, more get 429) and
 * activates the request's event on that loop with the answer. A request whose client went
 * away is found gone through its slot handle and its answer dropped. */
#include "broker.h"
#include "api.h"
#include "http.h"
#include "intake.h"
#include "rconn.h"
#include "redrive.h"
#include "slot.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <hiredis/hiredis.h>
#include <jansson.h>

#include "promptq/kafka.h"
#include "promptq/keys.h"
#include "promptq/log.h"
#include "promptq/scripts.h"
#include "promptq/util.h"

#define REDRIVE_LIMIT_DEFAULT 1000
#define REDRIVE_LIMIT_MAX     10000
#define REDRIVE_IDS_MAX       10000
#define REDRIVE_TYPES_MAX     32
#define REDRIVE_TYPE_MAX      64
#define REDRIVE_BODY_MAX      (2 * 1024 * 1024)
/* Scans waiting behind the running one; more get 429. */
#define REDRIVE_QUEUE_MAX  8
#define REDRIVE_RETRY_BUSY "5"
/* Kafka: metadata and watermark queries; a partition that delivers nothing this long while
 * records remain below its high watermark aborts the scan (503). */
#define REDRIVE_KAFKA_TIMEOUT_MS 3000
#define REDRIVE_STALL_MS         5000
#define REDRIVE_BATCH            256
#define REDRIVE_MSG_TIMEOUT_MS   "10000"
#define REDRIVE_REDIS_TIMEOUT_MS 2000

/* Type categories of the "types" filter. */
#define CAT_EXPIRED   1u
#define CAT_POISON    2u
#define CAT_PERMANENT 4u

/* One POST /v1/dlq/redrive: built on the loop, scanned on the redrive thread, answered on the
 * loop again (ev). */
typedef struct rjob_s {
    struct rjob_s *next;
    pq_bthread_t *t;
    void *handle; /* the request's slot */
    struct event *ev;
    char tenant[PQ_TENANT_MAX + 1];
    /* filters */
    json_t *body;       /* owned: the request body, the strings below point into it */
    unsigned cats;      /* CAT_* */
    const char **types; /* owned array: other type names, exact match */
    size_t ntypes;
    const char *route; /* NULL: any */
    const char **ids;  /* owned array, sorted: NULL = any */
    size_t nids;
    long limit;
    /* answer */
    int code;
    const char *retry_after; /* static */
    char *answer;            /* owned */
    size_t answer_len;
} rjob_t;

/* A produced job waiting for its delivery report. */
typedef struct {
    char id[PQ_ID_MAX + 1];
    char orig[PQ_ID_MAX + 1];
    char type[REDRIVE_TYPE_MAX + 1];
    int32_t partition;
    int64_t offset;
    int state; /* 0 waiting, 1 delivered, -1 failed */
} ritem_t;

struct pq_redrive_s {
    pq_broker_t *b;
    pq_bconf_t *bc; /* own reference: Kafka and Redis settings */
    pthread_t thread;
    int started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    rjob_t *head, *tail; /* guarded by mu */
    int nqueued;         /* guarded by mu */
    atomic_int stop;
    char topic_dlq[256];
    rd_kafka_t *consumer;
    rd_kafka_topic_t *rkt_dlq;
    rd_kafka_t *producer; /* NULL after a fatal error: recreated by the next scan */
    rd_kafka_topic_t *rkt_bulk;
    redisContext *rc;
    pq_counter_t *m_redriven;
    pq_counter_t *m_scans;
    /* the running scan's produced jobs (redrive thread only) */
    ritem_t *items;
    size_t nitems, cap_items;
    int dr_pending;
};

typedef struct {
    long scanned, matched, redriven, already, skipped, failed;
    int has_more;
} rcount_t;

/* ---- request body (pure) ---- */

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int type_name_ok(const char *s)
{
    size_t n = strlen(s);

    if (n == 0 || n > REDRIVE_TYPE_MAX)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '_' || *s == '.'))
            return 0;
    return 1;
}

/* Types that can only fail again. */
static int type_refused(const char *s)
{
    return !strcmp(s, "invalid") || !strcmp(s, "invalid_request") || !strcmp(s, "id_conflict");
}

static void rjob_free(rjob_t *j)
{
    if (!j)
        return;
    if (j->ev)
        event_free(j->ev);
    json_decref(j->body);
    free(j->types);
    free(j->ids);
    free(j->answer);
    free(j);
}

/* Fills j's filters from the request body (empty = defaults). Returns 0, or -1 with errstr. */
static int parse_body(rjob_t *j, const char *buf, size_t len, char *errstr, size_t size)
{
    json_error_t jerr;
    json_t *v;
    const char *key;
    char unknown[256] = "";
    size_t ulen = 0;

    j->cats = CAT_EXPIRED | CAT_POISON | CAT_PERMANENT;
    j->limit = REDRIVE_LIMIT_DEFAULT;
    while (len > 0 && (buf[len - 1] == ' ' || buf[len - 1] == '\n' || buf[len - 1] == '\r' ||
                       buf[len - 1] == '\t'))
        len--;
    if (len == 0)
        return 0;
    j->body = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!j->body) {
        /* jansson's text may quote the body: the fixed description and the place only */
        snprintf(errstr, size, "body: invalid JSON: %s at byte %d", pq_json_error_what(&jerr),
                 jerr.position);
        return -1;
    }
    if (!json_is_object(j->body)) {
        snprintf(errstr, size, "body: must be a JSON object");
        return -1;
    }
    json_object_foreach(j->body, key, v)
    {
        if (!strcmp(key, "types") || !strcmp(key, "route") || !strcmp(key, "limit") ||
            !strcmp(key, "ids"))
            continue;
        if (ulen + strlen(key) + 4 < sizeof(unknown))
            ulen += (size_t)snprintf(unknown + ulen, sizeof(unknown) - ulen, "%s\"%.64s\"",
                                     ulen ? ", " : "", key);
    }
    if (ulen) {
        snprintf(errstr, size, "unknown field(s) %s; accepted: types, route, limit, ids", unknown);
        return -1;
    }
    if ((v = json_object_get(j->body, "types"))) {
        size_t i, n = json_array_size(v);
        json_t *e;

        if (!json_is_array(v) || n == 0 || n > REDRIVE_TYPES_MAX) {
            snprintf(errstr, size, "types: must be a list of 1 to %d error types",
                     REDRIVE_TYPES_MAX);
            return -1;
        }
        j->cats = 0;
        j->types = calloc(n, sizeof(*j->types));
        if (!j->types) {
            snprintf(errstr, size, "out of memory");
            return -1;
        }
        json_array_foreach(v, i, e)
        {
            const char *s = json_string_value(e);

            if (!s || !type_name_ok(s)) {
                snprintf(errstr, size, "types[%zu]: must be an error type name ([a-z0-9_.]{1,%d})",
                         i, REDRIVE_TYPE_MAX);
                return -1;
            }
            if (type_refused(s)) {
                snprintf(errstr, size,
                         "types[%zu]: \"%s\" records cannot be redriven: they can only fail again",
                         i, s);
                return -1;
            }
            if (!strcmp(s, "expired"))
                j->cats |= CAT_EXPIRED;
            else if (!strcmp(s, "poison"))
                j->cats |= CAT_POISON;
            else if (!strcmp(s, "permanent"))
                j->cats |= CAT_PERMANENT;
            else
                j->types[j->ntypes++] = s;
        }
    }
    if ((v = json_object_get(j->body, "route"))) {
        const char *s = json_string_value(v);

        if (!s || !s[0] || strlen(s) > PQ_BROKER_ROUTE_MAX) {
            snprintf(errstr, size, "route: must be a route name (1 to %d bytes)",
                     PQ_BROKER_ROUTE_MAX);
            return -1;
        }
        j->route = s;
    }
    if ((v = json_object_get(j->body, "limit"))) {
        if (!json_is_integer(v) || json_integer_value(v) < 1 ||
            json_integer_value(v) > REDRIVE_LIMIT_MAX) {
            snprintf(errstr, size, "limit: must be an integer from 1 to %d", REDRIVE_LIMIT_MAX);
            return -1;
        }
        j->limit = (long)json_integer_value(v);
    }
    if ((v = json_object_get(j->body, "ids"))) {
        size_t i, n = json_array_size(v);
        json_t *e;

        if (!json_is_array(v) || n == 0 || n > REDRIVE_IDS_MAX) {
            snprintf(errstr, size, "ids: must be a list of 1 to %d job ids", REDRIVE_IDS_MAX);
            return -1;
        }
        j->ids = calloc(n, sizeof(*j->ids));
        if (!j->ids) {
            snprintf(errstr, size, "out of memory");
            return -1;
        }
        json_array_foreach(v, i, e)
        {
            const char *s = json_string_value(e);

            if (!s || !pq_id_valid(s)) {
                snprintf(errstr, size, "ids[%zu]: must be a job id ([A-Za-z0-9._:-]{1,%d})", i,
                         PQ_ID_MAX);
                return -1;
            }
            j->ids[i] = s;
        }
        j->nids = n;
        qsort(j->ids, n, sizeof(*j->ids), cmp_str);
    }
    return 0;
}

/* 1 if the filters select error type t. */
static int type_selected(const rjob_t *j, const char *t)
{
    if (!strcmp(t, "expired"))
        return (j->cats & CAT_EXPIRED) != 0;
    if (!strcmp(t, "poison"))
        return (j->cats & CAT_POISON) != 0;
    for (size_t i = 0; i < j->ntypes; i++)
        if (!strcmp(j->types[i], t))
            return 1;
    /* "permanent": what failed for good at the providers (refused, not_found, authentication,
     * unsupported, too_large...), not what can only fail again nor a cancel */
    return (j->cats & CAT_PERMANENT) && t[0] && !type_refused(t) && strcmp(t, "cancelled") != 0;
}

/* ---- Redis (redrive thread, blocking) ---- */

static void redis_close(struct pq_redrive_s *r)
{
    if (r->rc)
        redisFree(r->rc);
    r->rc = NULL;
}

static int redis_ok_reply(redisReply *rep)
{
    int ok = rep && rep->type != REDIS_REPLY_ERROR;

    if (rep)
        freeReplyObject(rep);
    return ok;
}

static int redis_load_scripts(struct pq_redrive_s *r)
{
    return redis_ok_reply(redisCommand(r->rc, "SCRIPT LOAD %s", pq_script_job_create)) &&
                   redis_ok_reply(redisCommand(r->rc, "SCRIPT LOAD %s", pq_script_job_drop))
               ? 0
               : -1;
}

static int redis_connect(struct pq_redrive_s *r)
{
    const pq_conf_t *conf = r->bc->conf;
    struct timeval tv = {REDRIVE_REDIS_TIMEOUT_MS / 1000, (REDRIVE_REDIS_TIMEOUT_MS % 1000) * 1000};

    if (r->rc)
        return 0;
    r->rc = redisConnectWithTimeout(conf->redis_host, conf->redis_port, tv);
    if (!r->rc || r->rc->err) {
        PQ_WARN("redrive: redis %s:%d: %s", conf->redis_host, conf->redis_port,
                r->rc ? r->rc->errstr : "out of memory");
        goto fail;
    }
    redisSetTimeout(r->rc, tv);
    if (conf->redis_password &&
        !redis_ok_reply(redisCommand(r->rc, "AUTH %s", conf->redis_password))) {
        PQ_WARN("redrive: redis AUTH failed");
        goto fail;
    }
    if (conf->redis_db && !redis_ok_reply(redisCommand(r->rc, "SELECT %d", conf->redis_db))) {
        PQ_WARN("redrive: redis SELECT %d failed", conf->redis_db);
        goto fail;
    }
    if (redis_load_scripts(r)) {
        PQ_WARN("redrive: redis SCRIPT LOAD failed");
        goto fail;
    }
    return 0;
fail:
    redis_close(r);
    return -1;
}

/* EVALSHA of a broker script with an integer answer. Returns 0 with *out set, or -1 (Redis
 * unusable: the connection is closed). */
static int redis_eval(struct pq_redrive_s *r, const char *script, int argc, const char **argv,
                      const size_t *argvlen, long long *out)
{
    for (int attempt = 0; attempt < 2; attempt++) {
        redisReply *rep;

        if (redis_connect(r))
            return -1;
        argv[1] = pq_rconn_sha(script);
        rep = redisCommandArgv(r->rc, argc, argv, argvlen);
        if (!rep) {
            PQ_WARN("redrive: redis: %s", r->rc->errstr);
            redis_close(r);
            continue;
        }
        if (rep->type == REDIS_REPLY_INTEGER) {
            *out = rep->integer;
            freeReplyObject(rep);
            return 0;
        }
        if (rep->type == REDIS_REPLY_ERROR && !strncmp(rep->str, "NOSCRIPT", 8)) {
            freeReplyObject(rep);
            if (redis_load_scripts(r))
                redis_close(r);
            continue;
        }
        PQ_WARN("redrive: unexpected redis reply (type %d)%s%s", rep->type,
                rep->type == REDIS_REPLY_ERROR ? ": " : "",
                rep->type == REDIS_REPLY_ERROR ? rep->str : "");
        freeReplyObject(rep);
        return -1;
    }
    return -1;
}

/* job_create for a redriven job: 1 created, 0 exists (same request), -1 exists (another
 * request), -2 Redis unusable. */
static int job_create(struct pq_redrive_s *r, const char *tenant, const pq_envelope_t *env)
{
    pq_job_create_buf_t b;
    const char *argv[PQ_JOB_CREATE_ARGC];
    size_t argvlen[PQ_JOB_CREATE_ARGC];
    long long res;

    if (pq_job_create_argv(r->bc->conf, tenant, env->id, env->request_hash, env->model,
                           env->callback_url, &b, argv, argvlen) ||
        redis_eval(r, pq_script_job_create, PQ_JOB_CREATE_ARGC, argv, argvlen, &res))
        return -2;
    return res == 1 ? 1 : res == 0 ? 0 : -1;
}

/* Whether an existing redriven job's record may never have reached Kafka: no
 * "redrive_produced" mark (set after its delivery report, mark_produced) and still queued and
 * never delivered. An earlier redrive then created it but its message was lost (a lost Redis
 * reply, a crash, a failed delivery whose cleanup did not run): it is produced again (G3 makes
 * a second copy harmless). 1 yes, 0 no, -1 Redis unusable. */
static int job_undelivered(struct pq_redrive_s *r, const char *tenant, const char *id)
{
    char key[512];
    redisReply *rep;
    int ret = -1;

    if (pq_key_job(key, sizeof(key), r->bc->conf->redis_prefix, tenant, id) < 0 || redis_connect(r))
        return -1;
    rep = redisCommand(r->rc, "HMGET %s status deliveries redrive_produced", key);
    if (!rep) {
        redis_close(r);
        return -1;
    }
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 3) {
        const redisReply *st = rep->element[0], *d = rep->element[1], *mk = rep->element[2];

        ret = mk->type != REDIS_REPLY_STRING && st->type == REDIS_REPLY_STRING &&
              !strcmp(st->str, "queued") && (d->type != REDIS_REPLY_STRING || !strcmp(d->str, "0"));
    }
    freeReplyObject(rep);
    return ret;
}

/* Marks the records of the jobs Kafka confirmed (one pipeline). Best effort: a record left
 * unmarked is produced again by a later redrive, harmlessly. */
static void mark_produced(struct pq_redrive_s *r, const char *tenant)
{
    size_t sent = 0;

    if (redis_connect(r))
        return;
    for (size_t i = 0; i < r->nitems; i++) {
        char key[512];

        if (r->items[i].state != 1 ||
            pq_key_job(key, sizeof(key), r->bc->conf->redis_prefix, tenant, r->items[i].id) < 0)
            continue;
        if (redisAppendCommand(r->rc, "HSET %s redrive_produced 1", key) != REDIS_OK)
            break;
        sent++;
    }
    for (size_t i = 0; i < sent; i++) {
        void *rep = NULL;

        if (redisGetReply(r->rc, &rep) != REDIS_OK) {
            redis_close(r);
            return;
        }
        freeReplyObject(rep);
    }
}

static void job_drop(struct pq_redrive_s *r, const char *tenant, const char *id)
{
    char key[512];
    const char *argv[4];
    size_t argvlen[4];
    long long res;

    if (pq_key_job(key, sizeof(key), r->bc->conf->redis_prefix, tenant, id) < 0)
        return;
    argv[0] = "EVALSHA";
    argv[1] = "";
    argv[2] = "1";
    argv[3] = key;
    for (int i = 0; i < 4; i++)
        argvlen[i] = strlen(argv[i]);
    argvlen[1] = 40;
    if (redis_eval(r, pq_script_job_drop, 4, argv, argvlen, &res))
        PQ_WARN("redrive: job %s/%s: record of an undelivered job not dropped (Redis)", tenant, id);
}

/* ---- Kafka (redrive thread) ---- */

static void kafka_error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    PQ_DBG("redrive: kafka: %s: %s", rd_kafka_err2name((rd_kafka_resp_err_t)err), reason);
}

static void dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    struct pq_redrive_s *r = opaque;
    size_t idx = (size_t)(uintptr_t)m->_private;

    if (idx < 1 || idx > r->nitems)
        return;
    r->items[idx - 1].state = m->err ? -1 : 1;
    if (m->err)
        PQ_WARN("redrive: job %s not delivered to Kafka: %s", r->items[idx - 1].id,
                rd_kafka_err2str(m->err));
    r->dr_pending--;
}

static rd_kafka_t *producer_new(struct pq_redrive_s *r, char *errstr, size_t size)
{
    const pq_conf_t *conf = r->bc->conf;
    rd_kafka_conf_t *kc = pq_kafka_conf_new(conf, PQ_KAFKA_PRODUCER, errstr, size);
    pq_kafka_cbs_t cbs = {0};
    rd_kafka_t *rk;

    if (!kc)
        return NULL;
    /* always its own bound, whatever the pass-through says: a redrive call (and a SIGTERM
     * behind it) waits for these delivery reports */
    if (rd_kafka_conf_set(kc, "message.timeout.ms", REDRIVE_MSG_TIMEOUT_MS, errstr, size) !=
        RD_KAFKA_CONF_OK) {
        rd_kafka_conf_destroy(kc);
        return NULL;
    }
    cbs.opaque = r;
    cbs.dr_msg = dr_cb;
    cbs.error = kafka_error_cb;
    if (!(rk = pq_kafka_client_new(RD_KAFKA_PRODUCER, kc, &cbs, errstr, size)))
        return NULL;
    r->rkt_bulk = rd_kafka_topic_new(rk, r->bc->topic_bulk, NULL);
    if (!r->rkt_bulk) {
        snprintf(errstr, size, "topic %s: %s", r->bc->topic_bulk,
                 rd_kafka_err2str(rd_kafka_last_error()));
        rd_kafka_destroy(rk);
        return NULL;
    }
    return rk;
}

static void producer_destroy(struct pq_redrive_s *r)
{
    if (r->rkt_bulk)
        rd_kafka_topic_destroy(r->rkt_bulk);
    r->rkt_bulk = NULL;
    if (r->producer) {
        rd_kafka_flush(r->producer, 1000);
        rd_kafka_destroy(r->producer);
    }
    r->producer = NULL;
}

/* A consumer for reading partitions by offset: the group.id is the workers' group with
 * ".redrive" appended so that nothing of this consumer can touch the workers' group (it
 * never joins nor commits: no subscription, auto commit off). */
static rd_kafka_t *consumer_new(struct pq_redrive_s *r, char *errstr, size_t size)
{
    const pq_conf_t *conf = r->bc->conf;
    rd_kafka_conf_t *kc = pq_kafka_conf_new(conf, PQ_KAFKA_CONSUMER, errstr, size);
    char group[256];
    pq_kafka_cbs_t cbs = {0};
    rd_kafka_t *rk;

    if (!kc)
        return NULL;
    snprintf(group, sizeof(group), "%s.redrive", conf->group_id ? conf->group_id : "promptq");
    if (rd_kafka_conf_set(kc, "group.id", group, errstr, size) != RD_KAFKA_CONF_OK ||
        rd_kafka_conf_set(kc, "enable.auto.commit", "false", errstr, size) != RD_KAFKA_CONF_OK ||
        rd_kafka_conf_set(kc, "queued.max.messages.kbytes", "16384", errstr, size) !=
            RD_KAFKA_CONF_OK) {
        rd_kafka_conf_destroy(kc);
        return NULL;
    }
    cbs.error = kafka_error_cb;
    if (!(rk = pq_kafka_client_new(RD_KAFKA_CONSUMER, kc, &cbs, errstr, size)))
        return NULL;
    r->rkt_dlq = rd_kafka_topic_new(rk, r->topic_dlq, NULL);
    if (!r->rkt_dlq) {
        snprintf(errstr, size, "topic %s: %s", r->topic_dlq,
                 rd_kafka_err2str(rd_kafka_last_error()));
        rd_kafka_destroy(rk);
        return NULL;
    }
    return rk;
}

/* ---- the scan ---- */

/* Sets the job's answer to an error. */
static void answer_error(rjob_t *j, int code, const char *retry_after, const char *type,
                         const char *msg)
{
    json_t *o = json_pack("{s:{s:s, s:s}}", "error", "type", type, "message", msg);

    j->code = code;
    j->retry_after = retry_after;
    free(j->answer);
    j->answer = o ? json_dumps(o, JSON_COMPACT) : NULL;
    j->answer_len = j->answer ? strlen(j->answer) : 0;
    json_decref(o);
}

static int items_push(struct pq_redrive_s *r, const char *id, const char *orig, const char *type,
                      int32_t partition, int64_t offset)
{
    ritem_t *it;

    if (r->nitems == r->cap_items) {
        size_t cap = r->cap_items ? r->cap_items * 2 : 64;
        ritem_t *n = realloc(r->items, cap * sizeof(*n));

        if (!n)
            return -1;
        r->items = n;
        r->cap_items = cap;
    }
    it = &r->items[r->nitems++];
    pq_strlcpy(it->id, id, sizeof(it->id));
    pq_strlcpy(it->orig, orig, sizeof(it->orig));
    pq_strlcpy(it->type, type, sizeof(it->type));
    it->partition = partition;
    it->offset = offset;
    it->state = 0;
    return 0;
}

/* Outcome of one dlq record. */
/* REC_OTHER: another tenant's record (not counted: a tenant never learns of others' records) */
enum { REC_OTHER, REC_IGNORED, REC_SKIPPED, REC_ALREADY, REC_PRODUCED, REC_FAILED, REC_REDIS_DOWN };

/* The new job's envelope from a dlq record (root: taken). Returns PQ_OK with env filled. */
static pq_err_t build_envelope(struct pq_redrive_s *r, json_t *root, const char *new_id,
                               const char *orig, const char *type, int32_t partition,
                               int64_t offset, pq_envelope_t *env, char **payload, size_t *len)
{
    json_t *meta, *from;
    char errstr[256];
    char *text;
    pq_err_t err;

    json_object_del(root, "error");
    json_object_del(root, "park");
    json_object_del(root, "reply_to");
    json_object_del(root, "deadline");
    json_object_set_new(root, "id", json_string(new_id));
    meta = json_object_get(root, "metadata");
    if (!json_is_object(meta)) {
        meta = json_object();
        json_object_set_new(root, "metadata", meta);
    }
    from = json_pack("{s:s, s:s, s:i, s:I}", "id", orig, "error", type, "partition", (int)partition,
                     "offset", (json_int_t)offset);
    if (!meta || !from || json_object_set_new(meta, "redriven_from", from)) {
        if (!meta)
            json_decref(from); /* json_object_set_new takes it otherwise */
        json_decref(root);
        return PQ_ERR_NOMEM;
    }
    text = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (!text)
        return PQ_ERR_NOMEM;
    err = pq_envelope_parse(text, strlen(text), &r->bc->limits, env, errstr, sizeof(errstr));
    if (err != PQ_OK) {
        PQ_DBG("redrive: record %d/%lld (%s) is not a valid job: %s", (int)partition,
               (long long)offset, orig, errstr);
        free(text);
        return err;
    }
    *payload = text;
    *len = strlen(text);
    return PQ_OK;
}

static int id_wanted(const rjob_t *j, const char *id)
{
    return !j->ids || (id && bsearch(&id, j->ids, j->nids, sizeof(*j->ids), cmp_str));
}

static int record(struct pq_redrive_s *r, const rjob_t *j, const rd_kafka_message_t *m)
{
    json_t *root = m->payload ? json_loadb(m->payload, m->len, 0, NULL) : NULL;
    const char *tenant, *orig, *type, *route;
    json_t *req;
    char new_id[PQ_ID_MAX + 16], keybuf[PQ_ID_MAX + 1];
    pq_envelope_t env;
    char *payload = NULL;
    size_t len = 0;
    int rc, out = REC_SKIPPED;

    if (!json_is_object(root)) {
        json_decref(root);
        return strcmp(j->tenant, "default") ? REC_OTHER : REC_SKIPPED;
    }
    tenant = json_string_value(json_object_get(root, "tenant"));
    if (strcmp(tenant ? tenant : "default", j->tenant)) {
        out = REC_OTHER;
        goto out;
    }
    orig = json_string_value(json_object_get(root, "id"));
    if (!orig && m->key && m->key_len > 0 && m->key_len <= PQ_ID_MAX) {
        memcpy(keybuf, m->key, m->key_len);
        keybuf[m->key_len] = '\0';
        orig = keybuf;
    }
    req = json_object_get(root, "request");
    route = json_string_value(json_object_get(req, "model"));
    if (!route)
        route = json_string_value(json_object_get(root, "model")); /* truncated stand-in */
    if (!id_wanted(j, orig) || (j->route && (!route || strcmp(route, j->route)))) {
        out = REC_IGNORED;
        goto out;
    }
    type = json_string_value(json_object_get(json_object_get(root, "error"), "type"));
    if (!type || !type_selected(j, type) || json_is_true(json_object_get(root, "truncated")) ||
        !json_is_object(req) || !orig || !pq_id_valid(orig))
        goto out; /* skipped */
    if (snprintf(new_id, sizeof(new_id), "%s.r%d-%lld", orig, (int)m->partition,
                 (long long)m->offset) > PQ_ID_MAX) {
        PQ_DBG("redrive: %s/%s: the redriven id would be longer than %d characters", j->tenant,
               orig, PQ_ID_MAX);
        goto out;
    }
    /* build_envelope takes root; the strings above die with it, so copy what is kept */
    {
        char type_c[REDRIVE_TYPE_MAX + 1], orig_c[PQ_ID_MAX + 1];

        pq_strlcpy(type_c, type, sizeof(type_c));
        pq_strlcpy(orig_c, orig, sizeof(orig_c));
        if (build_envelope(r, root, new_id, orig_c, type_c, m->partition, m->offset, &env, &payload,
                           &len) != PQ_OK)
            return REC_SKIPPED;
        rc = job_create(r, j->tenant, &env);
        if (rc == 0) {
            /* exists: produce again when it never ran (G3 makes a second copy harmless) */
            int u = job_undelivered(r, j->tenant, new_id);
            rc = u < 0 ? -2 : u ? 1 : 0;
        }
        if (rc == -2) {
            out = REC_REDIS_DOWN;
        } else if (rc == -1) {
            PQ_WARN("redrive: %s/%s exists with another request: not redriven", j->tenant, new_id);
            out = REC_SKIPPED;
        } else if (rc == 0) {
            out = REC_ALREADY;
        } else if (items_push(r, new_id, orig_c, type_c, m->partition, m->offset)) {
            job_drop(r, j->tenant, new_id);
            out = REC_FAILED;
        } else {
            for (;;) {
                rd_kafka_resp_err_t err;

                err = rd_kafka_producev(
                    r->producer, RD_KAFKA_V_RKT(r->rkt_bulk),
                    RD_KAFKA_V_KEY(new_id, strlen(new_id)), RD_KAFKA_V_VALUE(payload, len),
                    RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_FREE),
                    RD_KAFKA_V_OPAQUE((void *)(uintptr_t)r->nitems), RD_KAFKA_V_END);
                if (err == RD_KAFKA_RESP_ERR__QUEUE_FULL) {
                    rd_kafka_poll(r->producer, 100);
                    continue;
                }
                if (err) {
                    PQ_WARN("redrive: job %s/%s: produce failed: %s", j->tenant, new_id,
                            rd_kafka_err2str(err));
                    r->nitems--;
                    job_drop(r, j->tenant, new_id);
                    out = REC_FAILED;
                } else {
                    payload = NULL; /* the producer frees it */
                    r->dr_pending++;
                    out = REC_PRODUCED;
                }
                break;
            }
        }
        pq_envelope_clear(&env);
        free(payload);
        return out;
    }
out:
    json_decref(root);
    return out;
}

/* Serves delivery reports until none is pending (message.timeout.ms bounds the wait). */
static void wait_deliveries(struct pq_redrive_s *r)
{
    while (r->dr_pending > 0)
        rd_kafka_poll(r->producer, 100);
}

static void answer_scan(struct pq_redrive_s *r, rjob_t *j, const rcount_t *c)
{
    json_t *o, *jobs = json_array();

    for (size_t i = 0; jobs && i < r->nitems; i++) {
        const ritem_t *it = &r->items[i];

        if (it->state == 1)
            json_array_append_new(jobs, json_pack("{s:s, s:s, s:s, s:i, s:I}", "id", it->id,
                                                  "redriven_from", it->orig, "error", it->type,
                                                  "partition", (int)it->partition, "offset",
                                                  (json_int_t)it->offset));
    }
    o = json_pack("{s:s, s:I, s:I, s:I, s:I, s:I, s:b, s:o*}", "object", "dlq.redrive", "scanned",
                  (json_int_t)c->scanned, "matched", (json_int_t)c->matched, "redriven",
                  (json_int_t)c->redriven, "already", (json_int_t)c->already, "skipped",
                  (json_int_t)c->skipped, "has_more", c->has_more, "jobs", jobs);
    free(j->answer);
    j->answer = o ? json_dumps(o, JSON_COMPACT) : NULL;
    j->answer_len = j->answer ? strlen(j->answer) : 0;
    j->code = j->answer ? 200 : 500;
    json_decref(o);
}

/* Reads one partition from lo to hi (exclusive). Returns 0 when done, 1 when the limit was
 * reached (c->has_more set if records remain), -1 stalled (Kafka), -2 Redis down, -3 stop. */
static int scan_partition(struct pq_redrive_s *r, rjob_t *j, int32_t p, int64_t lo, int64_t hi,
                          rcount_t *c)
{
    rd_kafka_message_t *msgs[REDRIVE_BATCH];
    int64_t next = lo, last_progress = pq_mono_ms();
    int rc = 0;

    if (rd_kafka_consume_start(r->rkt_dlq, p, lo) == -1) {
        PQ_WARN("redrive: cannot read %s [%d]: %s", r->topic_dlq, (int)p,
                rd_kafka_err2str(rd_kafka_last_error()));
        return -1;
    }
    while (next < hi && rc == 0) {
        ssize_t n;
        size_t want;
        int rec;

        if (atomic_load(&r->stop)) {
            rc = -3;
            break;
        }
        /* consume_batch waits until it has as many as asked for: never ask for more than
         * remain below hi (a gap, e.g. a transaction marker, only costs the timeout) */
        want = hi - next < REDRIVE_BATCH ? (size_t)(hi - next) : REDRIVE_BATCH;
        n = rd_kafka_consume_batch(r->rkt_dlq, p, 200, msgs, want);
        if (n <= 0) {
            if (pq_mono_ms() - last_progress > REDRIVE_STALL_MS) {
                PQ_WARN("redrive: %s [%d]: no records for %d ms at offset %lld (high watermark "
                        "%lld)",
                        r->topic_dlq, (int)p, REDRIVE_STALL_MS, (long long)next, (long long)hi);
                rc = -1;
            }
            continue;
        }
        for (ssize_t i = 0; i < n; i++) {
            rd_kafka_message_t *m = msgs[i];

            if (rc != 0 || m->err || m->offset >= hi || m->offset < next) {
                if (m->err && m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF && rc == 0)
                    PQ_DBG("redrive: %s [%d]: %s", r->topic_dlq, (int)p, rd_kafka_err2str(m->err));
                if (!m->err && m->offset >= hi)
                    next = hi;
                rd_kafka_message_destroy(m);
                continue;
            }
            last_progress = pq_mono_ms();
            next = m->offset + 1;
            rec = record(r, j, m);
            if (rec != REC_OTHER)
                c->scanned++;
            switch (rec) {
            case REC_OTHER:
            case REC_IGNORED:
                break;
            case REC_SKIPPED:
                c->skipped++;
                break;
            case REC_ALREADY:
                c->matched++;
                c->already++;
                break;
            case REC_PRODUCED:
                c->matched++;
                if ((long)r->nitems >= j->limit) {
                    rc = 1;
                    c->has_more = next < hi;
                }
                break;
            case REC_FAILED:
                c->matched++;
                c->failed++;
                break;
            default:
                rc = -2;
                break;
            }
            rd_kafka_message_destroy(m);
        }
        if (r->dr_pending > 0)
            rd_kafka_poll(r->producer, 0);
    }
    rd_kafka_consume_stop(r->rkt_dlq, p);
    return rc;
}

static void scan(struct pq_redrive_s *r, rjob_t *j)
{
    const rd_kafka_metadata_t *md = NULL;
    rd_kafka_resp_err_t err;
    rcount_t c;
    int64_t *lo = NULL, *hi = NULL;
    int np = 0, rc = 0;
    char msg[256], errstr[256];

    memset(&c, 0, sizeof(c));
    r->nitems = 0;
    r->dr_pending = 0;
    if (!r->producer) {
        r->producer = producer_new(r, errstr, sizeof(errstr));
        if (!r->producer) {
            PQ_ERR("redrive: producer: %s", errstr);
            answer_error(j, 503, "5", "unavailable", "dlq redrive: no Kafka producer; retry");
            return;
        }
    }
    if (redis_connect(r)) {
        answer_error(j, 503, "1", "unavailable", "dlq redrive: job store (Redis) unavailable");
        return;
    }
    err = rd_kafka_metadata(r->consumer, 0, r->rkt_dlq, &md, REDRIVE_KAFKA_TIMEOUT_MS);
    if (err || !md || md->topic_cnt < 1) {
        PQ_WARN("redrive: %s metadata: %s", r->topic_dlq, rd_kafka_err2str(err));
        answer_error(j, 503, "5", "unavailable", "dlq redrive: Kafka unavailable; retry");
        goto out;
    }
    if (md->topics[0].err == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) {
        answer_scan(r, j, &c); /* no dlq topic yet: nothing dead-lettered */
        goto out;
    }
    if (md->topics[0].err) {
        /* not authorised, no leader yet...: never answer "nothing to redrive" then */
        PQ_WARN("redrive: %s metadata: %s", r->topic_dlq, rd_kafka_err2str(md->topics[0].err));
        answer_error(j, 503, "5", "unavailable", "dlq redrive: the dlq topic is not readable now");
        goto out;
    }
    np = md->topics[0].partition_cnt;
    lo = calloc((size_t)(np > 0 ? np : 1), sizeof(*lo));
    hi = calloc((size_t)(np > 0 ? np : 1), sizeof(*hi));
    if (!lo || !hi) {
        answer_error(j, 500, NULL, "internal", "out of memory");
        goto out;
    }
    for (int i = 0; i < np; i++) {
        int32_t p = md->topics[0].partitions[i].id;

        err = rd_kafka_query_watermark_offsets(r->consumer, r->topic_dlq, p, &lo[i], &hi[i],
                                               REDRIVE_KAFKA_TIMEOUT_MS);
        if (err) {
            PQ_WARN("redrive: %s [%d] watermarks: %s", r->topic_dlq, (int)p, rd_kafka_err2str(err));
            answer_error(j, 503, "5", "unavailable", "dlq redrive: Kafka unavailable; retry");
            goto out;
        }
    }
    for (int i = 0; i < np && rc == 0; i++) {
        if (lo[i] >= hi[i])
            continue;
        rc = scan_partition(r, j, md->topics[0].partitions[i].id, lo[i], hi[i], &c);
        if (rc == 1 && !c.has_more) {
            for (int k = i + 1; k < np; k++)
                if (lo[k] < hi[k])
                    c.has_more = 1;
        }
    }
    wait_deliveries(r);
    mark_produced(r, j->tenant);
    for (size_t i = 0; i < r->nitems; i++) {
        if (r->items[i].state == 1) {
            c.redriven++;
        } else {
            c.failed++;
            job_drop(r, j->tenant, r->items[i].id);
        }
    }
    pq_counter_add(r->m_redriven, (uint64_t)c.redriven);
    PQ_INFO("redrive for tenant %s: scanned %ld, matched %ld, redriven %ld, already %ld, skipped "
            "%ld, failed %ld%s",
            j->tenant, c.scanned, c.matched, c.redriven, c.already, c.skipped, c.failed,
            rc == -1   ? " (Kafka stalled)"
            : rc == -2 ? " (Redis unavailable)"
            : rc == -3 ? " (stopping)"
                       : "");
    if (rc < 0 || c.failed > 0) {
        snprintf(msg, sizeof(msg),
                 "dlq redrive interrupted (%s): %ld jobs redriven, %ld not; retry (jobs already "
                 "redriven are not run twice)",
                 rc == -2   ? "job store (Redis) unavailable"
                 : rc == -3 ? "shutting down"
                            : "Kafka unavailable",
                 c.redriven, c.failed);
        answer_error(j, 503, rc == -2 ? "1" : "5", "unavailable", msg);
    } else {
        answer_scan(r, j, &c);
    }
out:
    if (md)
        rd_kafka_metadata_destroy(md);
    free(lo);
    free(hi);
    if (r->producer && rd_kafka_fatal_error(r->producer, errstr, sizeof(errstr))) {
        PQ_ERR("redrive: fatal producer error (%s): recreating the producer", errstr);
        producer_destroy(r);
    }
}

/* ---- the thread ---- */

static void deliver(rjob_t *j)
{
    event_active(j->ev, EV_TIMEOUT, 0);
}

static void *thread_main(void *arg)
{
    struct pq_redrive_s *r = arg;

    for (;;) {
        rjob_t *j;

        pthread_mutex_lock(&r->mu);
        while (!r->head && !atomic_load(&r->stop))
            pthread_cond_wait(&r->cv, &r->mu);
        j = r->head;
        if (j) {
            r->head = j->next;
            if (!r->head)
                r->tail = NULL;
            r->nqueued--;
        }
        pthread_mutex_unlock(&r->mu);
        if (!j)
            break; /* stopping and nothing queued */
        if (atomic_load(&r->stop)) {
            answer_error(j, 503, "1", "unavailable", "shutting down");
        } else {
            pq_counter_add(r->m_scans, 1);
            scan(r, j);
        }
        if (!j->answer)
            answer_error(j, 500, NULL, "internal", "out of memory");
        deliver(j);
    }
    return NULL;
}

/* ---- the loop's side ---- */

/* The answer is back on the request's loop. */
static void on_answer(evutil_socket_t fd, short what, void *arg)
{
    rjob_t *j = arg;
    pq_slot_t *s = pq_slot_from_handle(j->t, j->handle);

    if (s && s->path == PQ_PATH_DLQ && s->req) {
        struct evhttp_request *req = s->req;

        if (j->retry_after)
            evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After",
                              j->retry_after);
        if (j->answer)
            pq_http_reply(j->t, req, PQ_PATH_DLQ, j->code, j->answer, j->answer_len);
        else
            pq_http_error(j->t, req, PQ_PATH_DLQ, 500, "internal", "out of memory");
        s->req = NULL;
        pq_slot_release(s);
    }
    rjob_free(j);
}

/* The request's connection is going away (client gone, or evhttp freeing it): the request is
 * freed here (detached) or by evhttp; its scan's answer is dropped. */
static void on_close(struct evhttp_connection *evcon, void *handle)
{
    pq_bthread_t *t = pq_bthread_current;
    pq_slot_t *s;

    if (!t || !(s = pq_slot_from_handle(t, handle)) || s->path != PQ_PATH_DLQ || !s->req)
        return;
    if (!evhttp_request_get_connection(s->req))
        evhttp_request_free(s->req);
    s->req = NULL;
    pq_slot_release(s);
}

void pq_redrive_serve(pq_bthread_t *t, struct evhttp_request *req)
{
    struct pq_redrive_s *r = t->b->redrive;
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    char tenant[PQ_TENANT_MAX + 1], errstr[512];
    rjob_t *j = NULL;
    pq_slot_t *s;
    int busy = 0, stopped = 0;

    if (pq_api_tenant(t, req, PQ_PATH_DLQ, tenant, sizeof(tenant)))
        return;
    if (len > REDRIVE_BODY_MAX) {
        pq_http_error(t, req, PQ_PATH_DLQ, 413, "too_large", "body over %d bytes",
                      REDRIVE_BODY_MAX);
        return;
    }
    j = calloc(1, sizeof(*j));
    if (!j) {
        pq_http_error(t, req, PQ_PATH_DLQ, 500, "internal", "out of memory");
        return;
    }
    pq_strlcpy(j->tenant, tenant, sizeof(j->tenant));
    j->t = t;
    if (parse_body(j, len ? (const char *)evbuffer_pullup(in, -1) : "", len, errstr,
                   sizeof(errstr))) {
        pq_http_error(t, req, PQ_PATH_DLQ, 400, "invalid_request", "%s", errstr);
        goto out_free;
    }
    if (!r) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", "5");
        pq_http_error(t, req, PQ_PATH_DLQ, 503, "unavailable", "dlq redrive is not running");
        goto out_free;
    }
    j->ev = event_new(t->base, -1, 0, on_answer, j);
    s = j->ev ? pq_slot_get(t, PQ_PATH_DLQ, req, &pq_api_ops) : NULL;
    if (!s) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", "1");
        pq_http_error(t, req, PQ_PATH_DLQ, 503, "unavailable", "too many requests in flight");
        goto out_free;
    }
    s->state = PQ_SLOT_API; /* no timer: the redrive thread answers exactly once */
    pq_strlcpy(s->tenant, tenant, sizeof(s->tenant));
    j->handle = pq_slot_handle(s);

    pthread_mutex_lock(&r->mu);
    if (atomic_load(&r->stop)) {
        stopped = 1;
    } else if (r->nqueued >= REDRIVE_QUEUE_MAX) {
        busy = 1;
    } else {
        if (r->tail)
            r->tail->next = j;
        else
            r->head = j;
        r->tail = j;
        r->nqueued++;
        pthread_cond_signal(&r->cv);
    }
    pthread_mutex_unlock(&r->mu);
    if (busy || stopped) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After",
                          busy ? REDRIVE_RETRY_BUSY : "1");
        if (busy)
            pq_http_error(t, req, PQ_PATH_DLQ, 429, "rate_limited",
                          "%d dlq redrives are already waiting; retry later", REDRIVE_QUEUE_MAX);
        else
            pq_http_error(t, req, PQ_PATH_DLQ, 503, "unavailable", "shutting down");
        pq_slot_release(s);
        goto out_free;
    }
    evhttp_connection_set_closecb(evhttp_request_get_connection(req), on_close, j->handle);
    return;
out_free:
    rjob_free(j);
}

int pq_redrive_start(pq_broker_t *b, char *errstr, size_t errstr_size)
{
    struct pq_redrive_s *r = calloc(1, sizeof(*r));
    int rc;

    if (!r) {
        snprintf(errstr, errstr_size, "out of memory");
        return -1;
    }
    r->b = b;
    pq_bconf_ref(b->bconf);
    r->bc = b->bconf;
    atomic_init(&r->stop, 0);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    pq_conf_topic(r->bc->conf, "dlq", r->topic_dlq, sizeof(r->topic_dlq));
    r->m_redriven = pq_metrics_counter(b->metrics, "promptq_broker_dlq_redriven_total",
                                       "Dead-lettered jobs re-queued as new jobs by POST "
                                       "/v1/dlq/redrive (delivered to Kafka)",
                                       NULL);
    r->m_scans = pq_metrics_counter(b->metrics, "promptq_broker_dlq_redrive_scans_total",
                                    "POST /v1/dlq/redrive scans of the dlq topic", NULL);
    b->redrive = r;
    if (!r->m_redriven || !r->m_scans) {
        snprintf(errstr, errstr_size, "out of memory");
        goto fail;
    }
    r->consumer = consumer_new(r, errstr, errstr_size);
    if (!r->consumer)
        goto fail;
    r->producer = producer_new(r, errstr, errstr_size);
    if (!r->producer)
        goto fail;
    rc = pthread_create(&r->thread, NULL, thread_main, r);
    if (rc) {
        snprintf(errstr, errstr_size, "pthread_create: %s", strerror(rc));
        goto fail;
    }
    r->started = 1;
    return 0;
fail:
    pq_redrive_free(b);
    return -1;
}

void pq_redrive_stop(pq_broker_t *b)
{
    struct pq_redrive_s *r = b ? b->redrive : NULL;

    if (!r)
        return;
    pthread_mutex_lock(&r->mu);
    atomic_store(&r->stop, 1);
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    /* the thread answers what is queued with 503 and ends; a running scan stops at its next
     * batch (after its delivery reports) */
    if (r->started)
        pthread_join(r->thread, NULL);
    r->started = 0;
    if (r->rkt_dlq)
        rd_kafka_topic_destroy(r->rkt_dlq);
    r->rkt_dlq = NULL;
    if (r->consumer)
        rd_kafka_destroy(r->consumer);
    r->consumer = NULL;
    producer_destroy(r);
    redis_close(r);
}

void pq_redrive_free(pq_broker_t *b)
{
    struct pq_redrive_s *r = b ? b->redrive : NULL;

    if (!r)
        return;
    pq_redrive_stop(b);
    b->redrive = NULL;
    free(r->items);
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->mu);
    pq_bconf_unref(r->bc);
    free(r);
}
