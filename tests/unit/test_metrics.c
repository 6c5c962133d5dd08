/* Metrics registry: values, find-or-create, input checks, exact Prometheus text, and
 * concurrent updates. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "promptq/metrics.h"

static void test_values(void **state)
{
    pq_metrics_t *m = pq_metrics_new();
    pq_counter_t *c = pq_metrics_counter(m, "c_total", "C.", NULL);
    pq_gauge_t *g = pq_metrics_gauge(m, "g", "G.", "a=\"1\"");

    assert_non_null(c);
    assert_non_null(g);
    pq_counter_add(c, 2);
    pq_counter_add(c, 5);
    assert_int_equal(pq_counter_get(c), 7);
    pq_gauge_set(g, 1.5);
    pq_gauge_add(g, -4.0);
    assert_true(pq_gauge_get(g) == -2.5);

    /* find-or-create: the same (name, labels) is the same handle */
    assert_ptr_equal(pq_metrics_counter(m, "c_total", "C.", NULL), c);
    assert_ptr_equal(pq_metrics_counter(m, "c_total", "C.", ""), c);
    assert_ptr_not_equal(pq_metrics_counter(m, "c_total", "C.", "x=\"y\""), c);
    assert_ptr_equal(pq_metrics_gauge(m, "g", "G.", "a=\"1\""), g);

    /* bad input */
    assert_null(pq_metrics_gauge(m, "c_total", "C.", NULL)); /* type clash */
    assert_null(pq_metrics_counter(m, "1bad", "x", NULL));
    assert_null(pq_metrics_counter(m, "bad-name", "x", NULL));
    assert_null(pq_metrics_counter(m, "ok", "x", "route=gpt"));
    assert_null(pq_metrics_counter(m, "ok", "x", "route=\"gpt\","));
    assert_null(pq_metrics_counter(m, "ok", "x", "route=\"g\npt\""));
    assert_non_null(pq_metrics_counter(m, "ok", "x", "a=\"q\\\"\",b=\"2\""));
    double bad_bounds[] = {1, 0.5};
    assert_null(pq_metrics_histogram(m, "h", "H.", NULL, bad_bounds, 2));
    double bounds[] = {1};
    assert_null(pq_metrics_histogram(m, "h", "H.", "le=\"1\"", bounds, 1));

    /* NULL handles are no-ops */
    pq_counter_add(NULL, 1);
    pq_gauge_set(NULL, 1);
    pq_hist_observe(NULL, 1);
    pq_metrics_destroy(m);
    pq_metrics_destroy(NULL);
}

static void test_render_exact(void **state)
{
    pq_metrics_t *m = pq_metrics_new();
    static const double bounds[] = {0.1, 1};
    size_t len = 0;
    char *text;

    pq_counter_add(pq_metrics_counter(m, "pq_jobs_total", "Jobs by route.", "route=\"a\""), 3);
    pq_counter_add(pq_metrics_counter(m, "pq_jobs_total", "Jobs by route.", "route=\"b\""), 1);
    pq_gauge_set(pq_metrics_gauge(m, "pq_inflight", "In flight.\nNow.", NULL), 2.5);
    pq_hist_t *h =
        pq_metrics_histogram(m, "pq_latency_seconds", "Latency \\ s.", "provider=\"x\"", bounds, 2);
    pq_hist_observe(h, 0.25);
    pq_hist_observe(h, 0.1); /* le: exactly on the bound counts in that bucket */
    pq_hist_observe(h, 2);
    pq_hist_t *h2 = pq_metrics_histogram(m, "pq_size", "Size.", NULL, bounds, 1);
    pq_hist_observe(h2, 0.5);

    text = pq_metrics_render(m, &len);
    assert_non_null(text);
    assert_string_equal(text, "# HELP pq_jobs_total Jobs by route.\n"
                              "# TYPE pq_jobs_total counter\n"
                              "pq_jobs_total{route=\"a\"} 3\n"
                              "pq_jobs_total{route=\"b\"} 1\n"
                              "# HELP pq_inflight In flight.\\nNow.\n"
                              "# TYPE pq_inflight gauge\n"
                              "pq_inflight 2.5\n"
                              "# HELP pq_latency_seconds Latency \\\\ s.\n"
                              "# TYPE pq_latency_seconds histogram\n"
                              "pq_latency_seconds_bucket{provider=\"x\",le=\"0.1\"} 1\n"
                              "pq_latency_seconds_bucket{provider=\"x\",le=\"1\"} 2\n"
                              "pq_latency_seconds_bucket{provider=\"x\",le=\"+Inf\"} 3\n"
                              "pq_latency_seconds_sum{provider=\"x\"} 2.35\n"
                              "pq_latency_seconds_count{provider=\"x\"} 3\n"
                              "# HELP pq_size Size.\n"
                              "# TYPE pq_size histogram\n"
                              "pq_size_bucket{le=\"0.1\"} 0\n"
                              "pq_size_bucket{le=\"+Inf\"} 1\n"
                              "pq_size_sum 0.5\n"
                              "pq_size_count 1\n");
    assert_int_equal(len, strlen(text));
    free(text);
    pq_metrics_destroy(m);
}

