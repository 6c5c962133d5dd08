/* The broker's slot table (broker/src/slot.c) driven on a real libevent loop without Redis or
 * Kafka: handles find a slot only while it serves the same request, and the slot's own ops
 * table (not the loop) answers its timer and its release. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "slot.h"

/* slot.c takes a Redis reply's bookkeeping from rconn.c; here the context names the loop. */
pq_bthread_t *pq_rconn_replied(redisAsyncContext *ac, const void *reply)
{
    (void)reply;
    return ac->data;
}

static int ntimeouts, nreleases;

static void count_timeout(pq_slot_t *s)
{
    ntimeouts++;
    pq_slot_release(s);
}

static void count_release(pq_slot_t *s)
{
    (void)s;
    nreleases++;
}

static const pq_slot_ops_t counting_ops = {count_timeout, NULL, count_release};

typedef struct {
    pq_broker_t b;
    pq_bthread_t *t;
} fixture_t;

static int setup(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));

    assert_non_null(f);
    f->t = calloc(1, sizeof(*f->t));
    assert_non_null(f->t);
    f->t->b = &f->b;
    f->t->base = event_base_new();
    assert_non_null(f->t->base);
    ntimeouts = nreleases = 0;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;

    pq_slots_free(f->t);
    event_base_free(f->t->base);
    free(f->t);
    free(f);
    return 0;
}

static void test_handle_is_for_one_request(void **state)
{
    fixture_t *f = *state;
    pq_slot_t *s = pq_slot_get(f->t, PQ_PATH_JOB, NULL, &counting_ops);
    void *h;

    assert_non_null(s);
    assert_int_equal(f->t->inflight, 1);
    s->state = PQ_SLOT_GET;
    h = pq_slot_handle(s);
    assert_ptr_equal(pq_slot_from_handle(f->t, h), s);
    pq_slot_release(s);
    assert_int_equal(nreleases, 1);
    assert_int_equal(f->t->inflight, 0);
    assert_null(pq_slot_from_handle(f->t, h));
    /* the slot serves the next request under another handle */
    assert_ptr_equal(pq_slot_get(f->t, PQ_PATH_JOB, NULL, &counting_ops), s);
    s->state = PQ_SLOT_GET;
    assert_null(pq_slot_from_handle(f->t, h));
    assert_ptr_equal(pq_slot_from_handle(f->t, pq_slot_handle(s)), s);
    assert_null(pq_slot_from_handle(f->t, NULL));
}

static void test_timer_goes_to_the_slot_ops(void **state)
{
    fixture_t *f = *state;
    pq_slot_t *s = pq_slot_get(f->t, PQ_PATH_JOB, NULL, &counting_ops);
    struct timeval now = {0, 0};

    assert_non_null(s);
    s->state = PQ_SLOT_GET;
    event_add(&s->timer, &now);
    event_base_loop(f->t->base, EVLOOP_ONCE);
    assert_int_equal(ntimeouts, 1);
    assert_int_equal(nreleases, 1);
    assert_int_equal(f->t->inflight, 0);
}

static void test_reply_finds_live_slots_only(void **state)
{
    fixture_t *f = *state;
    redisAsyncContext ac = {0};
    pq_slot_t *s = pq_slot_get(f->t, PQ_PATH_JOB, NULL, &counting_ops);
    void *h;

    ac.data = f->t;
    assert_non_null(s);
    s->state = PQ_SLOT_GET;
    h = pq_slot_handle(s);
    assert_ptr_equal(pq_slot_replied(&ac, NULL, h), s);
    assert_null(pq_slot_replied(&ac, NULL, NULL));
    pq_slot_release(s);
    assert_null(pq_slot_replied(&ac, NULL, h));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_handle_is_for_one_request, setup, teardown),
        cmocka_unit_test_setup_teardown(test_timer_goes_to_the_slot_ops, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reply_finds_live_slots_only, setup, teardown),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
