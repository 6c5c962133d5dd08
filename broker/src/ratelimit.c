/* Per-tenant rate limit: one token bucket per tenant for the whole process (all loops share
 * it, so N threads do not multiply the rate). broker.tenant_rps tokens per second refill a
 * bucket of broker.tenant_burst; a request takes one token or is answered 429 + Retry-After.
 *
 * The table is open addressing under one mutex: the critical section is a hash probe and a few
 * arithmetic operations. Tenants come from API keys (bounded by the config); in open mode
 * they are client-chosen, so the table is capped and cleared when full (buckets then start
 * full again, which only ever errs on the side of admitting). */
#include "broker.h"
#include "http.h"
#include "ratelimit.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/keyvalq_struct.h>

#include "promptq/util.h"

#define RL_SLOTS 4096 /* power of two */
#define RL_MAX   (RL_SLOTS * 3 / 4)

typedef struct {
    char tenant[PQ_TENANT_MAX + 1]; /* "" = empty */
    double tokens;
    int64_t last_us;
} rl_bucket_t;

struct pq_ratelimit_s {
    pthread_mutex_t mu;
    size_t used;
    rl_bucket_t b[RL_SLOTS];
};

struct pq_ratelimit_s *pq_ratelimit_new(void)
{
    struct pq_ratelimit_s *rl = calloc(1, sizeof(*rl));

    if (rl)
        pthread_mutex_init(&rl->mu, NULL);
    return rl;
}

void pq_ratelimit_destroy(struct pq_ratelimit_s *rl)
{
    if (!rl)
        return;
    pthread_mutex_destroy(&rl->mu);
    free(rl);
}

static uint32_t fnv1a(const char *s)
{
    uint32_t h = 2166136261u;

    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 16777619u;
    return h;
}

int pq_ratelimit_take(struct pq_ratelimit_s *rl, const char *tenant, double rps, int burst)
{
    double cap = burst > 0 ? (double)burst : ceil(rps);
    int64_t now = pq_mono_us();
    rl_bucket_t *bk = NULL;
    uint32_t i;
    int wait = 0;

    if (!rl || rps <= 0 || !tenant)
        return 0;
    if (cap < 1)
        cap = 1;
    pthread_mutex_lock(&rl->mu);
    for (i = fnv1a(tenant) & (RL_SLOTS - 1);; i = (i + 1) & (RL_SLOTS - 1)) {
        if (!rl->b[i].tenant[0] || !strcmp(rl->b[i].tenant, tenant)) {
            bk = &rl->b[i];
            break;
        }
    }
    if (!bk->tenant[0]) {
        if (rl->used >= RL_MAX) {
            memset(rl->b, 0, sizeof(rl->b));
            rl->used = 0;
            bk = &rl->b[fnv1a(tenant) & (RL_SLOTS - 1)];
        }
        pq_strlcpy(bk->tenant, tenant, sizeof(bk->tenant));
        bk->tokens = cap;
        bk->last_us = now;
        rl->used++;
    }
    bk->tokens += (double)(now - bk->last_us) / 1e6 * rps;
    if (bk->tokens > cap)
        bk->tokens = cap;
    bk->last_us = now;
    if (bk->tokens >= 1.0) {
        bk->tokens -= 1.0;
    } else {
        wait = (int)ceil((1.0 - bk->tokens) / rps);
        if (wait < 1)
            wait = 1;
    }
    pthread_mutex_unlock(&rl->mu);
    return wait;
}

int pq_http_ratelimit(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                      const char *tenant)
{
    const pq_conf_t *conf = t->bc->conf;
    char ra[16];
    int wait;

    if (conf->tenant_rps <= 0)
        return 0;
    wait = pq_ratelimit_take(t->b->rl, tenant ? tenant : "default", conf->tenant_rps,
                             conf->tenant_burst);
    if (wait == 0)
        return 0;
    pq_counter_add(t->b->m_rate_limited, 1);
    snprintf(ra, sizeof(ra), "%d", wait);
    evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", ra);
    pq_http_error(t, req, path, 429, "rate_limited",
                  "tenant %s is over its rate limit of %g requests per second; retry after %d s",
                  tenant ? tenant : "default", conf->tenant_rps, wait);
    return -1;
}