static void test_latency_bounds(void **state)
{
    assert_true(pq_metrics_latency_nbounds >= 10);
    assert_true(pq_metrics_latency_bounds[0] == 0.005);
    assert_true(pq_metrics_latency_bounds[pq_metrics_latency_nbounds - 1] == 120);
    for (size_t i = 1; i < pq_metrics_latency_nbounds; i++)
        assert_true(pq_metrics_latency_bounds[i] > pq_metrics_latency_bounds[i - 1]);
    pq_metrics_t *m = pq_metrics_new();
    assert_non_null(pq_metrics_histogram(m, "l", "L.", NULL, pq_metrics_latency_bounds,
                                         pq_metrics_latency_nbounds));
    pq_metrics_destroy(m);
}

#define THREADS 4
#define ROUNDS  100000

typedef struct {
    pq_metrics_t *m;
    pq_counter_t *c;
    pq_gauge_t *g;
    pq_hist_t *h;
} shared_t;

static void *worker(void *arg)
{
    shared_t *s = arg;
    for (int i = 0; i < ROUNDS; i++) {
        pq_counter_add(s->c, 1);
        pq_gauge_add(s->g, 1.0);
        pq_hist_observe(s->h, (i & 1) ? 0.5 : 2.0);
        if (i % 10000 == 0) /* registration of an existing series races with updates */
            pq_counter_add(pq_metrics_counter(s->m, "n_total", "N.", NULL), 0);
    }
    return NULL;
}

static void test_concurrent(void **state)
{
    static const double bounds[] = {1};
    shared_t s;
    pthread_t t[THREADS];
    char *text;

    s.m = pq_metrics_new();
    s.c = pq_metrics_counter(s.m, "n_total", "N.", NULL);
    s.g = pq_metrics_gauge(s.m, "g", "G.", NULL);
    s.h = pq_metrics_histogram(s.m, "h", "H.", NULL, bounds, 1);
    for (int i = 0; i < THREADS; i++)
        assert_int_equal(pthread_create(&t[i], NULL, worker, &s), 0);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    assert_int_equal(pq_counter_get(s.c), THREADS * ROUNDS);
    assert_true(pq_gauge_get(s.g) == (double)(THREADS * ROUNDS));
    text = pq_metrics_render(s.m, NULL);
    assert_non_null(text);
    assert_non_null(strstr(text, "n_total 400000\n"));
    assert_non_null(strstr(text, "g 400000\n"));
    assert_non_null(strstr(text, "h_bucket{le=\"1\"} 200000\n"));
    assert_non_null(strstr(text, "h_bucket{le=\"+Inf\"} 400000\n"));
    assert_non_null(strstr(text, "h_sum 500000\n"));
    assert_non_null(strstr(text, "h_count 400000\n"));
    free(text);
    pq_metrics_destroy(s.m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_values),
        cmocka_unit_test(test_render_exact),
        cmocka_unit_test(test_latency_bounds),
        cmocka_unit_test(test_concurrent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
