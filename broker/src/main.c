/* promptq-broker: HTTP intake that answers 202 only once a job is durable (DESIGN.md §2 G1, §9).
 *
 * The main thread loads the config, starts broker.threads loop threads and then only waits for
 * signals: SIGTERM/SIGINT stop the loops (each one lets its in-flight requests get their
 * delivery reports first), SIGHUP reloads API keys, routes and limits. */
#include "broker.h"
#include "bspool.h"
#include "loop.h"
#include "ratelimit.h"
#include "redrive.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/thread.h>

#include "promptq/kafka.h"
#include "promptq/keys.h"
#include "promptq/log.h"
#include "promptq/util.h"

static int metrics_init(pq_broker_t *b)
{
    static const double ack_bounds[] = {0.0005, 0.001, 0.002, 0.005, 0.01, 0.025,
                                        0.05,   0.1,   0.25,  0.5,   1,    2.5};

    b->metrics = pq_metrics_new();
    if (!b->metrics)
        return -1;
    b->m_accepted =
        pq_metrics_counter(b->metrics, "promptq_broker_jobs_accepted_total",
                           "Jobs acknowledged with 202 (durable)", "durability=\"kafka\"");
    b->m_unavailable = pq_metrics_counter(
        b->metrics, "promptq_broker_unavailable_total",
        "Jobs answered 503 because they could not be made durable in time", NULL);
    b->m_redis_errors = pq_metrics_counter(b->metrics, "promptq_broker_redis_errors_total",
                                           "Redis commands that failed or timed out", NULL);
    b->m_conflicts = pq_metrics_counter(b->metrics, "promptq_broker_job_conflicts_total",
                                        "Job ids reused with another request (409)", NULL);
    b->m_produce_errors = pq_metrics_counter(b->metrics, "promptq_broker_produce_errors_total",
                                             "Produce calls or delivery reports that failed", NULL);
    b->m_ack_latency = pq_metrics_histogram(b->metrics, "promptq_broker_produce_ack_seconds",
                                            "Time from produce to the Kafka delivery report", NULL,
                                            ack_bounds, sizeof(ack_bounds) / sizeof(ack_bounds[0]));
    b->m_inflight = pq_metrics_gauge(b->metrics, "promptq_broker_inflight_requests",
                                     "Requests waiting for Redis or Kafka", NULL);
    b->m_accepted_spooled =
        pq_metrics_counter(b->metrics, "promptq_broker_jobs_accepted_total",
                           "Jobs acknowledged with 202 (durable)", "durability=\"spooled\"");
    b->m_spool_refused_full = pq_metrics_counter(
        b->metrics, "promptq_broker_spool_refusals_total",
        "Jobs the spool could not take (answered 503 or 413)", "reason=\"full\"");
    b->m_spool_refused_error = pq_metrics_counter(
        b->metrics, "promptq_broker_spool_refusals_total",
        "Jobs the spool could not take (answered 503 or 413)", "reason=\"error\"");
    b->m_drained = pq_metrics_counter(b->metrics, "promptq_broker_spool_drained_total",
                                      "Spooled jobs produced to Kafka by the drainer", NULL);
    b->m_drain_failed = pq_metrics_counter(b->metrics, "promptq_broker_spool_drain_failures_total",
                                           "Drainer deliveries that failed and were retried", NULL);
    b->m_drain_dropped = pq_metrics_counter(
        b->metrics, "promptq_broker_spool_rejected_total",
        "Spooled jobs Kafka refused permanently (set aside in spool_dir/rejected)", NULL);
    b->m_producer_recreated =
        pq_metrics_counter(b->metrics, "promptq_broker_producer_recreated_total",
                           "Producers recreated after a fatal idempotent-producer error", NULL);
    b->m_late_delivered = pq_metrics_counter(
        b->metrics, "promptq_broker_late_deliveries_total",
        "Delivery reports that came after the job was spooled (it reaches Kafka twice)", NULL);
    b->m_spool_pending_records =
        pq_metrics_gauge(b->metrics, "promptq_broker_spool_pending_records",
                         "Spooled jobs not yet confirmed by Kafka", NULL);
    b->m_spool_pending_bytes =
        pq_metrics_gauge(b->metrics, "promptq_broker_spool_pending_bytes",
                         "Framed bytes of the spooled jobs not yet confirmed by Kafka", NULL);
    b->m_spool_disk_bytes = pq_metrics_gauge(b->metrics, "promptq_broker_spool_disk_bytes",
                                             "Size of the spool's segment files", NULL);
    b->m_spool_per_fsync =
        pq_metrics_gauge(b->metrics, "promptq_broker_spool_records_per_fsync",
                         "Average jobs committed per spool fsync (group commit) since start", NULL);
    b->m_spool_committed = pq_metrics_counter(b->metrics, "promptq_broker_spool_committed_total",
                                              "Jobs written and fsync'd into the spool", NULL);
    b->m_spool_fsyncs = pq_metrics_counter(b->metrics, "promptq_broker_spool_fsyncs_total",
                                           "Spool fsync batches", NULL);
    b->m_spool_write_failed =
        pq_metrics_counter(b->metrics, "promptq_broker_spool_write_failures_total",
                           "Jobs whose spool write or fsync failed (answered 503)", NULL);
    b->m_chat_waiting = pq_metrics_gauge(b->metrics, "promptq_broker_chat_waiting",
                                         "Chat requests waiting for their job's result", NULL);
    b->m_chat_timeouts =
        pq_metrics_counter(b->metrics, "promptq_broker_chat_timeouts_total",
                           "Chat requests answered 504 at broker.sync_timeout_ms", NULL);
    b->m_chat_abandoned =
        pq_metrics_counter(b->metrics, "promptq_broker_chat_abandoned_total",
                           "Chat waiters dropped because the client disconnected", NULL);
    b->m_chat_notified = pq_metrics_counter(b->metrics, "promptq_broker_chat_notifications_total",
                                            "Reply-channel messages that matched a waiter", NULL);
    b->m_sub_subscribed =
        pq_metrics_counter(b->metrics, "promptq_broker_reply_subscriptions_total",
                           "Confirmed subscriptions to the reply channel (one per loop, plus "
                           "one per reconnect)",
                           NULL);
    b->m_idem_replayed = pq_metrics_counter(b->metrics, "promptq_broker_idempotent_replays_total",
                                            "Requests answered as an earlier request with the same "
                                            "Idempotency-Key and body",
                                            NULL);
    b->m_idem_reused =
        pq_metrics_counter(b->metrics, "promptq_broker_idempotency_key_reused_total",
                           "Idempotency-Keys sent again with another body (422)", NULL);
    b->m_rate_limited = pq_metrics_counter(b->metrics, "promptq_broker_rate_limited_total",
                                           "Requests answered 429 by the tenant rate limit", NULL);
    b->m_cancelled = pq_metrics_counter(b->metrics, "promptq_broker_jobs_cancelled_total",
                                        "Jobs cancelled with DELETE /v1/jobs/{id}", NULL);
    b->m_batches_created = pq_metrics_counter(b->metrics, "promptq_broker_batches_created_total",
                                              "Batches created with POST /v1/batches", NULL);
    b->m_batches_finalized = pq_metrics_counter(
        b->metrics, "promptq_broker_batches_finalized_total",
        "Batches finalized (completed, cancelled or expired) by this process", NULL);
    b->m_batch_lines = pq_metrics_counter(b->metrics, "promptq_broker_batch_lines_total",
                                          "Batch lines made durable as jobs on the bulk lane",
                                          "outcome=\"queued\"");
    b->m_batch_invalid = pq_metrics_counter(b->metrics, "promptq_broker_batch_lines_total",
                                            "Batch lines made durable as jobs on the bulk lane",
                                            "outcome=\"invalid\"");
    b->m_files_uploaded =
        pq_metrics_counter(b->metrics, "promptq_broker_files_uploaded_bytes_total",
                           "Bytes of files uploaded with POST /v1/files", NULL);
    if (!b->m_batches_created || !b->m_batches_finalized || !b->m_batch_lines ||
        !b->m_batch_invalid || !b->m_files_uploaded)
        return -1;
    if (!b->m_chat_waiting || !b->m_chat_timeouts || !b->m_chat_abandoned || !b->m_chat_notified ||
        !b->m_sub_subscribed || !b->m_idem_replayed || !b->m_idem_reused || !b->m_rate_limited ||
        !b->m_cancelled)
        return -1;
    if (!b->m_accepted || !b->m_unavailable || !b->m_redis_errors || !b->m_conflicts ||
        !b->m_produce_errors || !b->m_ack_latency || !b->m_inflight || !b->m_accepted_spooled ||
        !b->m_spool_refused_full || !b->m_spool_refused_error || !b->m_drained ||
        !b->m_drain_failed || !b->m_drain_dropped || !b->m_producer_recreated ||
        !b->m_late_delivered || !b->m_spool_pending_records || !b->m_spool_pending_bytes ||
        !b->m_spool_disk_bytes || !b->m_spool_per_fsync || !b->m_spool_committed ||
        !b->m_spool_fsyncs || !b->m_spool_write_failed)
        return -1;
    return 0;
}

