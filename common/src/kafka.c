/* librdkafka configuration per role: promptq's fixed settings (G1, G5) plus the config's
 * pass-through properties. */
#include "promptq/kafka.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>

#include "promptq/log.h"

/* Properties promptq sets itself or relies on; a pass-through value would break a guarantee. */
static const struct {
    const char *key;
    const char *why;
} refused[] = {
    {"enable.idempotence", "the producer is always idempotent (G1)"},
    {"acks", "acks=all is required so that acknowledged means durable (G1)"},
    {"request.required.acks", "acks=all is required so that acknowledged means durable (G1)"},
    {"enable.gapless.guarantee", "promptq handles idempotent-producer errors itself (G1)"},
    {"max.in.flight", "bounded by the idempotent producer (G1)"},
    {"max.in.flight.requests.per.connection", "bounded by the idempotent producer (G1)"},
    {"retries", "the idempotent producer must retry (G1)"},
    {"message.send.max.retries", "the idempotent producer must retry (G1)"},
    {"queuing.strategy", "the producer queue must stay FIFO (G1)"},
    {"transactional.id", "promptq does not use Kafka transactions"},
    {"enable.auto.offset.store", "promptq stores offsets up to the lowest job in flight (G5)"},
    {"enable.auto.commit", "promptq commits only the offsets it stores (G5)"},
    {"auto.commit.enable", "promptq commits only the offsets it stores (G5)"},
    {"offset.store.method", "promptq commits only the offsets it stores (G5)"},
    {"auto.offset.reset", "must stay earliest (G5)"},
    {"isolation.level", "promptq reads committed messages only (G5)"},
    {"enable.partition.eof", "the worker does not handle partition EOF events"},
    {"group.id", "set worker.group_id instead"},
};

const char *pq_kafka_key_refused_why(const char *key)
{
    if (!key)
        return NULL;
    for (size_t i = 0; i < sizeof(refused) / sizeof(refused[0]); i++)
        if (!strcasecmp(key, refused[i].key))
            return refused[i].why;
    return NULL;
}

int pq_kafka_key_refused(const char *key)
{
    return pq_kafka_key_refused_why(key) != NULL;
}

/* Replaces every occurrence of value in msg by "***" (librdkafka quotes bad values in its
 * errors; a value may be a password). Values shorter than 4 bytes are left alone: they cannot
 * be secrets worth hiding and would mangle the message. */
static void scrub_value(char *msg, size_t size, const char *value)
{
    size_t vlen = strlen(value);
    char out[512];
    size_t o = 0;
    const char *p = msg;

    if (vlen < 4)
        return;
    while (*p && o + 4 < sizeof(out)) {
        if (!strncmp(p, value, vlen)) {
            memcpy(out + o, "***", 3);
            o += 3;
            p += vlen;
        } else {
            out[o++] = *p++;
        }
    }
    out[o] = '\0';
    snprintf(msg, size, "%s", out);
}

int pq_kafka_conf_set(rd_kafka_conf_t *rk, const char *key, const char *value, char *errstr,
                      size_t errstr_size)
{
    char buf[512];
    const char *why = pq_kafka_key_refused_why(key);

    if (why) {
        snprintf(errstr, errstr_size, "kafka.%s: refused: %s", key, why);
        return -1;
    }
    buf[0] = '\0';
    if (rd_kafka_conf_set(rk, key, value, buf, sizeof(buf)) != RD_KAFKA_CONF_OK) {
        scrub_value(buf, sizeof(buf), value);
        snprintf(errstr, errstr_size, "kafka.%s: %s", key, buf[0] ? buf : "invalid");
        return -1;
    }
    return 0;
}

/* Sets a fixed property; these are known to librdkafka 2.0, so failure is a bug. */
static int set_fixed(rd_kafka_conf_t *rk, const char *key, const char *value, char *errstr,
                     size_t errstr_size)
{
    char buf[256];

    if (rd_kafka_conf_set(rk, key, value, buf, sizeof(buf)) != RD_KAFKA_CONF_OK) {
        snprintf(errstr, errstr_size, "kafka: cannot set %s: %s", key, buf);
        return -1;
    }
    return 0;
}

static const char *kv_get(const pq_conf_t *conf, const char *key)
{
    for (size_t i = 0; conf && i < conf->nkafka; i++)
        if (!strcmp(conf->kafka[i].key, key))
            return conf->kafka[i].value;
    return NULL;
}

#define REFRESH_KEY "topic.metadata.refresh.interval.ms"
#define REFRESH_MAX 5000

