/* A small metrics registry rendered as Prometheus text. Updates are lock-free atomics and may
 * come from any thread; registration takes a mutex. Metrics live as long as the registry. */
#ifndef PROMPTQ_METRICS_H
#define PROMPTQ_METRICS_H

#include <stddef.h>
#include <stdint.h>

typedef struct pq_metrics_s pq_metrics_t;
typedef struct pq_counter_s pq_counter_t;
typedef struct pq_gauge_s pq_gauge_t;
typedef struct pq_hist_s pq_hist_t;

pq_metrics_t *pq_metrics_new(void);
void pq_metrics_destroy(pq_metrics_t *m);

/* Registers (or finds, when name and labels match) a metric. name: a Prometheus metric name;
 * labels: NULL or a label list without braces, e.g. "route=\"gpt\",outcome=\"ok\"" (copied).
 * Metrics of the same name must share help and type (the first help is kept; another type
 * gives NULL). Histograms may not use the label "le"; a histogram found again keeps its first
 * bounds. Returns a borrowed handle, NULL on bad input (name, label syntax, bounds not strictly
 * ascending and finite, more than 64 bounds). */
pq_counter_t *pq_metrics_counter(pq_metrics_t *m, const char *name, const char *help,
                                 const char *labels);
pq_gauge_t *pq_metrics_gauge(pq_metrics_t *m, const char *name, const char *help,
                             const char *labels);
/* bounds: ascending upper bounds (copied), +Inf is implicit. */
pq_hist_t *pq_metrics_histogram(pq_metrics_t *m, const char *name, const char *help,
                                const char *labels, const double *bounds, size_t nbounds);

/* Updates are relaxed atomics; a NULL handle is a no-op (reads give 0). NaN observations are
 * ignored. */
void pq_counter_add(pq_counter_t *c, uint64_t n);
uint64_t pq_counter_get(const pq_counter_t *c);
void pq_gauge_set(pq_gauge_t *g, double v);
void pq_gauge_add(pq_gauge_t *g, double delta);
double pq_gauge_get(const pq_gauge_t *g);
void pq_hist_observe(pq_hist_t *h, double v);

/* Prometheus text exposition format 0.0.4, metrics grouped by name with one HELP and TYPE line
 * each, in registration order; histograms as cumulative _bucket{...,le="x"}, _sum, _count (the
 * +Inf bucket). New string (free()); *len (may be NULL) gets its length. */
char *pq_metrics_render(pq_metrics_t *m, size_t *len);

/* Latency buckets in seconds suitable for provider calls (5 ms .. 120 s). */
extern const double pq_metrics_latency_bounds[];
extern const size_t pq_metrics_latency_nbounds;

#endif