/* SIGHUP: loads the file again and hands the new config to every loop. Only what each request
 * reads (API keys, routes, size limits, ack timeout, log level) changes; Kafka, Redis, listen
 * address and thread count need a restart. */
static void reload(pq_broker_t *b)
{
    char errstr[512];
    pq_conf_t *conf;
    pq_bconf_t *bc;
    const pq_conf_t *old = b->bconf->conf;
    int level;

    if (!b->conf_path) {
        PQ_WARN("SIGHUP ignored: no config path to reload from");
        return;
    }
    conf = pq_conf_load(b->conf_path, errstr, sizeof(errstr));
    if (!conf) {
        PQ_ERR("SIGHUP: config not reloaded, keeping the old one: %s", errstr);
        return;
    }
    if (strcmp(conf->listen, old->listen) || strcmp(conf->redis_url, old->redis_url) ||
        conf->broker_threads != old->broker_threads || conf->nkafka != old->nkafka)
        PQ_WARN("SIGHUP: listen, redis, kafka and thread changes take effect on restart only");
    level = pq_log_level_parse(conf->log_level);
    pq_log_init("promptq-broker", level < 0 ? PQ_LOG_INFO : (pq_log_level_t)level, conf->log_json);
    bc = pq_bconf_new(conf);
    if (!bc) {
        PQ_ERR("SIGHUP: out of memory");
        return;
    }
    if (bc->conf->napi_keys == 0)
        PQ_WARN("no broker.api_keys configured: running open (tenant from the envelope)");
    for (int i = 0; i < b->nthreads; i++) {
        pq_bconf_t *prev;

        pq_bconf_ref(bc);
        prev = atomic_exchange(&b->threads[i]->next_bc, bc);
        pq_bconf_unref(prev); /* a reload the loop did not pick up yet */
        pq_bthread_poke(b->threads[i]);
    }
    pq_bconf_unref(b->bconf);
    b->bconf = bc;
    PQ_INFO("config reloaded from %s (%zu routes, %zu api keys)", b->conf_path, bc->conf->nroutes,
            bc->conf->napi_keys);
}

