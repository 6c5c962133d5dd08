/* Generations of providers and routes (gen.h). */
#include "gen.h"
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "park.h"
#include "promptq/log.h"
#include "promptq/util.h"

#define TOPIC_WAIT_MS 5000
#define ADMIN_WAIT_MS 1500

void pq_gen_free(pq_gen_t *g)
{
    pq_provs_destroy(g->provs);
    if (g->owned)
        pq_conf_destroy(g->conf);
    free(g);
}

void pq_gen_unref(pq_worker_t *w, pq_gen_t *g)
{
    pq_gen_t **pp;

    if (!g || --g->refs > 0)
        return;
    for (pp = &w->retired; *pp; pp = &(*pp)->next) {
        if (*pp == g) {
            *pp = g->next;
            break;
        }
    }
    pq_gen_free(g);
}

pq_gen_t *pq_gen_new(pq_worker_t *w, pq_conf_t *conf, int owned, char *errstr, size_t errstr_size)
{
    pq_gen_t *g = calloc(1, sizeof(*g));

    if (!g) {
        snprintf(errstr, errstr_size, "out of memory");
        return NULL;
    }
    g->conf = conf;
    g->refs = 1;
    g->provs = pq_provs_new(w->base, conf, w->http, w->metrics, errstr, errstr_size);
    if (!g->provs) {
        free(g);
        return NULL;
    }
    g->owned = owned;
    pq_provs_set_listener(g->provs, pq_park_on_circuit, w);
    return g;
}

/* Marks the routes of the current config active (creating their states). */
void pq_gen_routes_refresh(pq_worker_t *w)
{
    const pq_conf_t *c = w->gen->conf;

    for (pq_route_state_t *rs = w->routes; rs; rs = rs->next)
        rs->active = 0;
    for (size_t i = 0; i < c->nroutes; i++) {
        pq_route_state_t *rs = pq_park_route(w, c->routes[i].name);
        if (rs)
            rs->active = 1;
    }
}

/* Creates one topic through a metadata request (the cluster auto-creates it); waits for it to
 * have partitions. Returns 0 or -1. */
static int topic_autocreate(pq_worker_t *w, const char *name)
{
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(w->producer, name, NULL);
    int64_t deadline = pq_mono_ms() + TOPIC_WAIT_MS;
    int rc = -1;

    if (!rkt)
        return -1;
    while (rc != 0 && pq_mono_ms() < deadline) {
        const struct rd_kafka_metadata *md = NULL;
        if (rd_kafka_metadata(w->producer, 0, rkt, &md, 1000) == RD_KAFKA_RESP_ERR_NO_ERROR && md) {
            if (md->topic_cnt == 1 && md->topics[0].err == RD_KAFKA_RESP_ERR_NO_ERROR &&
                md->topics[0].partition_cnt > 0)
                rc = 0;
            rd_kafka_metadata_destroy(md);
        }
        if (rc != 0)
            usleep(100 * 1000);
    }
    rd_kafka_topic_destroy(rkt);
    return rc;
}

/* Creates every active route's retry topic before subscribing to it: Admin API CreateTopics
 * (topics.partitions partitions), or, when the cluster does not support it (promptq-devkafka),
 * a metadata request that auto-creates it. Blocks up to a few seconds (at start and SIGHUP).
 * Returns the number of topics that could not be created. */
