/* Producing a job's records (produce.h). */
#include "produce.h"
#include <string.h>

rd_kafka_resp_err_t pq_worker_produce(pq_worker_t *w, int topic, const char *key, const char *value,
                                      size_t len, void *msg_opaque)
{
    rd_kafka_topic_t *t = topic == PQ_T_RESULTS ? w->t_results : w->t_dlq;

    if (rd_kafka_produce(t, RD_KAFKA_PARTITION_UA, 0, (void *)value, len, key,
                         key ? strlen(key) : 0, msg_opaque) == -1)
        return rd_kafka_last_error();
    return RD_KAFKA_RESP_ERR_NO_ERROR;
}

rd_kafka_resp_err_t pq_worker_produce_to(pq_worker_t *w, const char *topic, const char *key,
                                         const char *value, size_t len, void *msg_opaque)
{
    return rd_kafka_producev(
        w->producer, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(key, key ? strlen(key) : 0),
        RD_KAFKA_V_VALUE((void *)value, len), RD_KAFKA_V_OPAQUE(msg_opaque), RD_KAFKA_V_END);
}