int main(int argc, char **argv)
{
    pq_broker_t b;
    pq_conf_t *conf = NULL;
    sigset_t sigs;
    char errstr[512];
    int rc, started = 0, exit_code = 1;

    memset(&b, 0, sizeof(b));
    pthread_mutex_init(&b.spool_stats_mu, NULL);
    atomic_init(&b.kafka_state, -1);
    rc = pq_conf_cli(argc, argv, "promptq-broker", &conf);
    if (rc != PQ_CONF_CLI_RUN)
        return rc;
    b.conf_path = pq_conf_path_from_args(argc, argv);

    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL); /* the loop threads inherit this */

    if (evthread_use_pthreads() != 0) {
        PQ_ERR("libevent threading support unavailable");
        pq_conf_destroy(conf);
        return 1;
    }
    b.bconf = pq_bconf_new(conf);
    if (!b.bconf || metrics_init(&b)) {
        PQ_ERR("out of memory");
        goto out;
    }
    conf = b.bconf->conf;
    b.started_s = pq_now_ms() / 1000;
    b.rl = pq_ratelimit_new();
    if (!b.rl || pq_key_reply(b.reply_channel, sizeof(b.reply_channel), conf->redis_prefix,
                              conf->instance_id) < 0) {
        PQ_ERR("broker.instance_id: reply channel name too long or out of memory");
        goto out;
    }
    if (conf->napi_keys == 0)
        PQ_WARN("no broker.api_keys configured: running open (tenant from the envelope)");

    b.nthreads = conf->broker_threads > 0 ? conf->broker_threads : 1;
    b.threads = calloc((size_t)b.nthreads, sizeof(*b.threads));
    if (!b.threads)
        goto out;
    b.port = conf->listen_port;
    if (pq_bspool_open(&b, errstr, sizeof(errstr))) {
        PQ_ERR("spool: %s", errstr);
        goto out;
    }
    for (int i = 0; i < b.nthreads; i++) {
        b.threads[i] = calloc(1, sizeof(pq_bthread_t));
        if (!b.threads[i] || pq_bthread_init(b.threads[i], &b, i, errstr, sizeof(errstr)) ||
            pq_bthread_listen(b.threads[i], &b.port, errstr, sizeof(errstr))) {
            PQ_ERR("thread %d: %s", i, b.threads[i] ? errstr : "out of memory");
            goto out;
        }
    }
    if (pq_bspool_start(&b, errstr, sizeof(errstr))) {
        PQ_ERR("spool drainer: %s", errstr);
        goto out;
    }
    if (pq_redrive_start(&b, errstr, sizeof(errstr))) {
        PQ_ERR("dlq redrive: %s", errstr);
        goto out;
    }
    for (int i = 0; i < b.nthreads; i++) {
        if (pq_bthread_start(b.threads[i], errstr, sizeof(errstr))) {
            PQ_ERR("thread %d: %s", i, errstr);
            goto out_stop;
        }
        started++;
    }
    PQ_INFO("listening on %s:%d with %d threads, max job body %zu bytes, topic %s, reply "
            "channel %s",
            conf->listen_host, b.port, b.nthreads, b.bconf->max_body, b.bconf->topic_requests,
            b.reply_channel);

    for (;;) {
        int sig = 0;

        if (sigwait(&sigs, &sig) != 0)
            continue;
        if (sig == SIGHUP) {
            reload(&b);
            continue;
        }
        PQ_INFO("%s: stopping (in-flight requests get their delivery reports first)",
                sig == SIGINT ? "SIGINT" : "SIGTERM");
        break;
    }
    exit_code = 0;

out_stop:
    /* before the loops stop: the redrives it still holds are answered through them */
    pq_redrive_stop(&b);
    for (int i = 0; i < started; i++) {
        atomic_store(&b.threads[i]->stop, 1);
        pq_bthread_poke(b.threads[i]);
    }
    for (int i = 0; i < started; i++)
        pthread_join(b.threads[i]->thread, NULL);
out:
    /* The loops are stopped; the spool calls back into their queues until it is closed, so it
     * closes before they are freed. */
    pq_bspool_close(&b);
    pq_redrive_free(&b);
    for (int i = 0; b.threads && i < b.nthreads; i++)
        pq_bthread_free(b.threads[i]);
    free(b.threads);
    pq_bconf_unref(b.bconf);
    pq_metrics_destroy(b.metrics);
    pq_ratelimit_destroy(b.rl);
    pthread_mutex_destroy(&b.spool_stats_mu);
    if (exit_code == 0)
        PQ_INFO("stopped");
    return exit_code;
}