int pq_gen_retry_topics_create(pq_worker_t *w)
{
    const pq_conf_t *c = w->gen->conf;
    rd_kafka_NewTopic_t **nts = NULL;
    const char **names = NULL;
    int *fallback = NULL;
    rd_kafka_AdminOptions_t *opt = NULL;
    rd_kafka_queue_t *q = NULL;
    rd_kafka_event_t *ev = NULL;
    char why[256] = "";
    size_t n = 0;
    int failed = 0;

    for (pq_route_state_t *rs = w->routes; rs; rs = rs->next)
        n += rs->active;
    if (n == 0)
        return 0;
    nts = calloc(n, sizeof(*nts));
    names = calloc(n, sizeof(*names));
    fallback = calloc(n, sizeof(*fallback));
    if (!nts || !names || !fallback) {
        failed = (int)n;
        goto out;
    }
    n = 0;
    for (pq_route_state_t *rs = w->routes; rs; rs = rs->next) {
        char err[200];
        if (!rs->active)
            continue;
        names[n] = rs->topic;
        nts[n] = rd_kafka_NewTopic_new(rs->topic, c->topic_partitions > 0 ? c->topic_partitions : 4,
                                       -1, err, sizeof(err));
        fallback[n] = 1;
        if (!nts[n])
            PQ_WARN("retry topic %s: %s", rs->topic, err);
        n++;
    }
    /* librdkafka's mock cluster (promptq-devkafka, cluster id "mockCluster...") lacks the API
     * and a cluster that did not answer it before is not asked again */
    if (w->no_admin || (w->cluster_id && strncmp(w->cluster_id, "mockCluster", 11) == 0)) {
        snprintf(why, sizeof(why), "not supported by this cluster");
        goto fallback;
    }
    opt = rd_kafka_AdminOptions_new(w->producer, RD_KAFKA_ADMIN_OP_CREATETOPICS);
    q = rd_kafka_queue_new(w->producer);
    if (opt && q) {
        size_t k = 0;
        rd_kafka_NewTopic_t **valid = calloc(n, sizeof(*valid));
        rd_kafka_AdminOptions_set_request_timeout(opt, ADMIN_WAIT_MS, NULL, 0);
        for (size_t i = 0; valid && i < n; i++)
            if (nts[i])
                valid[k++] = nts[i];
        if (k > 0) {
            rd_kafka_CreateTopics(w->producer, valid, k, opt, q);
            ev = rd_kafka_queue_poll(q, ADMIN_WAIT_MS + 1000);
        }
        free(valid);
    }
    if (ev && rd_kafka_event_error(ev)) {
        snprintf(why, sizeof(why), "%s", rd_kafka_event_error_string(ev));
        w->no_admin = rd_kafka_event_error(ev) == RD_KAFKA_RESP_ERR__TIMED_OUT;
    } else if (ev) {
        const rd_kafka_CreateTopics_result_t *res = rd_kafka_event_CreateTopics_result(ev);
        size_t cnt = 0;
        const rd_kafka_topic_result_t **tr =
            res ? rd_kafka_CreateTopics_result_topics(res, &cnt) : NULL;
        for (size_t i = 0; i < cnt; i++) {
            rd_kafka_resp_err_t e = rd_kafka_topic_result_error(tr[i]);
            const char *name = rd_kafka_topic_result_name(tr[i]);
            for (size_t t = 0; t < n; t++) {
                if (strcmp(names[t], name) != 0)
                    continue;
                if (e == RD_KAFKA_RESP_ERR_NO_ERROR) {
                    PQ_INFO("retry topic %s created (CreateTopics)", name);
                    fallback[t] = 0;
                } else if (e == RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS) {
                    PQ_DBG("retry topic %s exists", name);
                    fallback[t] = 0;
                } else {
                    snprintf(why, sizeof(why), "%s", rd_kafka_err2str(e));
                }
            }
        }
    } else {
        snprintf(why, sizeof(why), "no answer");
    }
fallback:
    for (size_t t = 0; t < n; t++) {
        if (!fallback[t])
            continue;
        if (topic_autocreate(w, names[t]) == 0) {
            PQ_INFO("retry topic %s auto-created by a metadata request (CreateTopics: %s)",
                    names[t], why[0] ? why : "not supported");
        } else {
            PQ_ERR("retry topic %s could not be created (CreateTopics: %s; metadata request "
                   "timed out): parking on that route waits for it",
                   names[t], why[0] ? why : "not supported");
            failed++;
        }
    }
out:
    if (ev)
        rd_kafka_event_destroy(ev);
    if (q)
        rd_kafka_queue_destroy(q);
    if (opt)
        rd_kafka_AdminOptions_destroy(opt);
    for (size_t i = 0; nts && i < n; i++)
        if (nts[i])
            rd_kafka_NewTopic_destroy(nts[i]);
    free(nts);
    free(names);
    free(fallback);
    return failed;
}
