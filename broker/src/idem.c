/* Idempotency-Key on POST /v1/jobs and POST /v1/chat/completions.
 *
 * promptq:idem:{tenant}:{key} holds "<job id> <sha256 of the body> <state>" for
 * broker.idempotency_ttl_s; state is p (claimed, not yet durable), k (in Kafka) or s (spooled).
 * The first use claims the key with a Lua GET-or-SET (so the claim and the lookup are one step)
 * and goes on with its own job; it sets the state once the job is durable, or deletes the key
 * when the job was not accepted, so a retry starts afresh.
 *
 * A repeat with the same body gets the first use's job: 202 with the same id for jobs (nothing
 * is produced again), or the same result for chat (it waits like the first one). The same key
 * with another body is 422 idempotency_key_reused. A repeat that finds the claim still pending
 * (two concurrent first uses: one won the claim) re-runs the claim after a short delay until
 * the winner's job is durable or the claim is gone (then it claims the key itself); past the
 * deadline it answers 409 and the client retries. */
#include "broker.h"
#include "http.h"
#include "idem.h"
#include "rconn.h"
#include "slot.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/keyvalq_struct.h>
#include <hiredis/hiredis.h>

#include "promptq/keys.h"
#include "promptq/log.h"
#include "promptq/util.h"

#define IDEM_RETRY_FIRST_MS 20
#define IDEM_RETRY_MAX_MS   250
/* A pending claim is waited for at most ack_timeout_ms plus this (the spool's fsync). */
#define IDEM_PENDING_EXTRA_MS 5000

int pq_idem_header(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, const char **key)
{
    const char *k = evhttp_find_header(evhttp_request_get_input_headers(req), "Idempotency-Key");
    size_t n;

    *key = NULL;
    if (!k)
        return 0;
    n = strlen(k);
    for (size_t i = 0; i < n; i++) {
        if ((unsigned char)k[i] <= 0x20 || (unsigned char)k[i] >= 0x7f) {
            n = 0;
            break;
        }
    }
    if (n == 0 || n > PQ_IDEM_KEY_MAX) {
        pq_http_error(t, req, path, 400, "invalid_request",
                      "Idempotency-Key: 1 to %d printable ASCII characters without spaces",
                      PQ_IDEM_KEY_MAX);
        return -1;
    }
    *key = k;
    return 0;
}

static void idem_unavailable(pq_slot_t *s, const char *why)
{
    pq_http_unavailable(s->t, s->req, s->path, "1", why);
    pq_slot_release(s);
}

static void claim_cb(redisAsyncContext *ac, void *reply, void *handle)
{
    pq_slot_t *s = pq_slot_replied(ac, reply, handle);

    if (s && s->state == PQ_SLOT_IDEM)
        pq_idem_reply(s, reply);
}

static int send_claim(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;
    char value[PQ_ID_MAX + PQ_SHA256_HEX_LEN + 8], ttl[24];
    const char *argv[6];
    size_t argvlen[6];

    snprintf(value, sizeof(value), "%s %s p", s->id, s->body_hash);
    snprintf(ttl, sizeof(ttl), "%lld", (long long)t->bc->conf->idempotency_ttl_s * 1000);
    argv[0] = "EVALSHA";
    argv[1] = pq_rconn_sha(pq_bscript_idem_claim);
    argv[2] = "1";
    argv[3] = s->idem.key;
    argv[4] = value;
    argv[5] = ttl;
    for (int i = 0; i < 6; i++)
        argvlen[i] = strlen(argv[i]);
    if (pq_rconn_send(t, claim_cb, pq_slot_handle(s), 6, argv, argvlen))
        return -1;
    s->state = PQ_SLOT_IDEM;
    event_del(&s->timer);
    event_add(&s->timer, t->tv_redis);
    return 0;
}

void pq_idem_start(pq_slot_t *s, const char *key, void (*first)(pq_slot_t *s),
                   void (*repeat)(pq_slot_t *s, int spooled))
{
    pq_bthread_t *t = s->t;
    char rkey[PQ_TENANT_MAX + PQ_IDEM_KEY_MAX + 128];
    const pq_conf_t *conf = t->bc->conf;
    int ack = conf->ack_timeout_ms > 0 ? conf->ack_timeout_ms : 1000;

    if (pq_key_idem(rkey, sizeof(rkey), conf->redis_prefix, s->tenant, key) < 0 ||
        !(s->idem.key = strdup(rkey))) {
        pq_http_error(t, s->req, s->path, 500, "internal", "out of memory");
        pq_slot_release(s);
        return;
    }
    s->idem.first = first;
    s->idem.repeat = repeat;
    s->idem.tries = 0;
    s->idem.deadline_ms = pq_mono_ms() + ack + IDEM_PENDING_EXTRA_MS;
    if (send_claim(s))
        idem_unavailable(s, "the idempotency store (Redis) is unavailable");
}

