/* librdkafka configuration shared by the programs. */
#ifndef PROMPTQ_KAFKA_H
#define PROMPTQ_KAFKA_H

#include <stddef.h>
#include <librdkafka/rdkafka.h>
#include "promptq/conf.h"

typedef enum {
    PQ_KAFKA_PRODUCER,
    PQ_KAFKA_CONSUMER,
} pq_kafka_role_t;

/* A new rd_kafka_conf_t with promptq's fixed settings for the role and the config's
 * pass-through "kafka" properties (applied after the fixed ones).
 *   producer: enable.idempotence=true, acks=all, linger.ms=1 unless the config sets linger.ms
 *             (or queue.buffering.max.ms). message.timeout.ms is left to the caller.
 *   consumer: group.id=worker.group_id, enable.auto.offset.store=false,
 *             enable.auto.commit=true, auto.offset.reset=earliest, enable.partition.eof=false,
 *             topic.metadata.refresh.interval.ms=5000 (a configured value is capped at 5000).
 * Offsets (G5): the worker stores offsets itself with rd_kafka_offsets_store() (offset + 1, only
 * up to the lowest job in flight); librdkafka's auto commit then commits only those stored
 * offsets, periodically and on rd_kafka_consumer_close(). The worker may also call
 * rd_kafka_commit(rk, NULL, 0) (e.g. on revoke). Both enable.auto.* keys are therefore refused
 * in the config. librdkafka's log lines go to promptq's log (pq_kafka_log: one format, JSON
 * with log.json, never librdkafka's own stderr lines); other callbacks and opaques are the
 * caller's to add (a caller may set its own log callback and hand lines on to pq_kafka_log).
 * Pass-through keys that would break G1/G5 are refused with an error naming them (the config
 * loader rejects them too). Returns a new conf (the caller owns it; rd_kafka_new takes it), or
 * NULL with errstr set. */
/* librdkafka log callback: its syslog levels mapped onto promptq's log (0-3 error, 4 warn,
 * 5-6 info, 7 debug), "facility: message". A consumer-only property on a producer (and the
 * other way round) is expected, one "kafka" section feeding both: debug, not a warning. */
void pq_kafka_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf);

rd_kafka_conf_t *pq_kafka_conf_new(const pq_conf_t *conf, pq_kafka_role_t role, char *errstr,
                                   size_t errstr_size);

/* The callbacks of a client (NULL: none, or librdkafka's own; log NULL keeps pq_kafka_log). */
typedef struct {
    void *opaque;
    void (*dr_msg)(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque);
    void (*error)(rd_kafka_t *rk, int err, const char *reason, void *opaque);
    int (*stats)(rd_kafka_t *rk, char *json, size_t len, void *opaque);
    void (*log)(const rd_kafka_t *rk, int level, const char *fac, const char *buf);
    void (*rebalance)(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                      rd_kafka_topic_partition_list_t *parts, void *opaque);
} pq_kafka_cbs_t;

/* The one constructor of the programs' producers and consumers: kc (from pq_kafka_conf_new,
 * with the caller's own defaults; taken, also on failure) with cbs set. NULL with errstr set. */
rd_kafka_t *pq_kafka_client_new(rd_kafka_type_t type, rd_kafka_conf_t *kc,
                                const pq_kafka_cbs_t *cbs, char *errstr, size_t errstr_size);

/* 1 if a pass-through kafka property is refused because it would break a guarantee. */
int pq_kafka_key_refused(const char *key);

/* Why a key is refused (static text, e.g. "acks=all is required for acknowledged = durable
 * (G1)"), or NULL if it is not. */
const char *pq_kafka_key_refused_why(const char *key);

/* Sets one pass-through property on rk: refused keys and librdkafka's own errors (unknown
 * property, bad value) fail with errstr "kafka.<key>: <why>". The value is never copied into
 * errstr (it may be a password). Returns 0 or -1. */
int pq_kafka_conf_set(rd_kafka_conf_t *rk, const char *key, const char *value, char *errstr,
                      size_t errstr_size);

#endif
