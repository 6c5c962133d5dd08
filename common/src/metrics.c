/* Metrics registry: lock-free updates (C11 atomics; doubles kept as IEEE-754 bit patterns in
 * 64-bit atomics and updated by compare-and-swap), registration and rendering under a mutex.
 * Output: Prometheus text exposition format 0.0.4. */
#include "promptq/metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const double pq_metrics_latency_bounds[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                            2.5,   5,    10,    20,   30,  60,   120};
const size_t pq_metrics_latency_nbounds =
    sizeof(pq_metrics_latency_bounds) / sizeof(pq_metrics_latency_bounds[0]);

#define METRICS_NAME_MAX   200
#define METRICS_LABELS_MAX 1024
#define METRICS_BOUNDS_MAX 64

typedef enum { MT_COUNTER, MT_GAUGE, MT_HIST } metric_type_t;

static const char *const type_names[] = {"counter", "gauge", "histogram"};

struct pq_counter_s {
    _Atomic uint64_t v;
};

struct pq_gauge_s {
    _Atomic uint64_t bits; /* a double */
};

struct pq_hist_s {
    size_t nbounds;
    double *bounds;
    _Atomic uint64_t sum_bits; /* a double */
    _Atomic uint64_t *buckets; /* nbounds + 1, non-cumulative; the last one is +Inf */
};

typedef struct series_s {
    struct series_s *next;
    char *labels; /* "" when none */
    union {
        struct pq_counter_s counter;
        struct pq_gauge_s gauge;
        struct pq_hist_s hist;
    } u;
} series_t;

typedef struct family_s {
    struct family_s *next;
    char *name;
    char *help;
    metric_type_t type;
    series_t *series, **series_tail;
} family_t;

struct pq_metrics_s {
    pthread_mutex_t lock;
    family_t *families, **families_tail;
};

static uint64_t d2u(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof(u));
    return u;
}

static double u2d(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof(d));
    return d;
}

static void atomic_add_double(_Atomic uint64_t *bits, double delta)
{
    uint64_t old = atomic_load_explicit(bits, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(bits, &old, d2u(u2d(old) + delta),
                                                  memory_order_relaxed, memory_order_relaxed))
        ;
}

pq_metrics_t *pq_metrics_new(void)
{
    pq_metrics_t *m = calloc(1, sizeof(*m));
    if (!m)
        return NULL;
    pthread_mutex_init(&m->lock, NULL);
    m->families_tail = &m->families;
    return m;
}

static void series_free(series_t *s, metric_type_t type)
{
    if (type == MT_HIST) {
        free(s->u.hist.bounds);
        free(s->u.hist.buckets);
    }
    free(s->labels);
    free(s);
}

void pq_metrics_destroy(pq_metrics_t *m)
{
    family_t *f, *fnext;
    series_t *s, *snext;

    if (!m)
        return;
    for (f = m->families; f; f = fnext) {
        fnext = f->next;
        for (s = f->series; s; s = snext) {
            snext = s->next;
            series_free(s, f->type);
        }
        free(f->name);
        free(f->help);
        free(f);
    }
    pthread_mutex_destroy(&m->lock);
    free(m);
}

static int name_valid(const char *name)
{
    size_t i;
    if (!name || !name[0] || strlen(name) > METRICS_NAME_MAX)
        return 0;
    for (i = 0; name[i]; i++) {
        char c = name[i];
        int alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
        if (!alpha && !(i > 0 && c >= '0' && c <= '9'))
            return 0;
    }
    return 1;
}

/* Checks a label list: name="value"[,name="value"...] with \\, \" and \n escapes in values.
 * Histograms may not use the reserved label "le". */
static int labels_valid(const char *l, int forbid_le)
{
    const char *p = l;

    if (strlen(l) > METRICS_LABELS_MAX)
        return 0;
    while (*p) {
        const char *start = p;
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || *p == '_'))
            return 0;
        while ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || *p == '_' ||
               (*p >= '0' && *p <= '9'))
            p++;
        if (forbid_le && p - start == 2 && strncmp(start, "le", 2) == 0)
            return 0;
        if (*p++ != '=' || *p++ != '"')
            return 0;
        while (*p != '"') {
            if (*p == '\0' || *p == '\n')
                return 0;
            if (*p == '\\') {
                p++;
                if (*p != '\\' && *p != '"' && *p != 'n')
                    return 0;
            }
            p++;
        }
        p++;
        if (*p == ',') {
            p++;
            if (!*p)
                return 0;
        } else if (*p) {
            return 0;
        }
    }
    return 1;
}

