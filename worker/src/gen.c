/* Generations of providers and routes (gen.h). */
#include "gen.h"
#include <stdio.h>
#include <stdlib.h>
#include "park.h"

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
