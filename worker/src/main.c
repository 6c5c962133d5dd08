/* promptq-worker: --config PATH (or $PROMPTQ_CONFIG), --check-config, --grace-ms N. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <curl/curl.h>
#include "promptq/conf.h"
#include "promptq/log.h"
#include "worker.h"

#define DEFAULT_GRACE_MS 10000

static void usage(void)
{
    fprintf(stderr, "usage: promptq-worker [--config PATH] [--check-config] [--grace-ms N]\n");
}

int main(int argc, char **argv)
{
    pq_conf_t *conf = NULL;
    pq_worker_t *w;
    char errstr[512];
    int grace_ms = DEFAULT_GRACE_MS;
    int rc;

    for (int i = 1; i < argc; i++) {
        int skip = pq_conf_cli_skip(argc, argv, i);
        if (skip > 0) {
            i += skip - 1;
        } else if (strcmp(argv[i], "--grace-ms") == 0 && i + 1 < argc) {
            grace_ms = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage();
            return 0;
        } else {
            fprintf(stderr, "promptq-worker: unknown argument \"%s\"\n", argv[i]);
            usage();
            return 2;
        }
    }
    rc = pq_conf_cli(argc, argv, "promptq-worker", &conf);
    if (rc != PQ_CONF_CLI_RUN)
        return rc;

    signal(SIGPIPE, SIG_IGN);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    w = pq_worker_new(conf, errstr, sizeof(errstr));
    if (!w) {
        PQ_ERR("cannot start: %s", errstr);
        rc = 1;
        goto out;
    }
    rc = pq_worker_run(w, grace_ms < 0 ? 0 : grace_ms);
    pq_worker_destroy(w);
out:
    pq_conf_destroy(conf);
    curl_global_cleanup();
    return rc;
}