void pq_idem_timeout(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;

    if (s->need_read) {
        /* the delay before claiming again passed */
        s->need_read = 0;
        if (send_claim(s) == 0)
            return;
    }
    pq_counter_add(t->b->m_redis_errors, 1);
    idem_unavailable(s, "the idempotency store (Redis) did not answer");
}

/* A repeat of a request whose job is durable: the caller's repeat answers as that job. */
static void replay(pq_slot_t *s, const char *id, char state)
{
    pq_bthread_t *t = s->t;

    pq_counter_add(t->b->m_idem_replayed, 1);
    pq_strlcpy(s->id, id, sizeof(s->id));
    free(s->payload);
    s->payload = NULL;
    s->payload_len = 0;
    event_del(&s->timer);
    s->idem.repeat(s, state == 's');
}

void pq_idem_reply(pq_slot_t *s, const void *r)
{
    const redisReply *reply = r;
    pq_bthread_t *t = s->t;
    char id[PQ_ID_MAX + 1], hash[PQ_SHA256_HEX_LEN + 1], state = 0;
    const char *sp1, *sp2;
    size_t idlen;

    if (s->need_read)
        return; /* a stale reply while waiting to claim again */
    event_del(&s->timer);
    if (!reply || (reply->type != REDIS_REPLY_NIL && reply->type != REDIS_REPLY_STRING)) {
        pq_counter_add(t->b->m_redis_errors, 1);
        idem_unavailable(s, "the idempotency store (Redis) failed");
        return;
    }
    if (reply->type == REDIS_REPLY_NIL) {
        /* first use: this request's own job */
        s->idem.owner = 1;
        s->idem.first(s);
        return;
    }
    sp1 = memchr(reply->str, ' ', reply->len);
    sp2 = sp1 ? memchr(sp1 + 1, ' ', reply->len - (size_t)(sp1 + 1 - reply->str)) : NULL;
    idlen = sp1 ? (size_t)(sp1 - reply->str) : 0;
    if (!sp2 || idlen == 0 || idlen > PQ_ID_MAX || sp2 - sp1 - 1 != PQ_SHA256_HEX_LEN ||
        (size_t)(sp2 + 2 - reply->str) != reply->len) {
        PQ_WARN("idempotency key %s holds an unexpected value", s->idem.key);
        pq_http_error(t, s->req, s->path, 500, "internal", "idempotency record unreadable");
        pq_slot_release(s);
        return;
    }
    memcpy(id, reply->str, idlen);
    id[idlen] = '\0';
    memcpy(hash, sp1 + 1, PQ_SHA256_HEX_LEN);
    hash[PQ_SHA256_HEX_LEN] = '\0';
    state = sp2[1];
    if (strcmp(hash, s->body_hash) != 0) {
        pq_counter_add(t->b->m_idem_reused, 1);
        pq_http_error(t, s->req, s->path, 422, "idempotency_key_reused",
                      "this Idempotency-Key was used with another request body (job %s)", id);
        pq_slot_release(s);
        return;
    }
    if (state == 'k' || state == 's') {
        replay(s, id, state);
        return;
    }
    /* pending: another request holds the claim and its job is not durable yet */
    if (pq_mono_ms() >= s->idem.deadline_ms) {
        evhttp_add_header(evhttp_request_get_output_headers(s->req), "Retry-After", "1");
        pq_http_error(t, s->req, s->path, 409, "idempotency_key_in_use",
                      "a request with this Idempotency-Key is still being accepted; retry");
        pq_slot_release(s);
        return;
    }
    {
        int ms = IDEM_RETRY_FIRST_MS << (s->idem.tries < 4 ? s->idem.tries : 4);
        struct timeval tv;

        if (ms > IDEM_RETRY_MAX_MS)
            ms = IDEM_RETRY_MAX_MS;
        tv.tv_sec = 0;
        tv.tv_usec = ms * 1000;
        s->idem.tries++;
        s->need_read = 1;
        event_add(&s->timer, &tv);
    }
}

void pq_idem_durable(pq_slot_t *s, int spooled)
{
    pq_bthread_t *t = s->t;
    char value[PQ_ID_MAX + PQ_SHA256_HEX_LEN + 8], ttl[24];

    if (!s->idem.owner || !s->idem.key)
        return;
    s->idem.durable = 1;
    snprintf(value, sizeof(value), "%s %s %c", s->id, s->body_hash, spooled ? 's' : 'k');
    snprintf(ttl, sizeof(ttl), "%lld", (long long)t->bc->conf->idempotency_ttl_s * 1000);
    if (pq_rconn_sendf(t, NULL, NULL, "SET %s %s XX PX %s", s->idem.key, value, ttl))
        PQ_WARN("idempotency key of job %s/%s: Redis unavailable, a repeat waits for the claim "
                "to expire",
                s->tenant, s->id);
}

void pq_idem_release(pq_slot_t *s)
{
    if (s->idem.key && s->idem.owner && !s->idem.durable)
        pq_rconn_sendf(s->t, NULL, NULL, "DEL %s", s->idem.key);
    free(s->idem.key);
    s->idem.key = NULL;
    s->idem.owner = 0;
    s->idem.durable = 0;
}
