/* promptq-sim's control state parser (tests/sim/sim_state.c): per-model states, schedules,
 * the new modes and error fields, and pq_sim_state_pick choosing the state a call meets. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "sim.h"

static void parse_ok(const char *json, pq_sim_state_t *st)
{
    char err[512];

    if (pq_sim_state_parse(json, strlen(json), st, err, sizeof(err)))
        fail_msg("%s: %s", json, err);
}

/* Refused bodies and the JSON path their message must name. */
static const struct {
    const char *json, *path;
} refused[] = {
    {"{\"models\":{\"m\":{\"mode\":\"down\"}}}", "models.m.mode"},
    {"{\"schedule\":{\"period_ms\":10,\"down_ms\":5,\"down\":{\"mode\":\"down\"}}}",
     "schedule.down.mode"},
    {"{\"models\":{\"m\":{\"schedule\":{\"period_ms\":10,\"down_ms\":5,\"down\":{\"mode\":"
     "\"down\"}}}}}",
     "models.m.schedule.down.mode"},
    {"{\"models\":{\"m\":{\"models\":{}}}}", "models.m.models"},
    {"{\"models\":{\"m\":{\"revoke_tokens\":true}}}", "models.m.revoke_tokens"},
    {"{\"models\":{\"m\":{\"latency_ms\":-1}}}", "models.m.latency_ms"},
    {"{\"models\":{\"m\":[]}}", "models.m"},
    {"{\"models\":{\"\":{}}}", "models"},
    {"{\"models\":[]}", "models"},
    {"{\"schedule\":{\"period_ms\":10,\"down_ms\":5,\"down\":{\"schedule\":{}}}}",
     "schedule.down.schedule"},
    {"{\"schedule\":{\"period_ms\":10,\"down_ms\":11,\"down\":{}}}", "schedule.down_ms"},
    {"{\"schedule\":{\"period_ms\":0,\"down_ms\":0,\"down\":{}}}", "schedule.period_ms"},
    {"{\"schedule\":{\"period_ms\":10,\"down\":{}}}", "schedule"},
    {"{\"schedule\":{\"period_ms\":10,\"down_ms\":5,\"down\":{},\"x\":1}}", "schedule.x"},
    {"{\"error_code\":\"\"}", "error_code"},
    {"{\"error_message\":5}", "error_message"},
    {"{\"mode\":\"sideways\"}", "mode"},
    {"{\"retry_after\":\"\\n\"}", "retry_after"},
};

static void test_refused(void **state)
{
    pq_sim_state_t st;
    char err[512];

    (void)state;
    for (size_t i = 0; i < sizeof(refused) / sizeof(refused[0]); i++) {
        err[0] = '\0';
        if (pq_sim_state_parse(refused[i].json, strlen(refused[i].json), &st, err, sizeof(err)) ==
            0)
            fail_msg("accepted: %s", refused[i].json);
        if (strncmp(err, refused[i].path, strlen(refused[i].path)) != 0)
            fail_msg("%s: message \"%s\" does not start with %s", refused[i].json, err,
                     refused[i].path);
        assert_null(st.models);
        assert_null(st.sched_down);
    }
}