/* Finds or creates the series (name, labels). Called with m->lock held. */
static series_t *metrics_get(pq_metrics_t *m, const char *name, const char *help,
                             const char *labels, metric_type_t type, const double *bounds,
                             size_t nbounds)
{
    family_t *f;
    series_t *s;

    for (f = m->families; f; f = f->next)
        if (strcmp(f->name, name) == 0)
            break;
    if (f && f->type != type)
        return NULL;
    if (f) {
        for (s = f->series; s; s = s->next)
            if (strcmp(s->labels, labels) == 0)
                return s;
    } else {
        f = calloc(1, sizeof(*f));
        if (!f)
            return NULL;
        f->name = strdup(name);
        f->help = strdup(help ? help : "");
        f->type = type;
        f->series_tail = &f->series;
        if (!f->name || !f->help) {
            free(f->name);
            free(f->help);
            free(f);
            return NULL;
        }
        *m->families_tail = f;
        m->families_tail = &f->next;
    }

    s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->labels = strdup(labels);
    if (!s->labels)
        goto out_free;
    if (type == MT_HIST) {
        s->u.hist.nbounds = nbounds;
        s->u.hist.bounds = malloc(nbounds * sizeof(double) + 1);
        s->u.hist.buckets = calloc(nbounds + 1, sizeof(*s->u.hist.buckets));
        if (!s->u.hist.bounds || !s->u.hist.buckets)
            goto out_free;
        if (nbounds)
            memcpy(s->u.hist.bounds, bounds, nbounds * sizeof(double));
        atomic_init(&s->u.hist.sum_bits, d2u(0.0));
        for (size_t i = 0; i <= nbounds; i++)
            atomic_init(&s->u.hist.buckets[i], 0);
    } else if (type == MT_GAUGE) {
        atomic_init(&s->u.gauge.bits, d2u(0.0));
    } else {
        atomic_init(&s->u.counter.v, 0);
    }
    *f->series_tail = s;
    f->series_tail = &s->next;
    return s;

out_free:
    series_free(s, type);
    return NULL;
}

static series_t *metrics_register(pq_metrics_t *m, const char *name, const char *help,
                                  const char *labels, metric_type_t type, const double *bounds,
                                  size_t nbounds)
{
    series_t *s;

    if (!labels)
        labels = "";
    if (!m || !name_valid(name) || !labels_valid(labels, type == MT_HIST))
        return NULL;
    if (type == MT_HIST) {
        if (nbounds > METRICS_BOUNDS_MAX || (nbounds && !bounds))
            return NULL;
        for (size_t i = 0; i < nbounds; i++)
            if (!isfinite(bounds[i]) || (i > 0 && bounds[i] <= bounds[i - 1]))
                return NULL;
    }
    pthread_mutex_lock(&m->lock);
    s = metrics_get(m, name, help, labels, type, bounds, nbounds);
    pthread_mutex_unlock(&m->lock);
    return s;
}

pq_counter_t *pq_metrics_counter(pq_metrics_t *m, const char *name, const char *help,
                                 const char *labels)
{
    series_t *s = metrics_register(m, name, help, labels, MT_COUNTER, NULL, 0);
    return s ? &s->u.counter : NULL;
}

pq_gauge_t *pq_metrics_gauge(pq_metrics_t *m, const char *name, const char *help,
                             const char *labels)
{
    series_t *s = metrics_register(m, name, help, labels, MT_GAUGE, NULL, 0);
    return s ? &s->u.gauge : NULL;
}

pq_hist_t *pq_metrics_histogram(pq_metrics_t *m, const char *name, const char *help,
                                const char *labels, const double *bounds, size_t nbounds)
{
    series_t *s = metrics_register(m, name, help, labels, MT_HIST, bounds, nbounds);
    return s ? &s->u.hist : NULL;
}

void pq_counter_add(pq_counter_t *c, uint64_t n)
{
    if (c)
        atomic_fetch_add_explicit(&c->v, n, memory_order_relaxed);
}

uint64_t pq_counter_get(const pq_counter_t *c)
{
    return c ? atomic_load_explicit(&((pq_counter_t *)c)->v, memory_order_relaxed) : 0;
}

void pq_gauge_set(pq_gauge_t *g, double v)
{
    if (g)
        atomic_store_explicit(&g->bits, d2u(v), memory_order_relaxed);
}

void pq_gauge_add(pq_gauge_t *g, double delta)
{
    if (g)
        atomic_add_double(&g->bits, delta);
}

double pq_gauge_get(const pq_gauge_t *g)
{
    return g ? u2d(atomic_load_explicit(&((pq_gauge_t *)g)->bits, memory_order_relaxed)) : 0.0;
}

