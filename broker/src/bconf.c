/* The broker's view of a loaded config (pq_bconf_t, reference counted) and its clock. */
#include "broker.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "promptq/kafka.h"
#include "promptq/keys.h"
#include "promptq/log.h"
#include "promptq/util.h"

int64_t pq_mono_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

pq_bconf_t *pq_bconf_new(pq_conf_t *conf)
{
    pq_bconf_t *bc = calloc(1, sizeof(*bc));
    const char *mmb;
    long long max = 1000000;

    if (!bc) {
        pq_conf_destroy(conf);
        return NULL;
    }
    bc->conf = conf;
    atomic_init(&bc->refs, 1);
    mmb = pq_conf_kafka_get(conf, "message.max.bytes");
    if (mmb && atoll(mmb) > 0)
        max = atoll(mmb);
    max -= PQ_BROKER_ENVELOPE_HEADROOM;
    if (max < 1024)
        max = 1024;
    if (conf->max_body_bytes > 0 && conf->max_body_bytes < max)
        max = conf->max_body_bytes;
    bc->max_body = (size_t)max;
    bc->limits = pq_envelope_limits_default;
    bc->limits.max_bytes = bc->max_body;
    if (conf->max_prompt_bytes > 0)
        bc->limits.max_prompt_bytes = (size_t)conf->max_prompt_bytes;
    pq_conf_topic(conf, "requests", bc->topic_requests, sizeof(bc->topic_requests));
    pq_conf_topic(conf, "results", bc->topic_results, sizeof(bc->topic_results));
    pq_conf_topic(conf, "bulk", bc->topic_bulk, sizeof(bc->topic_bulk));
    return bc;
}

void pq_bconf_ref(pq_bconf_t *bc)
{
    atomic_fetch_add(&bc->refs, 1);
}

void pq_bconf_unref(pq_bconf_t *bc)
{
    if (bc && atomic_fetch_sub(&bc->refs, 1) == 1) {
        pq_conf_destroy(bc->conf);
        free(bc);
    }
}