static void test_models_and_fields(void **state)
{
    pq_sim_state_t st;

    (void)state;
    parse_ok("{\"mode\":\"error\",\"status\":502,\"models\":{"
             "\"a\":{\"mode\":\"rate_limit\",\"retry_after\":null},"
             "\"b\":{\"mode\":\"stall\",\"latency_ms\":40},"
             "\"c\":{\"mode\":\"error\",\"status\":400,\"error_code\":\"invalid_request_error\","
             "\"error_message\":\"bad\"},"
             "\"d\":{\"mode\":\"error\",\"status\":200,\"error_body\":\"{}\"},"
             "\"e\":{\"mode\":\"reset\",\"retry_after\":\"\"}}}",
             &st);
    assert_int_equal(st.mode, PQ_SIM_MODE_ERROR);
    assert_int_equal(st.nmodels, 5);
    assert_string_equal(st.models[0].name, "a");
    assert_int_equal(st.models[0].state.mode, PQ_SIM_MODE_RATE_LIMIT);
    assert_true(st.models[0].state.retry_after_none);
    assert_int_equal(st.models[0].state.status, 500); /* whole-state defaults per model */
    assert_int_equal(st.models[1].state.mode, PQ_SIM_MODE_STALL);
    assert_int_equal(st.models[1].state.latency_ms, 40);
    assert_false(st.models[1].state.retry_after_none);
    assert_string_equal(st.models[2].state.error_code, "invalid_request_error");
    assert_string_equal(st.models[2].state.error_message, "bad");
    assert_int_equal(st.models[3].state.status, 200);
    assert_int_equal(st.models[4].state.mode, PQ_SIM_MODE_RESET);
    assert_true(st.models[4].state.retry_after_none);

    assert_ptr_equal(pq_sim_state_pick(&st, "b", 0), &st.models[1].state);
    assert_ptr_equal(pq_sim_state_pick(&st, "zz", 0), &st);
    assert_ptr_equal(pq_sim_state_pick(&st, NULL, 0), &st);
    assert_ptr_equal(pq_sim_state_pick(&st, "", 0), &st);
    pq_sim_state_clear(&st);
    assert_int_equal(st.nmodels, 0);
    assert_null(st.models);
    pq_sim_state_clear(NULL);
}

static void test_schedule_pick(void **state)
{
    pq_sim_state_t st;
    const pq_sim_state_t *m, *p;

    (void)state;
    parse_ok("{\"schedule\":{\"period_ms\":600,\"down_ms\":300,\"down\":{\"mode\":\"error\","
             "\"status\":503}},\"models\":{\"x\":{\"mode\":\"hang\",\"schedule\":{\"period_ms\":"
             "100,\"down_ms\":0,\"down\":{}}}}}",
             &st);
    assert_int_equal(st.period_ms, 600);
    assert_int_equal(st.down_ms, 300);
    assert_non_null(st.sched_down);
    /* the top-level schedule applies to other models and to non-chat calls */
    for (int64_t t = 0; t < 1800; t += 50) {
        p = pq_sim_state_pick(&st, "other", t);
        if (t % 600 < 300) {
            assert_ptr_equal(p, st.sched_down);
            assert_int_equal(p->mode, PQ_SIM_MODE_ERROR);
            assert_int_equal(p->status, 503);
        } else {
            assert_ptr_equal(p, &st);
        }
    }
    assert_ptr_equal(pq_sim_state_pick(&st, NULL, 299), st.sched_down);
    assert_ptr_equal(pq_sim_state_pick(&st, NULL, 300), &st);
    /* a model's own state replaces the top level, schedule included; down_ms 0: never */
    m = &st.models[0].state;
    for (int64_t t = 0; t < 300; t += 10)
        assert_ptr_equal(pq_sim_state_pick(&st, "x", t), m);
    pq_sim_state_clear(&st);
}

static void test_to_json(void **state)
{
    pq_sim_state_t st;
    json_t *doc;

    (void)state;
    parse_ok("{\"retry_after\":null,\"models\":{\"a\":{\"mode\":\"stall\"}},\"schedule\":{"
             "\"period_ms\":10,\"down_ms\":5,\"down\":{\"mode\":\"reset\"}}}",
             &st);
    doc = pq_sim_state_to_json(&st);
    assert_non_null(doc);
    assert_true(json_is_null(json_object_get(doc, "retry_after")));
    assert_string_equal(json_string_value(json_object_get(
                            json_object_get(json_object_get(doc, "models"), "a"), "mode")),
                        "stall");
    assert_string_equal(json_string_value(json_object_get(
                            json_object_get(json_object_get(doc, "schedule"), "down"), "mode")),
                        "reset");
    json_decref(doc);
    pq_sim_state_clear(&st);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_refused),
        cmocka_unit_test(test_models_and_fields),
        cmocka_unit_test(test_schedule_pick),
        cmocka_unit_test(test_to_json),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