void pq_hist_observe(pq_hist_t *h, double v)
{
    size_t lo = 0, hi;

    if (!h || isnan(v))
        return;
    /* First bucket whose upper bound is >= v (le semantics); nbounds means +Inf. */
    hi = h->nbounds;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v <= h->bounds[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    atomic_fetch_add_explicit(&h->buckets[lo], 1, memory_order_relaxed);
    atomic_add_double(&h->sum_bits, v);
}

/* ---- rendering --------------------------------------------------------------------------- */

typedef struct {
    char *buf;
    size_t len, cap;
    int failed;
} rbuf_t;

static void rb_printf(rbuf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void rb_printf(rbuf_t *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (b->failed)
        return;
    for (;;) {
        va_start(ap, fmt);
        n = vsnprintf(b->buf + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->failed = 1;
            return;
        }
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        size_t ncap = b->cap * 2;
        while (ncap - b->len <= (size_t)n)
            ncap *= 2;
        char *nb = realloc(b->buf, ncap);
        if (!nb) {
            b->failed = 1;
            return;
        }
        b->buf = nb;
        b->cap = ncap;
    }
}

/* Shortest decimal that reads back as the same double; Prometheus spellings for the rest. */
static const char *fmt_double(double v, char *buf, size_t size)
{
    if (isnan(v))
        return "NaN";
    if (isinf(v))
        return v > 0 ? "+Inf" : "-Inf";
    for (int prec = 6; prec <= 17; prec++) {
        snprintf(buf, size, "%.*g", prec, v);
        if (strtod(buf, NULL) == v)
            break;
    }
    return buf;
}

static void rb_help(rbuf_t *b, const char *help)
{
    for (const char *p = help; *p; p++) {
        if (*p == '\\')
            rb_printf(b, "\\\\");
        else if (*p == '\n')
            rb_printf(b, "\\n");
        else
            rb_printf(b, "%c", *p);
    }
}

static void render_hist(rbuf_t *b, const char *name, const series_t *s)
{
    const struct pq_hist_s *h = &s->u.hist;
    const char *sep = s->labels[0] ? "," : "";
    uint64_t cum = 0;
    char num[40];

    for (size_t i = 0; i <= h->nbounds; i++) {
        cum += atomic_load_explicit(&((struct pq_hist_s *)h)->buckets[i], memory_order_relaxed);
        rb_printf(b, "%s_bucket{%s%sle=\"%s\"} %llu\n", name, s->labels, sep,
                  i < h->nbounds ? fmt_double(h->bounds[i], num, sizeof(num)) : "+Inf",
                  (unsigned long long)cum);
    }
    /* _count is the +Inf bucket, so the two always agree even under concurrent updates. */
    double sum =
        u2d(atomic_load_explicit(&((struct pq_hist_s *)h)->sum_bits, memory_order_relaxed));
    if (s->labels[0]) {
        rb_printf(b, "%s_sum{%s} %s\n", name, s->labels, fmt_double(sum, num, sizeof(num)));
        rb_printf(b, "%s_count{%s} %llu\n", name, s->labels, (unsigned long long)cum);
    } else {
        rb_printf(b, "%s_sum %s\n", name, fmt_double(sum, num, sizeof(num)));
        rb_printf(b, "%s_count %llu\n", name, (unsigned long long)cum);
    }
}

char *pq_metrics_render(pq_metrics_t *m, size_t *len)
{
    rbuf_t b = {0};
    family_t *f;
    series_t *s;
    char num[40];

    if (!m)
        return NULL;
    b.cap = 4096;
    b.buf = malloc(b.cap);
    if (!b.buf)
        return NULL;
    b.buf[0] = '\0';
    pthread_mutex_lock(&m->lock);
    for (f = m->families; f; f = f->next) {
        rb_printf(&b, "# HELP %s ", f->name);
        rb_help(&b, f->help);
        rb_printf(&b, "\n# TYPE %s %s\n", f->name, type_names[f->type]);
        for (s = f->series; s; s = s->next) {
            const char *lo = s->labels[0] ? "{" : "", *lc = s->labels[0] ? "}" : "";
            switch (f->type) {
            case MT_COUNTER:
                rb_printf(&b, "%s%s%s%s %llu\n", f->name, lo, s->labels, lc,
                          (unsigned long long)pq_counter_get(&s->u.counter));
                break;
            case MT_GAUGE:
                rb_printf(&b, "%s%s%s%s %s\n", f->name, lo, s->labels, lc,
                          fmt_double(pq_gauge_get(&s->u.gauge), num, sizeof(num)));
                break;
            case MT_HIST:
                render_hist(&b, f->name, s);
                break;
            }
        }
    }
    pthread_mutex_unlock(&m->lock);
    if (b.failed) {
        free(b.buf);
        return NULL;
    }
    if (len)
        *len = b.len;
    return b.buf;
}