void pq_kafka_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    if (strcmp(fac, "CONFWARN") == 0 && strstr(buf, "will be ignored by this"))
        level = LOG_DEBUG;
    if (level <= LOG_ERR)
        PQ_ERR("kafka %s: %s", fac, buf);
    else if (level == LOG_WARNING)
        PQ_WARN("kafka %s: %s", fac, buf);
    else if (level <= LOG_INFO)
        PQ_INFO("kafka %s: %s", fac, buf);
    else
        PQ_DBG("kafka %s: %s", fac, buf);
}

rd_kafka_t *pq_kafka_client_new(rd_kafka_type_t type, rd_kafka_conf_t *kc,
                                const pq_kafka_cbs_t *cbs, char *errstr, size_t errstr_size)
{
    rd_kafka_t *rk;

    if (!kc)
        return NULL;
    rd_kafka_conf_set_opaque(kc, cbs->opaque);
    if (cbs->dr_msg)
        rd_kafka_conf_set_dr_msg_cb(kc, cbs->dr_msg);
    if (cbs->error)
        rd_kafka_conf_set_error_cb(kc, cbs->error);
    if (cbs->stats)
        rd_kafka_conf_set_stats_cb(kc, cbs->stats);
    if (cbs->log)
        rd_kafka_conf_set_log_cb(kc, cbs->log);
    if (cbs->rebalance)
        rd_kafka_conf_set_rebalance_cb(kc, cbs->rebalance);
    rk = rd_kafka_new(type, kc, errstr, errstr_size);
    if (!rk)
        rd_kafka_conf_destroy(kc); /* rd_kafka_new took it only on success */
    return rk;
}

rd_kafka_conf_t *pq_kafka_conf_new(const pq_conf_t *conf, pq_kafka_role_t role, char *errstr,
                                   size_t errstr_size)
{
    rd_kafka_conf_t *rk = rd_kafka_conf_new();

    if (!rk) {
        snprintf(errstr, errstr_size, "kafka: out of memory");
        return NULL;
    }
    rd_kafka_conf_set_log_cb(rk, pq_kafka_log);
    if (role == PQ_KAFKA_PRODUCER) {
        if (set_fixed(rk, "enable.idempotence", "true", errstr, errstr_size) ||
            set_fixed(rk, "acks", "all", errstr, errstr_size))
            goto out_destroy;
        if (!kv_get(conf, "linger.ms") && !kv_get(conf, "queue.buffering.max.ms") &&
            set_fixed(rk, "linger.ms", "1", errstr, errstr_size))
            goto out_destroy;
    } else {
        if (conf && conf->group_id &&
            set_fixed(rk, "group.id", conf->group_id, errstr, errstr_size))
            goto out_destroy;
        if (set_fixed(rk, "enable.auto.offset.store", "false", errstr, errstr_size) ||
            set_fixed(rk, "enable.auto.commit", "true", errstr, errstr_size) ||
            set_fixed(rk, "auto.offset.reset", "earliest", errstr, errstr_size) ||
            set_fixed(rk, "enable.partition.eof", "false", errstr, errstr_size) ||
            set_fixed(rk, REFRESH_KEY, "5000", errstr, errstr_size))
            goto out_destroy;
        /* librdkafka's default is 5 s. A rebalance redelivers what finished since the last
         * commit (the commit on revoke may be refused mid-rebalance: the embedded mock cluster
         * always refuses it), so commit the stored offsets every second. */
        if (!kv_get(conf, "auto.commit.interval.ms") &&
            set_fixed(rk, "auto.commit.interval.ms", "1000", errstr, errstr_size))
            goto out_destroy;
    }

    for (size_t i = 0; conf && i < conf->nkafka; i++) {
        const char *key = conf->kafka[i].key, *value = conf->kafka[i].value;
        char capped[32];

        if (role == PQ_KAFKA_CONSUMER && !strcmp(key, REFRESH_KEY)) {
            char *end;
            long v = strtol(value, &end, 10);

            /* -1 disables the refresh; anything above the cap is lowered to it. */
            if (end != value && *end == '\0' && (v < 0 || v > REFRESH_MAX)) {
                snprintf(capped, sizeof(capped), "%d", REFRESH_MAX);
                value = capped;
            }
        }
        if (pq_kafka_conf_set(rk, key, value, errstr, errstr_size))
            goto out_destroy;
    }
    return rk;

out_destroy:
    rd_kafka_conf_destroy(rk);
    return NULL;
}
