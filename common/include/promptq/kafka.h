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

/* A new rd_kafka_conf_t with promptq's fixed settings for the role (producer: idempotent,
 * acks=all, linger.ms=1; consumer: enable.auto.offset.store=false, auto.offset.reset=earliest,
 * topic.metadata.refresh.interval.ms<=5000) and the config's pass-through "kafka" properties.
 * Pass-through keys that would break G1/G5 are refused with an error naming them (the config
 * loader rejects them too). Returns NULL with errstr set. */
rd_kafka_conf_t *pq_kafka_conf_new(const pq_conf_t *conf, pq_kafka_role_t role, char *errstr,
                                   size_t errstr_size);

/* 1 if a pass-through kafka property is refused because it would break a guarantee. */
int pq_kafka_key_refused(const char *key);

#endif
